"""The pack in the real ComfyUI page (headless Chromium from the system's packages, driven by Playwright).

One ComfyUI server with the pack for the module: the released model file names exist as empty placeholders (so the
workflows find their files), the golden tiny base and LoRA and the test-only tiny-model pack let a graph really
run. Each check leaves a screenshot in tests/artifacts/.
"""
import copy
import os
import shutil

import pytest

from test_server import NODES, PACK_LINK, graph as tiny_graph
from tiny import GOLDEN
from ui_host import EXTENSION_URL, comfy_page, load_workflows, running_server

WORKFLOWS = load_workflows()
PLACEHOLDERS = {
    "checkpoints": ["v1-5-pruned-emaonly.safetensors", "realisticVisionV60B1_v51VAE.safetensors"],
    "ctrlora": ["ctrlora_sd15_basecn700k.ckpt", "ctrlora_sd15_basecn700k_canny_rank128.ckpt",
                "ctrlora_sd15_basecn700k_lineart_rank128_1kimgs_1ksteps.ckpt",
                "ctrlora_sd15_basecn700k_palette_rank128_1kimgs_1ksteps.ckpt"],
}
TRAIN_EVENT = "ctrlora.train.progress"
SEARCHABLE = {**NODES, "CtrLoRATrain": "Train CtrLoRA"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    golden = tmp_path_factory.mktemp("golden")
    for name in ("base.ckpt", "lora0.ckpt"):
        shutil.copy(os.path.join(GOLDEN, name), golden / name)
    models = {folder: {name: None for name in names} for folder, names in PLACEHOLDERS.items()}
    models["ctrlora"].update({name: str(golden / name) for name in ("base.ckpt", "lora0.ckpt")})
    with running_server(tmp_path_factory.mktemp("ui_server"), models=models, fixtures=True) as server:
        yield server


@pytest.fixture(scope="module")
def comfy(server):
    with comfy_page(server) as comfy:
        yield comfy


@pytest.fixture
def blank(comfy):
    """The page with an empty graph and no dialog open."""
    comfy.close_dialogs()
    comfy.evaluate("() => window.app.graph.clear()")
    return comfy


def _node_widget_value(comfy, node_id, widget):
    return comfy.evaluate("([id, name]) => window.app.graph.getNodeById(id)?.widgets?.find((w) => w.name === name)"
                          "?.value ?? null", [node_id, widget])


def test_the_pack_javascript_loads_without_errors_of_its_own(server, comfy):
    status, content_type, body = server.fetch_bytes(EXTENSION_URL + "ctrlora.js")
    assert status == 200 and "javascript" in content_type and b"registerExtension" in body
    extensions = comfy.evaluate("() => window.app.extensions.map((e) => e.name)")
    assert "ctrlora.ui" in extensions
    comfy.screenshot("ui-page-loaded.png")
    assert comfy.own_console_errors() == []


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_each_workflow_loads_into_the_canvas_without_missing_nodes(name, comfy):
    comfy.close_dialogs()
    workflow = WORKFLOWS[name]
    assert comfy.load_workflow(workflow) == []
    assert comfy.dialogs() == [], "a dialog opened on load (missing nodes or models?)"
    loaded = comfy.evaluate("() => window.app.graph.nodes.map((n) => n.type)")
    assert sorted(loaded) == sorted(n["type"] for n in workflow["nodes"])
    # Every model file the workflow names is in the models folders: no hint on our loaders.
    hints = comfy.evaluate("() => window.app.graph.nodes.flatMap((n) => (n.widgets ?? [])"
                           ".filter((w) => w.name === 'ctrlora_notice' && w.value).map((w) => w.value))")
    assert hints == []
    comfy.fit_view()
    comfy.screenshot(f"ui-workflow-{os.path.splitext(name)[0]}.png")


@pytest.mark.parametrize("node_type", sorted(SEARCHABLE))
def test_the_pack_nodes_can_be_added_from_the_node_search(node_type, blank):
    page = blank.page
    box = page.locator("#graph-canvas").bounding_box()
    search = page.get_by_placeholder("Search Nodes...")
    for attempt in range(3):  # a double click on empty canvas opens the search box
        page.mouse.dblclick(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2 + 40 * attempt)
        try:
            search.wait_for(timeout=3_000)
            break
        except Exception:
            if attempt == 2:
                raise
    search.fill(SEARCHABLE[node_type])
    option = page.get_by_role("option").filter(has_text=SEARCHABLE[node_type]).first
    option.wait_for(timeout=10_000)
    blank.screenshot(f"ui-search-{node_type}.png")
    option.click()
    page.wait_for_function("(type) => window.app.graph.nodes.some((n) => n.type === type)", arg=node_type,
                           timeout=10_000)
    added = blank.evaluate("() => window.app.graph.nodes.map((n) => n.type)")
    assert added == [node_type]


def _dispatch(comfy, detail):
    comfy.evaluate("([type, detail]) => window.comfyAPI.api.api.dispatchCustomEvent(type, detail)",
                   [TRAIN_EVENT, detail])


def test_the_training_node_draws_the_loss_curve_from_training_events(blank):
    """Events as Train CtrLoRA sends them (training/progress.py), dispatched in the page; tests/test_workflows.py
    checks the curve of real training runs."""
    node_type = "CtrLoRATrain"
    node_id = blank.evaluate("""(type) => {
        const node = LiteGraph.createNode(type);
        node.pos = [200, 150];
        window.app.graph.add(node);
        return node.id;
    }""", node_type)
    assert _node_widget_value(blank, node_id, "ctrlora_loss") is not None, "no loss chart on the training node"
    base = {"node": str(node_id), "output": "dental", "prompt_id": "fake-run"}
    _dispatch(blank, {**base, "phase": "encode", "status": "running", "step": 4, "total": 8})
    assert _node_widget_value(blank, node_id, "ctrlora_loss").startswith("Encoding pairs 4/8")
    losses = [[step, 0.2 * 0.97 ** step + 0.01 * (step % 3)] for step in range(1, 121)]
    _dispatch(blank, {**base, "phase": "train", "status": "running", "step": 0, "total": 120, "losses": []})
    for chunk in range(0, 120, 40):
        part = losses[chunk:chunk + 40]
        _dispatch(blank, {**base, "phase": "train", "status": "running", "step": part[-1][0], "total": 120,
                          "loss": part[-1][1], "losses": part, "steps_per_s": 3.5})
    header = _node_widget_value(blank, node_id, "ctrlora_loss")
    assert header.startswith("step 120/120  loss ") and "3.50 steps/s" in header
    _dispatch(blank, {**base, "phase": "train", "status": "done", "step": 120, "total": 120, "losses": []})
    chart = blank.evaluate("""(id) => {
        const w = window.app.graph.getNodeById(id).widgets.find((w) => w.name === 'ctrlora_loss');
        return {points: w.points.length, header: w.value, first: w.points[0], last: w.points[w.points.length - 1]};
    }""", node_id)
    assert chart["points"] == 120 and chart["header"].endswith("(done)")
    assert chart["first"] == losses[0] and chart["last"] == losses[-1]
    # The curve is drawn: the chart's line colour is on the node in the screenshot.
    box = blank.fit_view(type_prefix=node_type)
    path = blank.screenshot("ui-training-loss-curve.png", clip=box)
    from PIL import Image
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        line = sum(1 for r, g, b in rgb.getdata() if b > 200 and 140 < g < 200 and 80 < r < 140)
    assert line > 100, f"only {line} pixels of the loss curve's colour in {path}"


def _run_in_page(comfy, server, api_graph, name):
    """Loads an API graph into the page, queues the frontend's prompt of it for the page, waits for the end."""
    comfy.close_dialogs()
    comfy.evaluate("([graph, name]) => window.app.loadApiJson(graph, name)", [api_graph, name])
    prompt = comfy.graph_to_prompt()
    entry = server.wait(server.queue(prompt, client_id=comfy.client_id), 120)
    comfy.page.wait_for_timeout(500)
    return entry


def test_load_ctrlora_shows_what_its_file_is_after_a_run(server, comfy):
    entry = _run_in_page(comfy, server, tiny_graph(), "tiny")
    assert entry["status"]["status_str"] == "success", server.explain(str(entry["status"]))
    comfy.page.wait_for_function(
        "() => window.app.graph.getNodeById(3)?.widgets?.some((w) => w.name === 'ctrlora_info' && w.value)",
        timeout=10_000)
    text = _node_widget_value(comfy, 3, "ctrlora_info")
    described = entry["outputs"]["3"]["ctrlora_lora"][0]
    assert text.splitlines()[0] == f"lora0 · rank {described['rank']}"
    assert f"{described['keys']} keys" in text
    box = comfy.fit_view(type_prefix="CtrLoRALoad", padding=60)
    comfy.screenshot("ui-lora-info.png", clip=box)


def test_an_error_from_a_pack_node_is_shown_on_that_node(server, comfy):
    entry = _run_in_page(comfy, server, tiny_graph(lora_name="base.ckpt"), "tiny-error")
    assert entry["status"]["status_str"] == "error"
    comfy.page.wait_for_function(
        "() => window.app.graph.getNodeById(3)?.widgets?.some((w) => w.name === 'ctrlora_notice' && w.value)",
        timeout=10_000)
    text = _node_widget_value(comfy, 3, "ctrlora_notice")
    assert text.startswith("Error: base.ckpt is a CtrLoRA base ControlNet, not a condition LoRA")
    comfy.close_dialogs()
    box = comfy.fit_view(type_prefix="CtrLoRALoad", padding=60)
    comfy.screenshot("ui-node-error.png", clip=box)
    # The next run clears it.
    entry = _run_in_page(comfy, server, tiny_graph(), "tiny")
    assert entry["status"]["status_str"] == "success"
    assert not _node_widget_value(comfy, 3, "ctrlora_notice")


def test_a_model_file_missing_from_the_models_folder_is_named_on_the_node(comfy):
    comfy.close_dialogs()
    name = "ctrlora-1-canny-sd15.json"
    workflow = copy.deepcopy(WORKFLOWS[name])
    loader = next(n for n in workflow["nodes"] if n["type"] == "CtrLoRALoad")
    loader["widgets_values"][0] = "ctrlora_sd15_basecn700k_depth_rank128.ckpt"
    assert comfy.load_workflow(workflow) == []
    text = _node_widget_value(comfy, loader["id"], "ctrlora_notice")
    assert text.startswith("Missing file: this one is not in models/ctrlora/")
    assert "huggingface.co/xyfJASON/ctrlora" in text
    box = comfy.fit_view(type_prefix="CtrLoRALoad", padding=60)
    comfy.screenshot("ui-missing-model-file.png", clip=box)


def test_the_workflows_are_in_the_template_browser(server, blank):
    assert sorted(server.get("/workflow_templates")[PACK_LINK]) == sorted(os.path.splitext(n)[0] for n in WORKFLOWS)
    page = blank.page
    page.get_by_text("Templates", exact=True).first.click()
    page.get_by_text(PACK_LINK, exact=True).first.click()
    for name in WORKFLOWS:
        page.locator(f"[data-testid='template-workflow-{os.path.splitext(name)[0]}']").wait_for(timeout=15_000)
    # Each card shows its thumbnail (the same-name .jpg, fetched by the page).
    page.wait_for_function("""(names) => names.every((name) => {
        const img = document.querySelector(`[data-testid='template-workflow-${name}'] img`);
        return img && img.complete && img.naturalWidth > 0;
    })""", arg=[os.path.splitext(n)[0] for n in WORKFLOWS], timeout=15_000)
    blank.screenshot("ui-template-browser.png")
    first = sorted(WORKFLOWS)[0]
    page.locator(f"[data-testid='template-workflow-{os.path.splitext(first)[0]}']").click()
    page.wait_for_function("() => window.app.graph.nodes.some((n) => n.type === 'CtrLoRAApply')", timeout=15_000)
    loaded = blank.evaluate("() => window.app.graph.nodes.map((n) => n.type)")
    assert sorted(loaded) == sorted(n["type"] for n in WORKFLOWS[first]["nodes"])
    blank.screenshot("ui-template-opened.png")


def test_no_console_error_from_the_pack_during_the_session(comfy):
    assert comfy.own_console_errors() == []
