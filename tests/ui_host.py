"""The real ComfyUI server with the pack, and the real ComfyUI page in headless Chromium.

``UIServer`` extends the server of tests/test_server.py with the folders a user's install has: model folders
(``checkpoints/``, ``ctrlora/``, ...) filled with given files (symlinked) or empty placeholders, an input folder,
and a user folder whose settings skip the first-run tutorial. ``chromium_page`` opens the page in the system's
Chromium (Debian package) through Playwright; ``ComfyPage`` wraps the calls the tests make in it.
"""
import contextlib
import json
import os
import shutil
import tempfile
import time
import urllib.request
import uuid

import pytest

from conftest import COMFYUI, ROOT
from test_server import PACK_LINK, Server

CHROMIUM = os.environ.get("CTRLORA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The frontend the page comes from: the host's own (its comfyui-frontend-package), or an unpacked frontend folder
# served with ComfyUI's --front-end-root (scripts/test.sh --newest-frontend sets this; screenshots go in a subfolder).
FRONTEND_ROOT = os.environ.get("CTRLORA_FRONTEND_ROOT") or None
FRONTEND_ARGS = ["--front-end-root", FRONTEND_ROOT] if FRONTEND_ROOT else []
ARTIFACTS = os.path.join(ROOT, "tests", "artifacts",
                         *([f"frontend-{os.path.basename(FRONTEND_ROOT.rstrip('/'))}"] if FRONTEND_ROOT else []))
WORKFLOWS = os.path.join(ROOT, "workflows")
# Screenshots: nodes drawn in full detail at any zoom, no minimap over the graph.
READABLE = {"Comfy.Minimap.Visible": False, "LiteGraph.Canvas.MinFontSizeForLOD": 0}
EXTENSION_NAME = "ctrlora.ui"
EXTENSION_URL = f"/extensions/{PACK_LINK}/"


def skip_reason():
    """Why the browser tests cannot run here, or None."""
    if not os.path.isfile(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium; scripts/setup_host.sh does)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "Python package playwright is not installed (scripts/setup_host.sh installs it)"
    return None


class UIServer(Server):
    """A ComfyUI server for a user's view: the pack, model files, an input folder, a first-run-free user folder."""

    def __init__(self, root, models=None, inputs=None, fixtures=False, settings=None):
        """``models``: {folder: {file name: source path, or None for an empty placeholder}}; ``inputs``: {name: file
        or folder to copy};
        ``settings``: frontend settings besides the one that skips the first-run tutorial and ``READABLE``."""
        super().__init__(root)
        self.models = models or {}
        self.inputs = inputs or {}
        self.fixtures = fixtures
        self.settings = {"Comfy.TutorialCompleted": True, **READABLE, **(settings or {})}
        self.input_dir = root / "input"

    def start(self):
        models = self.root / "models"
        for folder, files in self.models.items():
            (models / folder).mkdir(parents=True, exist_ok=True)
            for name, source in files.items():
                if source is None:
                    (models / folder / name).touch()
                else:
                    os.symlink(source, models / folder / name)
        self.input_dir.mkdir(parents=True)
        for name, source in self.inputs.items():
            (shutil.copytree if os.path.isdir(source) else shutil.copy)(source, self.input_dir / name)
        packs = self.root / "packs"
        packs.mkdir()
        os.symlink(ROOT, packs / PACK_LINK, target_is_directory=True)
        if self.fixtures:
            os.symlink(os.path.join(ROOT, "tests", "fixtures", "ctrlora_test_fixtures"),
                       packs / "ctrlora_test_fixtures", target_is_directory=True)
        base = self.root / "base"
        (base / "custom_nodes").mkdir(parents=True)
        settings = base / "user" / "default" / "comfy.settings.json"
        settings.parent.mkdir(parents=True)
        settings.write_text(json.dumps(self.settings))
        config = self.root / "extra_model_paths.yaml"
        config.write_text("ctrlora_test:\n"
                          f"    base_path: {models}\n"
                          + "".join(f"    {folder}: {folder}/\n" for folder in self.models)
                          + f"    custom_nodes: {packs}\n")
        self.launch(config, base, "--input-directory", str(self.input_dir), *FRONTEND_ARGS)
        return self

    def queue(self, prompt, client_id=None):
        body = {"prompt": prompt, "client_id": client_id or str(uuid.uuid4())}
        return self.post("/prompt", body)["prompt_id"]

    def wait(self, prompt_id, timeout):
        """The history entry of ``prompt_id`` once it has finished (success or error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            if self.proc.poll() is not None:
                raise AssertionError(self.explain(f"ComfyUI exited with code {self.proc.returncode} while running"))
            time.sleep(0.5)
        raise AssertionError(self.explain(f"prompt {prompt_id} did not finish within {timeout} s"))

    def fetch_bytes(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()


@contextlib.contextmanager
def running_server(root, **kwargs):
    """A started ``UIServer(root, **kwargs)`` with ComfyUI's example.png as input; fails the test if there is no
    browser to drive it (the setup script installs one), and stops the server afterwards."""
    reason = skip_reason()
    if reason:
        pytest.fail(f"these tests drive the real ComfyUI page: {reason}")
    inputs = {"example.png": os.path.join(COMFYUI, "input", "example.png"), **kwargs.pop("inputs", {})}
    server = UIServer(root, inputs=inputs, **kwargs)
    try:
        yield server.start()
    finally:
        server.stop()


@contextlib.contextmanager
def comfy_page(server):
    """The ComfyUI page of ``server``, opened in a fresh Chromium."""
    with chromium_page() as page:
        yield ComfyPage(page, server).open()


@contextlib.contextmanager
def chromium_page(viewport=(1600, 1000)):
    """A fresh page of the system's Chromium (own profile), with its console messages collected."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="ctrlora-chromium-")
    try:
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
                viewport={"width": viewport[0], "height": viewport[1]})
            try:
                page = context.pages[0] if context.pages else context.new_page()
                yield page
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


class ComfyPage:
    """The ComfyUI page of ``server`` in ``page``: console capture, graph loading, conversion and screenshots."""

    def __init__(self, page, server):
        self.page = page
        self.server = server
        self.console = []
        page.on("console", lambda m: self.console.append(
            {"type": m.type, "text": m.text, "url": (m.location or {}).get("url", "")}))
        page.on("pageerror", lambda e: self.console.append(
            {"type": "pageerror", "text": f"{e}\n{getattr(e, 'stack', '') or ''}", "url": ""}))

    def open(self):
        self.page.goto(self.server.url)
        self.page.wait_for_function(
            "(name) => window.app && window.app.graph && window.app.vueAppReady && window.comfyAPI?.api?.api"
            " && window.app.extensions.some((e) => e.name === name)", arg=EXTENSION_NAME, timeout=90_000)
        # The socket's first status message gives the page its client id.
        self.page.wait_for_function("() => window.comfyAPI.api.api.clientId", timeout=30_000)
        return self

    def evaluate(self, script, arg=None):
        return self.page.evaluate(script, arg)

    @property
    def client_id(self):
        return self.evaluate("() => window.comfyAPI.api.api.clientId")

    def load_workflow(self, workflow):
        """Loads a UI workflow as the user's 'Open' does; returns the missing node types the page reports."""
        return self.evaluate("""async (workflow) => {
            await window.app.loadGraphData(workflow, true, true, 'workflow');
            return workflow.nodes.map((n) => n.type).filter((t) => !(t in LiteGraph.registered_node_types));
        }""", workflow)

    def graph_to_prompt(self):
        """The API prompt the frontend itself makes of the loaded graph (what 'Run' would queue)."""
        return self.evaluate("async () => (await window.app.graphToPrompt()).output")

    def dialogs(self):
        """Texts of the open dialogs (missing nodes, missing models, errors, ...)."""
        return self.evaluate("() => [...document.querySelectorAll('.p-dialog')].map((d) => d.innerText)")

    def missing_models(self, timeout=30_000):
        """The text of what the frontend shows for a loaded workflow's missing model files, found as its own tests
        do: the classic frontend's dialog (``.comfy-missing-models``, a Download button per file) or, in newer
        frontends, the error overlay's 'See errors' opened on the missing-model group of the errors panel."""
        dialog = self.page.locator(".comfy-missing-models")
        overlay = self.page.get_by_test_id("error-overlay")
        dialog.or_(overlay).first.wait_for(timeout=timeout)
        if dialog.is_visible():
            return dialog.inner_text()
        overlay.get_by_test_id("error-overlay-see-errors").click()
        group = self.page.get_by_test_id("error-group-missing-model")
        group.wait_for(timeout=timeout)
        return group.inner_text()

    def close_dialogs(self):
        self.page.keyboard.press("Escape")
        self.page.wait_for_timeout(200)

    def fit_view(self, padding=40, type_prefix="", aspect=None):
        """Zooms the canvas onto the nodes whose type starts with ``type_prefix`` (all by default), widened to the
        ``aspect`` ratio (width / height) if given; returns that box on the page (x, y, width, height)."""
        box = self.evaluate("""([padding, prefix, aspect]) => {
            const nodes = window.app.graph.nodes.filter((n) => n.type.startsWith(prefix));
            if (!nodes.length) return null;
            let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
            const canvas = window.app.canvas;
            for (const n of nodes) {
                let [x, y, w, h] = n.boundingRect;
                // Nodes 2.0 draws nodes in the DOM, where they may be taller than their canvas size.
                const element = document.querySelector(`[data-node-id="${n.id}"]`);
                if (element) h = Math.max(h, element.getBoundingClientRect().height / canvas.ds.scale);
                x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
            }
            [x0, y0, x1, y1] = [x0 - padding, y0 - padding, x1 + padding, y1 + padding];
            if (aspect) {
                const [cx, cy, w, h] = [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0];
                const [W, H] = w / h < aspect ? [h * aspect, h] : [w, w / aspect];
                [x0, y0, x1, y1] = [cx - W / 2, cy - H / 2, cx + W / 2, cy + H / 2];
            }
            canvas.ds.fitToBounds([x0, y0, x1 - x0, y1 - y0]);
            canvas.setDirty(true, true);
            canvas.draw(true, true);
            const rect = canvas.canvas.getBoundingClientRect();
            const [a, b] = canvas.ds.convertOffsetToCanvas([x0, y0]);
            const [c, d] = canvas.ds.convertOffsetToCanvas([x1, y1]);
            const left = Math.max(rect.left, rect.left + a), top = Math.max(rect.top, rect.top + b);
            return {x: left, y: top, width: Math.min(rect.right, rect.left + c) - left,
                    height: Math.min(rect.bottom, rect.top + d) - top};
        }""", [padding, type_prefix, aspect])
        self.page.wait_for_timeout(300)
        return box

    def screenshot(self, name, **kwargs):
        os.makedirs(ARTIFACTS, exist_ok=True)
        path = os.path.join(ARTIFACTS, name)
        self.page.screenshot(path=path, **kwargs)
        return path

    def own_console_errors(self):
        """Console errors and page errors that come from the pack's JS: its URL (in the source or the stack), its
        extension name (ComfyUI logs a failing extension hook by name) or its log prefix."""
        marks = (EXTENSION_URL, EXTENSION_NAME, "[ctrlora]")
        return [m for m in self.console if m["type"] in ("error", "pageerror")
                and any(mark in m["url"] or mark in m["text"] for mark in marks)]


def load_workflows():
    """{file name: workflow} for every JSON file in workflows/."""
    return {name: json.load(open(os.path.join(WORKFLOWS, name)))
            for name in sorted(os.listdir(WORKFLOWS)) if name.endswith(".json")}
