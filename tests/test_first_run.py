"""A new user's first minutes: the README's start command on a fresh ComfyUI, then a CtrLoRA graph in two clicks.

``scripts/run_comfyui.sh <ComfyUI folder>`` is run on a fresh copy of the host (no pack linked, no user folder, no
models) exactly as the README says; it must link the pack, print the URL and serve ComfyUI with the pack. A fresh
Chromium with no settings then opens that URL as a first-time user: ComfyUI shows its template browser, where
'ComfyUI-CtrLoRA' (one click) and the canny workflow (second click) give a graph with the pack's nodes. The model
files are missing on a fresh machine, and the page says which and where they go.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import COMFYUI, ROOT
from test_server import PACK_LINK, Server
from ui_host import FRONTEND_ARGS, ComfyPage, chromium_page, skip_reason

FIRST_WORKFLOW = "ctrlora-1-canny-sd15"
START_TIMEOUT = 120


def _fresh_copy(destination):
    """The host as a fresh install has it: no user folder, no outputs, no packs, no model files."""
    def ignore(folder, names):
        skipped = {"user", "output", "temp", "__pycache__", PACK_LINK}
        return [n for n in names if n in skipped or (os.path.isfile(os.path.join(folder, n))
                                                     and os.path.getsize(os.path.join(folder, n)) > 1_000_000)]
    shutil.copytree(COMFYUI, destination, symlinks=True, ignore=ignore)
    return destination


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """(server, log text) of ``scripts/run_comfyui.sh`` on a fresh ComfyUI copy."""
    reason = skip_reason()
    if reason:
        pytest.fail(f"this test drives the real ComfyUI page: {reason}")
    root = tmp_path_factory.mktemp("first_run")
    comfyui = _fresh_copy(root / "ComfyUI")
    server = Server(root)  # its port, log and HTTP helpers; the process is the start script's
    env = {**os.environ, "PYTHON": sys.executable, "PORT": str(server.port), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "2"}
    with open(server.log_path, "wb") as log:
        server.proc = subprocess.Popen(["bash", os.path.join(ROOT, "scripts", "run_comfyui.sh"), str(comfyui), *FRONTEND_ARGS],
                                       cwd=root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if server.proc.poll() is not None:
                raise AssertionError(server.explain(f"run_comfyui.sh exited with code {server.proc.returncode}"))
            try:
                server.get("/object_info/CtrLoRAApply")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(server.explain(f"no answer on {server.url} within {START_TIMEOUT} s"))
                time.sleep(0.5)
        yield server, comfyui
    finally:
        server.stop()


def test_the_start_command_links_the_pack_and_prints_the_url(started):
    server, comfyui = started
    log = server.log()
    assert f"ComfyUI with CtrLoRA will be at: {server.url}" in log
    assert f"linked {comfyui}/custom_nodes/{PACK_LINK} -> {os.path.realpath(ROOT)}" in log
    assert re.search(rf"seconds: .*custom_nodes/{PACK_LINK}$", log, re.M), server.explain("the pack was not loaded")
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and PACK_LINK in line]
    assert not failed, server.explain(f"the pack failed to import: {failed}")
    assert server.get("/object_info/CtrLoRALoad")


def test_a_new_user_reaches_a_ctrlora_graph_in_two_clicks(started):
    server, _ = started
    with chromium_page() as page:
        comfy = ComfyPage(page, server).open()
        # A first visit opens ComfyUI's template browser by itself.
        page.get_by_text("Templates", exact=True).first.wait_for(timeout=30_000)
        categories = page.get_by_text(PACK_LINK, exact=True).first
        categories.wait_for(timeout=30_000)
        comfy.screenshot("first-run-1-template-browser.png")
        categories.click()  # click 1
        card = page.locator(f"[data-testid='template-workflow-{FIRST_WORKFLOW}']")
        card.wait_for(timeout=15_000)
        comfy.screenshot("first-run-2-ctrlora-templates.png")
        card.click()  # click 2
        page.wait_for_function("() => window.app.graph.nodes.some((n) => n.type === 'CtrLoRAApply')", timeout=15_000)
        types = comfy.evaluate("() => window.app.graph.nodes.map((n) => n.type)")
        assert {"CtrLoRALoadBase", "CtrLoRALoad", "CtrLoRAVAEConditionEncode", "CtrLoRAApply"} <= set(types)
        # A fresh install has none of the models: the frontend names each file the workflow's loaders carry (the
        # classic dialog offers the .safetensors download, newer frontends all three), our loaders say where theirs go.
        workflow = json.load(open(os.path.join(ROOT, "workflows", f"{FIRST_WORKFLOW}.json")))
        wanted = {model["name"] for node in workflow["nodes"] for model in node.get("properties", {}).get("models", [])}
        missing = comfy.missing_models()
        assert len(wanted) == 3 and all(name in missing for name in wanted), missing
        comfy.screenshot("first-run-3-missing-models.png")
        comfy.close_dialogs()
        hints = comfy.evaluate("() => window.app.graph.nodes.flatMap((n) => (n.widgets ?? [])"
                               ".filter((w) => w.name === 'ctrlora_notice' && w.value).map((w) => w.value))")
        assert len(hints) == 2 and all("models/ctrlora/" in h and "huggingface.co/xyfJASON/ctrlora" in h
                                       for h in hints)
        comfy.fit_view(type_prefix="CtrLoRA")
        comfy.screenshot("first-run-4-ctrlora-graph.png")
        assert comfy.own_console_errors() == []
