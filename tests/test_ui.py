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
from tiny import DATA, GOLDEN
from ui_host import EXTENSION_URL, comfy_page, load_workflows, running_server

WORKFLOWS = load_workflows()
LOADER_FOLDERS = {"CheckpointLoaderSimple": "checkpoints", "CtrLoRALoadBase": "ctrlora", "CtrLoRALoad": "ctrlora"}
# Every file the workflows' loaders name ('<XL base>:<condition>' is a condition inside the base file).
PLACEHOLDERS = {folder: sorted({node["widgets_values"][0] for workflow in WORKFLOWS.values()
                                for node in workflow["nodes"] if LOADER_FOLDERS.get(node["type"]) == folder
                                and ":" not in node["widgets_values"][0]})
                for folder in ("checkpoints", "ctrlora")}
TRAIN_EVENT = "ctrlora.train.progress"
SEARCHABLE = {**NODES, "CtrLoRATrain": "Train CtrLoRA"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    golden = tmp_path_factory.mktemp("golden")
    for name in ("base.ckpt", "lora0.ckpt"):
        shutil.copy(os.path.join(GOLDEN, name), golden / name)
    models = {folder: {name: None for name in names} for folder, names in PLACEHOLDERS.items()}
    models["ctrlora"].update({name: str(golden / name) for name in ("base.ckpt", "lora0.ckpt")})
    # A real CtrLoRA-XL base file, so that Load CtrLoRA lists its built-in conditions ('<XL base>:canny').
    models["ctrlora"]["ctrlora-xl-base.safetensors"] = os.path.join(DATA, "golden_xl_tiny", "base.safetensors")
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
    # The search dialog's text combobox (its node preview has widget comboboxes), as in both search boxes (v1, v2).
    search = page.get_by_role("search").locator("input[role='combobox']")
    for attempt in range(3):  # a double click on empty canvas opens the search box
        page.mouse.dblclick(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2 + 40 * attempt)
        try:
            search.wait_for(timeout=3_000)
            break
        except Exception:
            if attempt == 2:
                raise
    search.fill(SEARCHABLE[node_type])
    results = page.locator(f"[id='{search.get_attribute('aria-controls')}']")  # the listbox the combobox names
    option = results.get_by_role("option").filter(has_text=SEARCHABLE[node_type]).first
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


def _add_training_node(comfy):
    return comfy.evaluate("""() => {
        const node = LiteGraph.createNode('CtrLoRATrain');
        node.pos = [200, 150];
        window.app.graph.add(node);
        return node.id;
    }""")


# The chart's state, read from the node's widget (``path``: root node id, then ids inside nested subgraphs).
CHART_STATE = """(path) => {
    let node = null;
    for (const id of path) node = (node ? node.subgraph : window.app.graph).getNodeById(id);
    const w = node.widgets.find((w) => w.name === 'ctrlora_loss');
    const series = (s) => ({count: s.count, nonFinite: s.nonFinite, first: s.first, last: s.last, lo: s.lo, hi: s.hi,
                            buckets: s.buckets.filter(Boolean).length});
    return {header: w.value, status: w.status, step: w.step, skipped: w.skipped, train: series(w.train),
            val: series(w.val), legend: w.legend().map((item) => item.text)};
}"""


def _colour_pixels(path, colour, tolerance=30):
    from PIL import Image
    with Image.open(path) as image:
        return sum(1 for pixel in image.convert("RGB").getdata()
                   if all(abs(a - b) <= tolerance for a, b in zip(pixel, colour)))


TRAIN_BLUE, VAL_ORANGE, NON_FINITE_RED = (111, 179, 255), (255, 160, 64), (255, 59, 59)


def test_the_training_node_draws_the_loss_curve_from_training_events(blank):
    """Events as Train CtrLoRA sends them (training/progress.py, protocol v2 in docs), dispatched in the page;
    tests/test_workflows.py checks the curve of real training runs."""
    node_id = _add_training_node(blank)
    assert _node_widget_value(blank, node_id, "ctrlora_loss") is not None, "no loss chart on the training node"
    base = {"node": str(node_id), "output": "dental", "prompt_id": "fake-run"}
    _dispatch(blank, {**base, "phase": "encode", "status": "running", "step": 4, "total": 8})
    assert _node_widget_value(blank, node_id, "ctrlora_loss").startswith("Encoding pairs 4/8")
    losses = [[step, 0.2 * 0.97 ** step + 0.01 * (step % 3)] for step in range(1, 121)]
    losses[59][1] = None  # a non-finite loss (JSON null) at step 60
    validation = [[step, 0.15 * 0.98 ** step + 0.02] for step in range(20, 121, 20)]
    _dispatch(blank, {**base, "phase": "train", "status": "running", "step": 0, "total": 120, "losses": []})
    for chunk in range(0, 120, 40):
        part = losses[chunk:chunk + 40]
        _dispatch(blank, {**base, "phase": "train", "status": "running", "step": part[-1][0], "total": 120,
                          "loss": part[-1][1], "losses": part, "steps_per_s": 3.5, "skipped_steps": 2,
                          "val_losses": [p for p in validation if part[0][0] <= p[0] <= part[-1][0]]})
    header = _node_widget_value(blank, node_id, "ctrlora_loss")
    assert header.startswith("step 120/120  loss ") and "3.50 steps/s" in header
    _dispatch(blank, {**base, "phase": "train", "status": "done", "step": 120, "total": 120, "losses": []})
    chart = blank.evaluate(CHART_STATE, [node_id])
    assert chart["header"].endswith("(done)")
    assert chart["train"]["count"] == 120 and chart["train"]["nonFinite"] == 1 and chart["train"]["buckets"] == 120
    assert chart["train"]["first"] == losses[0] and chart["train"]["last"] == losses[-1]
    finite = [v for _, v in losses if v is not None]
    assert (chart["train"]["lo"], chart["train"]["hi"]) == (min(finite), max(finite))
    assert chart["val"]["count"] == len(validation) and chart["val"]["last"] == validation[-1]
    assert chart["legend"] == ["train", f"val {validation[-1][1]:.4f}", "non-finite 1", "skipped 2"]
    # Drawn: the training curve's blue, the validation curve's orange and the red mark of step 60.
    box = blank.fit_view(type_prefix="CtrLoRATrain")
    path = blank.screenshot("ui-training-loss-curve.png", clip=box)
    for name, colour, least in (("training", TRAIN_BLUE, 100), ("validation", VAL_ORANGE, 40),
                                ("non-finite mark", NON_FINITE_RED, 15)):
        found = _colour_pixels(path, colour)
        assert found > least, f"only {found} pixels of the {name} colour {colour} in {path}"
    # Queued again with the same settings: the file is reused, not trained again, and the node says so.
    _dispatch(blank, {**base, "prompt_id": "fake-run-2", "phase": "train", "status": "reused", "step": 120,
                      "total": 120})
    chart = blank.evaluate(CHART_STATE, [node_id])
    assert chart["header"] == "reused dental: trained before with these settings" and chart["train"]["count"] == 0


MILLION_FEED_BUDGET_S = 3.0  # all 4,000 events of a 1,000,000-step run through the page's event listener
DRAW_BUDGET_MS = 16.0  # one chart draw, within a 60 Hz frame


def test_the_loss_chart_stays_fast_and_exact_for_a_million_step_run(blank):
    """1,000,000 steps in 4,000 events of 250 points (the rate of a fast run at one event per 0.25 s), with a
    validation point every 1,000 steps, four non-finite training losses and one non-finite validation loss."""
    node_id = _add_training_node(blank)
    result = blank.evaluate("""async ([nodeId, total, chunk]) => {
        const api = window.comfyAPI.api.api;
        const base = {node: String(nodeId), prompt_id: 'million', output: 'million', phase: 'train'};
        const nonFinite = new Set([1, 123457, 500000, 999999]);
        const loss = (s) => 0.05 + 0.1 * Math.exp(-s / 200000) + 0.02 * ((s * 7919) % 1000) / 1000;
        let lo = Infinity, hi = -Infinity, feeding = 0;
        const send = (detail) => {
            const t = performance.now();
            api.dispatchCustomEvent('ctrlora.train.progress', detail);
            feeding += performance.now() - t;
        };
        send({...base, status: 'running', step: 0, total, losses: []});
        for (let start = 1; start <= total; start += chunk) {
            const losses = [], val = [];
            for (let s = start; s < start + chunk && s <= total; s++) {
                const v = nonFinite.has(s) ? null : loss(s);
                if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
                losses.push([s, v]);
                if (s % 1000 === 0) val.push([s, s === 250000 ? null : 0.08 + 0.05 * Math.exp(-s / 300000)]);
            }
            const [step, last] = losses[losses.length - 1];
            send({...base, status: 'running', step, total, loss: last, losses, val_losses: val, skipped_steps: 7,
                  steps_per_s: 1000});
        }
        send({...base, status: 'done', step: total, total, losses: []});
        const node = window.app.graph.getNodeById(nodeId);
        const chart = node.widgets.find((w) => w.name === 'ctrlora_loss');
        const ctx = document.createElement('canvas').getContext('2d');
        const t = performance.now();
        for (let i = 0; i < 20; i++) chart.draw(ctx, node, node.size[0], 0);
        const drawing = (performance.now() - t) / 20;
        const marked = [...nonFinite].map((s) => chart.train.buckets.find((b) => b && b.first <= s && s <= b.last)?.nonFinite ?? 0);
        return {feeding, drawing, lo, hi, marked, bucketWidth: chart.train.width,
                valMarked: chart.val.buckets.find((b) => b && b.first <= 250000 && 250000 <= b.last)?.nonFinite ?? 0};
    }""", [node_id, 1_000_000, 250])
    chart = blank.evaluate(CHART_STATE, [node_id])
    print(f"1,000,000-step run: fed in {result['feeding']:.0f} ms, one draw {result['drawing']:.2f} ms, "
          f"{chart['train']['buckets']} buckets of {result['bucketWidth']} steps")
    assert result["feeding"] < MILLION_FEED_BUDGET_S * 1000, result
    assert result["drawing"] < DRAW_BUDGET_MS, result
    train, val = chart["train"], chart["val"]
    assert train["count"] == 1_000_000 and train["nonFinite"] == 4 and train["buckets"] <= 512
    assert (train["lo"], train["hi"]) == (result["lo"], result["hi"])
    assert train["last"][0] == 1_000_000 and chart["header"].startswith("step 1000000/1000000") \
        and chart["header"].endswith("(done)")
    assert result["marked"] == [1, 1, 1, 1], "each non-finite step is marked in the bucket that holds it"
    assert val["count"] == 1000 and val["nonFinite"] == 1 and result["valMarked"] == 1
    assert chart["legend"][2:] == ["non-finite 5", "skipped 7"]
    box = blank.fit_view(type_prefix="CtrLoRATrain")
    path = blank.screenshot("ui-training-million-steps.png", clip=box)
    assert _colour_pixels(path, NON_FINITE_RED) > 15 and _colour_pixels(path, VAL_ORANGE) > 40


def test_a_training_node_inside_a_subgraph_draws_its_events(blank):
    """Inside a subgraph the server names the node by its path ("12:5"); the id comes from the prompt the frontend
    itself makes of the graph."""
    ids = blank.evaluate("""async () => {
        const graph = window.app.graph;
        const node = LiteGraph.createNode('CtrLoRATrain');
        node.pos = [200, 150];
        graph.add(node);
        const holder = graph.convertToSubgraph(new Set([node])).node;
        const inner = holder.subgraph.nodes.find((n) => n.type === 'CtrLoRATrain');
        const prompt = (await window.app.graphToPrompt()).output;
        return {holder: holder.id, inner: inner.id,
                executionIds: Object.keys(prompt).filter((id) => prompt[id].class_type === 'CtrLoRATrain')};
    }""")
    [execution_id] = ids["executionIds"]
    assert execution_id == f"{ids['holder']}:{ids['inner']}", ids
    _dispatch(blank, {"node": execution_id, "prompt_id": "sub", "phase": "train", "status": "running", "step": 3,
                      "total": 10, "loss": 0.25, "losses": [[1, 0.3], [2, 0.27], [3, 0.25]]})
    chart = blank.evaluate(CHART_STATE, [ids["holder"], ids["inner"]])
    assert chart["header"].startswith("step 3/10  loss 0.2500") and chart["train"]["count"] == 3
    _dispatch(blank, {"node": execution_id, "prompt_id": "sub", "phase": "train", "status": "cancelled", "step": 3,
                      "total": 10, "losses": []})
    assert blank.evaluate(CHART_STATE, [ids["holder"], ids["inner"]])["header"].endswith("(cancelled)")
    blank.evaluate("([a]) => window.app.canvas.setGraph(window.app.graph.getNodeById(a).subgraph)", [ids["holder"]])
    try:
        blank.page.wait_for_timeout(300)
        blank.screenshot("ui-training-in-subgraph.png")
    finally:
        blank.evaluate("() => window.app.canvas.setGraph(window.app.graph)")


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


def test_a_warning_from_a_pack_node_is_shown_on_it_until_the_next_run(server, comfy):
    foreign = tiny_graph()  # ComfyUI's VAE Encode instead of VAE Condition Encode: it runs, Apply CtrLoRA warns
    foreign["5"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["1", 3]}}
    entry = _run_in_page(comfy, server, foreign, "tiny-vae-encode")
    assert entry["status"]["status_str"] == "success", server.explain(str(entry["status"]))
    comfy.page.wait_for_function(
        "() => (window.app.graph.getNodeById(6)?.widgets?.find((w) => w.name === 'ctrlora_notice')?.value ?? '')"
        ".startsWith('Warning: Apply CtrLoRA (lora0.ckpt): its condition latent does not come from VAE Condition')",
        timeout=10_000)
    comfy.screenshot("ui-node-warning.png", clip=comfy.fit_view(type_prefix="CtrLoRAApply", padding=60))
    # The next run, with VAE Condition Encode's latent, clears it from the same node and adds nothing.
    entry = server.wait(server.queue(tiny_graph(), client_id=comfy.client_id), 120)
    assert entry["status"]["status_str"] == "success"
    comfy.page.wait_for_timeout(500)
    assert not _node_widget_value(comfy, 6, "ctrlora_notice")


def _canny_workflow_missing_a_lora():
    """(the canny workflow with its Load CtrLoRA naming a released file the models folder lacks, that loader)."""
    workflow = copy.deepcopy(WORKFLOWS["ctrlora-1-canny-sd15.json"])
    loader = next(n for n in workflow["nodes"] if n["type"] == "CtrLoRALoad")
    loader["widgets_values"][0] = "ctrlora_sd15_basecn700k_depth_rank128.ckpt"
    return workflow, loader


def test_a_model_file_missing_from_the_models_folder_is_named_on_the_node(comfy):
    comfy.close_dialogs()
    workflow, loader = _canny_workflow_missing_a_lora()
    assert comfy.load_workflow(workflow) == []
    text = _node_widget_value(comfy, loader["id"], "ctrlora_notice")
    assert text.startswith("Missing file: this one is not in models/ctrlora/")
    assert "huggingface.co/xyfJASON/ctrlora" in text
    box = comfy.fit_view(type_prefix="CtrLoRALoad", padding=60)
    comfy.screenshot("ui-missing-model-file.png", clip=box)


def test_a_condition_missing_from_the_xl_base_file_is_named_on_the_node(comfy):
    comfy.close_dialogs()
    workflow = copy.deepcopy(WORKFLOWS["ctrlora-8-canny-sdxl.json"])
    loader = next(n for n in workflow["nodes"] if n["type"] == "CtrLoRALoad")
    loader["widgets_values"][0] = "ctrlora-xl-base.safetensors:lotus_normal"
    assert comfy.load_workflow(workflow) == []
    text = _node_widget_value(comfy, loader["id"], "ctrlora_notice")
    assert text.startswith("Missing condition: no ctrlora-xl-base.safetensors with a built-in 'lotus_normal' in ")
    assert "huggingface.co/Savlim/CtrLoRA-XL" in text


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


# The frontend's node rendering setting: the classic canvas, or Nodes 2.0 (Vue nodes, each widget of ours drawn into
# a canvas of its own).
RENDERINGS = {"classic": False, "nodes-2.0": True}
PANEL_BORDERS = {"info": (74, 127, 184), "error": (208, 64, 64), "hint": (208, 160, 48)}  # web/ctrlora.js TONES


@pytest.fixture(params=sorted(RENDERINGS))
def rendering(request, server, comfy):
    switch = "(on) => window.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', on)"
    comfy.evaluate(switch, RENDERINGS[request.param])
    comfy.close_dialogs()
    comfy.evaluate("() => window.app.graph.clear()")
    comfy.page.wait_for_timeout(500)
    yield request.param
    comfy.evaluate(switch, False)


def _pixels(path):
    from PIL import Image
    with Image.open(path) as image:
        return image.convert("RGB").tobytes()


def _lay_out(comfy, rendering):
    """Spreads out the nodes of a graph loaded from API JSON (which has no positions); Nodes 2.0 is switched off and
    on to place its DOM nodes afresh (older frontends do not move them with the canvas positions)."""
    comfy.evaluate("() => window.app.graph.arrange()")
    if RENDERINGS[rendering]:
        for on in (False, True):
            comfy.evaluate("(on) => window.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', on)", on)
            comfy.page.wait_for_timeout(300)


def _shot(comfy, rendering, name, type_prefix):
    box = comfy.fit_view(type_prefix=type_prefix, padding=30)
    comfy.page.wait_for_timeout(500)
    return comfy.screenshot(f"ui-{rendering}-{name}.png", clip=box)


def test_the_extension_shows_and_updates_in_both_node_renderings(rendering, server, comfy):
    """Loss chart and step counter, the training node's preview and report, LoRA info, an error and a missing-file
    message: drawn and updated in the classic canvas and in Nodes 2.0 (checked on the screenshots' pixels)."""
    node_id = _add_training_node(comfy)
    run = {"node": str(node_id), "output": "dental", "prompt_id": f"run-{rendering}", "phase": "train", "total": 200}
    losses = [[step, 0.2 * 0.99 ** step] for step in range(1, 201)]
    _dispatch(comfy, {**run, "status": "running", "step": 20, "loss": losses[19][1], "losses": losses[:20]})
    early = _shot(comfy, rendering, "training-step-20", "CtrLoRATrain")
    _dispatch(comfy, {**run, "status": "running", "step": 200, "loss": losses[-1][1], "losses": losses[20:]})
    late = _shot(comfy, rendering, "training-step-200", "CtrLoRATrain")
    assert _node_widget_value(comfy, node_id, "ctrlora_loss").startswith("step 200/200")
    assert _colour_pixels(early, TRAIN_BLUE) > 40 and _colour_pixels(late, TRAIN_BLUE) > 40, (early, late)
    assert _pixels(early) != _pixels(late), f"the chart was not redrawn: {early} and {late} are the same"
    # The run's end: the preview grid (ComfyUI's images output) and the report panel on the node.
    comfy.evaluate("""([id, prompt]) => window.comfyAPI.api.api.dispatchCustomEvent('executed', {node: String(id),
        display_node: String(id), prompt_id: prompt, output: {text: ['trained dental: 200 steps'],
        images: [{filename: 'example.png', subfolder: '', type: 'input'}]}})""", [node_id, run["prompt_id"]])
    comfy.page.wait_for_function("""(id) => {
        const node = window.app.graph.getNodeById(id);
        const img = document.querySelector(`[data-node-id="${id}"] img`) ?? node.imgs?.[0];
        return img?.complete && img.naturalWidth > 0;
    }""", arg=node_id, timeout=10_000)
    assert _node_widget_value(comfy, node_id, "ctrlora_info") == "trained dental: 200 steps"
    path = _shot(comfy, rendering, "training-done", "CtrLoRATrain")
    assert _colour_pixels(path, PANEL_BORDERS["info"], tolerance=20) > 20, path
    comfy.evaluate("() => window.app.graph.clear()")
    # On Load CtrLoRA: an error, then what its file is after a run (that follows the error, so ComfyUI's cache of
    # the tiny graph's earlier runs is gone and the node runs).
    assert _run_in_page(comfy, server, tiny_graph(lora_name="base.ckpt"), "tiny")["status"]["status_str"] == "error"
    comfy.page.wait_for_function("() => window.app.graph.getNodeById(3)?.widgets?.some((w) => "
                                 "w.name === 'ctrlora_notice' && w.value)", timeout=10_000)
    comfy.close_dialogs()
    _lay_out(comfy, rendering)
    path = _shot(comfy, rendering, "node-error", "CtrLoRALoad")
    assert _colour_pixels(path, PANEL_BORDERS["error"], tolerance=20) > 20, path
    assert _run_in_page(comfy, server, tiny_graph(), "tiny")["status"]["status_str"] == "success"
    comfy.page.wait_for_function("() => window.app.graph.getNodeById(3)?.widgets?.some((w) => "
                                 "w.name === 'ctrlora_info' && w.value)", timeout=10_000)
    _lay_out(comfy, rendering)
    path = _shot(comfy, rendering, "lora-info", "CtrLoRALoad")
    assert _colour_pixels(path, PANEL_BORDERS["info"], tolerance=20) > 20, path
    # A model file the workflow names that the models folder lacks.
    comfy.load_workflow(_canny_workflow_missing_a_lora()[0])
    comfy.close_dialogs()
    path = _shot(comfy, rendering, "missing-model-file", "CtrLoRALoad")
    assert _colour_pixels(path, PANEL_BORDERS["hint"], tolerance=20) > 20, path
