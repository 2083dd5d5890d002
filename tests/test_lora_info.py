"""What Load CtrLoRA reports about its file for the page (condition, rank, keys, size, training)."""
import pytest

from conftest import pack
from helpers import nodes, write_lora

info = pack.ctrlora_core.info


@pytest.mark.parametrize("name,condition,images,steps", [
    ("ctrlora_sd15_basecn700k_canny_rank128.ckpt", "canny", None, None),
    ("ctrlora_sd15_basecn700k_lineart_rank128_1kimgs_1ksteps.ckpt", "lineart", "1k", "1k"),
    ("ctrlora_sd15_basecn700k_palette_rank128_1kimgs_1ksteps.ckpt", "palette", "1k", "1k"),
    ("ctrlora_sd15_basecn700k_depth.ckpt", "depth", None, None),
    ("ctrlora_sd15_basecn700k_lineart_anime_rank128.ckpt", "lineart_anime", None, None),
    ("dental_lighting.safetensors", "dental_lighting", None, None),
])
def test_condition_name_from_the_file_name(name, condition, images, steps):
    parsed = info.parse_name(name)
    assert (parsed["condition"], parsed["images"], parsed["steps"]) == (condition, images, steps)


def test_load_ctrlora_returns_the_condition_and_a_description_for_the_ui(golden_files):
    (base,) = nodes.LoadBaseControlNet().load("base.ckpt")
    out = nodes.LoadCtrLoRA().load(base, "lora0.ckpt")
    condition = out["result"][0]
    assert isinstance(condition, pack.ctrlora_core.Condition)
    (described,) = out["ui"]["ctrlora_lora"]
    assert described == {"file": "lora0.ckpt", "condition": "lora0", "rank": condition.adapter.rank,
                         "keys": len(condition.adapter.names), "size_bytes": (golden_files / "lora0.ckpt").stat().st_size}


def test_a_trained_safetensors_file_reports_its_steps_and_pairs(golden_files):
    (base,) = nodes.LoadBaseControlNet().load("base.ckpt")
    path = golden_files / "dental.safetensors"
    write_lora(base, path, seed=3)
    # What the trainer records (training/loop.py lora_metadata), written next to the tensors.
    tensors = pack.ctrlora_core.checkpoint.load_state_dict(str(path))
    path.unlink()
    pack.ctrlora_core.checkpoint.save_lora_file(tensors, str(path), {"steps": 1000, "dataset_size": 2000})
    (described,) = nodes.LoadCtrLoRA().load(base, "dental.safetensors")["ui"]["ctrlora_lora"]
    assert described["condition"] == "dental" and described["trained"] == "1000 steps on 2000 pairs"
