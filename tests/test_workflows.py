"""Every workflow in workflows/ runs as shipped, on the real ComfyUI server, converted by the real frontend.

The model files each workflow names are full-size SD1.5-shaped stand-ins with random weights
(tests/sd15_standins.py), made once per session: the SD1.5 checkpoint (also under the community checkpoint's name),
the Base ControlNet and rank-128 LoRAs under the released file names; the SDXL workflow gets smaller SDXL-family
stand-ins (tests/sdxl_standins.py: a Segmind-Vega-shaped SDXL checkpoint and a CtrLoRA-XL base made from it); the
training workflows get a few generated pairs in the input folder. ComfyUI's page loads each UI workflow
(no missing nodes), the frontend's own ``app.graphToPrompt()`` makes the API prompt that 'Run' would queue, every
link is checked against /object_info, only resolution and step count are made small (64 px, 1 step) so that CPU
CI can afford it (training: 2 steps), and the prompt is queued for the page's client: it must finish with success
and write its image or LoRA, each Load CtrLoRA node must show what its file is, and each training node must have
drawn the run's loss curve from the real training events.
"""
import json
import os

import numpy as np
import pytest
from PIL import Image

import sd15_standins
import sdxl_standins
from ui_host import comfy_page, load_workflows, running_server

WORKFLOWS = load_workflows()
CHECKPOINTS = ("v1-5-pruned-emaonly.safetensors", "realisticVisionV60B1_v51VAE.safetensors")
BASE = "ctrlora_sd15_basecn700k.ckpt"
with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "ctrlora_core", "catalogue.json")) as f:
    RELEASED = json.load(f)["files"]
# {released LoRA the workflows name: (its condition, rank, number of keys) as Load CtrLoRA reports them}
LORAS = {entry["file"]: (entry["condition"], 128, 246) for entry in RELEASED
         if entry["kind"] == "lora" and any(entry["file"] in json.dumps(w) for w in WORKFLOWS.values())}
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
XL_BASE = "ctrlora-xl-base.safetensors"
# The canny condition built into the XL base stand-in: q/k/v of 7 transformer blocks x 2 attentions, A and B each.
LORAS[f"{XL_BASE}:canny"] = ("canny", sdxl_standins.ADAPTER_RANK, 84)
SIZE = 64  # px: an 8x8 latent
STEPS = 1
TRAIN_STEPS = 2
RUN_TIMEOUT = 600  # s; the first run loads ~3 GB of stand-ins on 2 CPU cores


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory):
    """{folder: {released file name: path}} of full-size random-weight stand-ins, written once per session."""
    folder = tmp_path_factory.mktemp("sd15_stand_ins")
    sd15 = sd15_standins.write_sd15_checkpoint(folder / "sd15.safetensors")
    files = {"checkpoints": {name: str(sd15) for name in CHECKPOINTS},
             "ctrlora": {BASE: str(sd15_standins.write_ctrlora_base(folder / "base.ckpt"))}}
    # SDXL-family stand-ins (a full-size SDXL does not fit CI): see tests/sdxl_standins.py.
    files["checkpoints"][SDXL_CHECKPOINT] = str(sdxl_standins.write_sdxl_checkpoint(folder / "sdxl.safetensors"))
    files["ctrlora"][XL_BASE] = str(sdxl_standins.write_ctrlora_xl_base(folder / XL_BASE))
    for seed, name in enumerate((n for n in LORAS if not n.startswith(XL_BASE)), start=10):
        files["ctrlora"][name] = str(sd15_standins.write_ctrlora_lora(folder / name, seed=seed))
    return files


@pytest.fixture(scope="module")
def dental_inputs(tmp_path_factory):
    """What the training workflows read from ComfyUI's input folder: a few pairs named for the prompt template
    (dental_pairs/source|target/<jaw>_<view>_<index>.png) and a new condition image (dental_condition.png)."""
    folder = tmp_path_factory.mktemp("dental_inputs")
    rng = np.random.default_rng(0)
    for i, (jaw, view) in enumerate([("upper", "front"), ("lower", "left"), ("upper", "top")]):
        for kind in ("source", "target"):
            (folder / "dental_pairs" / kind).mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "dental_pairs" / kind / f"{jaw}_{view}_{i:04d}.png")
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / "dental_condition.png")
    return {"dental_pairs": str(folder / "dental_pairs"), "dental_condition.png": str(folder / "dental_condition.png")}


@pytest.fixture(scope="module")
def server(tmp_path_factory, stand_ins, dental_inputs):
    with running_server(tmp_path_factory.mktemp("workflow_server"), models=stand_ins, inputs=dental_inputs) as server:
        yield server


@pytest.fixture(scope="module")
def comfy(server):
    with comfy_page(server) as comfy:
        yield comfy


def _linked_inputs(prompt):
    for node_id, node in prompt.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                yield node_id, node, name, value


def check_links(prompt, object_info):
    """Every node exists on the server and every link joins an output to an input of the same type."""
    problems = []
    for node_id, node in prompt.items():
        if node["class_type"] not in object_info:
            problems.append(f"node {node_id}: {node['class_type']} is not on the server")
    for node_id, node, name, (source, slot) in _linked_inputs(prompt):
        info = object_info.get(node["class_type"])
        source_info = object_info.get(prompt.get(source, {}).get("class_type"))
        if info is None or source_info is None:
            problems.append(f"node {node_id}.{name}: links to missing node {source}")
            continue
        spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}.get(name)
        wanted = spec[0] if spec else None
        given = source_info["output"][slot] if slot < len(source_info["output"]) else None
        if wanted != given and "*" not in (wanted, given):
            problems.append(f"node {node_id}.{name} wants {wanted}, gets {given} from {source}[{slot}]")
    return problems


def shrink(prompt):
    """The prompt at SIZE px and STEPS steps; all else as shipped."""
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] in ("EmptyLatentImage", "ImageScale"):
            for key in ("width", "height"):
                inputs[key] = min(inputs[key], SIZE)
        if "steps" in inputs and node["class_type"].startswith("KSampler"):
            inputs["steps"] = STEPS
        if node["class_type"] == "CtrLoRATrain":
            inputs.update(steps=TRAIN_STEPS, resolution=SIZE)
        elif node["class_type"].startswith("CtrLoRA") and "resolution" in inputs:  # the preprocessors' resize
            inputs["resolution"] = SIZE
    return prompt


def _of_type(prompt, class_type):
    return {k: v for k, v in prompt.items() if v["class_type"] == class_type}


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_runs_as_shipped(name, server, comfy):
    workflow = WORKFLOWS[name]
    assert comfy.load_workflow(workflow) == [], f"{name}: node types the page does not know"
    assert comfy.dialogs() == [], f"{name}: dialogs on load (missing nodes or models?)"

    prompt = comfy.graph_to_prompt()
    shown = {n["type"] for n in workflow["nodes"] if n["type"] not in ("Note", "MarkdownNote")}
    assert {n["class_type"] for n in prompt.values()} == shown
    assert check_links(prompt, server.object_info) == []

    prompt_id = server.queue(shrink(prompt), client_id=comfy.client_id)
    entry = server.wait(prompt_id, RUN_TIMEOUT)
    status = entry["status"]
    assert status["status_str"] == "success", server.explain(f"{name} failed: {json.dumps(status['messages'])}")

    saves = _of_type(prompt, "SaveImage")
    trainers = _of_type(prompt, "CtrLoRATrain")
    assert saves or trainers, f"{name} saves nothing"
    for node_id in saves:
        for image in entry["outputs"][node_id]["images"]:
            with Image.open(server.output_dir / image["subfolder"] / image["filename"]) as saved:
                assert saved.size == (SIZE, SIZE)

    # Load CtrLoRA reports its file; the page draws that on the node.
    for node_id, node in _of_type(prompt, "CtrLoRALoad").items():
        info = entry["outputs"][node_id]["ctrlora_lora"][0]
        lora_name = node["inputs"]["lora_name"]
        condition, rank, keys = LORAS[lora_name]
        assert info == {**info, "file": lora_name, "condition": condition, "rank": rank, "keys": keys}
        comfy.page.wait_for_function(
            "(id) => window.app.graph.getNodeById(id)?.widgets?.some((w) => w.name === 'ctrlora_info' && w.value)",
            arg=int(node_id), timeout=10_000)
        shown_text = comfy.evaluate(
            "(id) => window.app.graph.getNodeById(id).widgets.find((w) => w.name === 'ctrlora_info').value",
            int(node_id))
        assert f"{condition} · rank {rank}" in shown_text and f"{keys} keys" in shown_text
        assert f"Condition image: {condition}: use " in shown_text  # what the released file expects
    # Training writes its LoRA, reports, and the page drew the run's loss curve from the real events.
    for node_id, node in trainers.items():
        written = f"{node['inputs']['output_name']}.safetensors"
        assert list(server.root.glob(f"**/ctrlora/{written}")), f"{written} not written in a models/ctrlora/"
        assert written in entry["outputs"][node_id]["text"][0]
        chart = comfy.evaluate("""(id) => {
            const w = window.app.graph.getNodeById(id).widgets.find((w) => w.name === 'ctrlora_loss');
            return {steps: [w.train.count, w.train.first?.[0], w.train.last?.[0]], status: w.status, header: w.value};
        }""", int(node_id))
        assert chart["steps"] == [TRAIN_STEPS, 1, TRAIN_STEPS] and chart["status"] == "done", chart
        assert chart["header"].startswith(f"step {TRAIN_STEPS}/{TRAIN_STEPS}")
    comfy.fit_view(type_prefix="CtrLoRA")
    comfy.screenshot(f"workflow-run-{os.path.splitext(name)[0]}.png")
