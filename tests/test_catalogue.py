"""The catalogue of released files (ctrlora_core/catalogue.json): consistent with the official naming, every condition
says which node makes its input (and that node exists), Load CtrLoRA reports it, and the workflows name only
released files or files they train themselves."""
import glob
import json
import os

import pytest

from conftest import pack
from helpers import nodes, write_lora

catalogue = pack.ctrlora_core.catalogue
info = pack.ctrlora_core.info
preprocess_nodes = pack.nodes.preprocess
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = catalogue.catalogue()["files"]
CONDITIONS = catalogue.catalogue()["conditions"]


def test_every_file_is_named_as_the_official_naming_says():
    assert len({f["file"] for f in FILES}) == len(FILES)
    for entry in FILES:
        if entry["family"] == "sdxl":
            assert entry["kind"] == "base" and entry["path"] is None and entry["verified"].startswith("not verified")
            continue
        assert entry["path"].endswith("/" + entry["file"])
        if entry["kind"] == "base":
            assert entry["path"].startswith("ctrlora-basecn/")
            continue
        parsed = info.parse_name(entry["file"])
        assert (parsed["condition"], parsed["images"], parsed["steps"]) == (
            entry["condition"], entry["images"], entry["steps"]), entry["file"]
        assert entry["path"].startswith(f"ctrlora-loras/{entry['set']}-conditions/")
        assert entry["condition"] in CONDITIONS and entry["verified"] and 0 < entry["strength"] <= 2


def test_the_files_the_official_readme_and_workflows_use_are_in_and_the_unreleased_palette_is_not():
    names = {f["file"] for f in FILES}
    assert {"ctrlora_sd15_basecn700k.ckpt", "ctrlora_sd15_basecn700k_canny_rank128.ckpt",
            "ctrlora_sd15_basecn700k_lineart_rank128_1kimgs_1ksteps.ckpt",
            "ctrlora_sd15_basecn700k_palette_rank128_100kimgs_100ksteps.ckpt",
            "ctrlora_sd15_basecn700k_palette_rank128_520kimgs_800ksteps.ckpt",
            "ctrlora_sd15_basecn700k_inpainting_brush_rank128_1kimgs_1ksteps.ckpt"} <= names
    assert "ctrlora_sd15_basecn700k_palette_rank128_1kimgs_1ksteps.ckpt" not in names
    assert catalogue.download_url(catalogue.released_file("ctrlora_sd15_basecn700k.ckpt")) == (
        "https://huggingface.co/xyfJASON/ctrlora/resolve/main/ctrlora-basecn/ctrlora_sd15_basecn700k.ckpt")
    assert catalogue.download_url(catalogue.released_file("ctrlora-xl-base.safetensors")) is None


def test_every_pack_node_a_condition_names_exists_with_that_method():
    displays = pack.nodes.NODE_DISPLAY_NAME_MAPPINGS
    by_display = {name: pack.nodes.NODE_CLASS_MAPPINGS[key] for key, name in displays.items()}
    for condition, known in CONDITIONS.items():
        make = known["make"]
        if not make.startswith("CtrLoRA"):
            continue
        node_name, _, method = make.split(" (")[0].partition(" -> ")
        node = by_display.get(node_name)
        assert node is not None, f"{condition}: no node called {node_name!r}"
        if method:
            choices = node.INPUT_TYPES()["required"]["method"][0]
            assert method in choices, f"{condition}: {node_name} has no method {method!r}"


def test_load_ctrlora_says_what_a_released_file_expects(tmp_path):
    path = tmp_path / "ctrlora_sd15_basecn700k_palette_rank128_100kimgs_100ksteps.ckpt"
    path.write_bytes(b"stand-in")
    described = info.describe_lora(str(path), 128, 10)
    assert described["expects"] == "palette: use CtrLoRA Preprocess -> palette"
    assert described["released"] == ("released novel-condition LoRA, 100k images, 100k steps; "
                                      "recommended strength 1.0")
    canny = tmp_path / "ctrlora_sd15_basecn700k_canny_rank128.ckpt"
    canny.write_bytes(b"stand-in")
    assert "0.392" in info.describe_lora(str(canny), 128, 10)["expects"]


def test_load_ctrlora_shows_the_metadata_of_a_file_it_does_not_know(golden_files):
    (base,) = nodes.LoadBaseControlNet().load("base.ckpt")
    write_lora(base, golden_files / "my_sketches.safetensors", seed=3, metadata={
        "steps": 500, "base": "ctrlora_sd15_basecn700k.ckpt", "prompt_template": "a {name}", "train_config": "x" * 500})
    (described,) = nodes.LoadCtrLoRA().load(base, "my_sketches.safetensors")["ui"]["ctrlora_lora"]
    assert described["metadata"] == {"base": "ctrlora_sd15_basecn700k.ckpt", "prompt_template": "a {name}"}
    assert "released" not in described and "expects" not in described


def _workflow_files(workflow):
    """{loader widget value} for the base and LoRA loaders, and the files its training nodes write."""
    named, trained = set(), set()
    for node in workflow["nodes"]:
        if node["type"] in ("CtrLoRALoadBase", "CtrLoRALoad"):
            named.add(node["widgets_values"][0])
        if node["type"].startswith("CtrLoRATrain"):
            trained.add(f"{node['widgets_values'][2]}.safetensors")
    return named, trained


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json"))),
                         ids=os.path.basename)
def test_workflows_name_only_released_files_or_their_own_outputs(path):
    with open(path, encoding="utf-8") as f:
        workflow = json.load(f)
    named, trained = _workflow_files(workflow)
    for name in named - trained:
        node = next(n for n in workflow["nodes"] if (n.get("widgets_values") or [None])[0] == name)
        name, _, embedded = name.partition(":")  # '<base file>:<condition>': a condition built into an XL base
        entry = catalogue.released_file(name)
        assert entry is not None, f"{os.path.basename(path)} names {name}, which was never released"
        assert not embedded or embedded in entry.get("embedded", []), f"{name} has no built-in {embedded}"
        if embedded or catalogue.download_url(entry) is None:
            continue  # no download location is known (CtrLoRA-XL's page is not listed)
        # The frontend offers the download of a missing file from the node's model list.
        assert {"name": name, "url": catalogue.download_url(entry), "directory": "ctrlora"} in (
            node.get("properties", {}).get("models") or []), f"{name}: no download location on its node"
