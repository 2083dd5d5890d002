"""The pack in the real ComfyUI server: started as a subprocess, driven over its HTTP API.

The server loads this repository as a custom node pack (through ``custom_nodes:`` in an extra model paths
YAML) next to the test-only pack ``tests/fixtures/ctrlora_test_fixtures``, which supplies a tiny MODEL, VAE and
conditionings (ComfyUI cannot detect a tiny UNet's type from a file). The golden tiny base and LoRA sit in a
temporary ``ctrlora/`` models folder.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest
from PIL import Image

from conftest import COMFYUI, ROOT
from tiny import GOLDEN

PACK_LINK = "ComfyUI-CtrLoRA"
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "ctrlora_test_fixtures")
NODES = {
    "CtrLoRALoadBase": "Load Base ControlNet",
    "CtrLoRALoad": "Load CtrLoRA",
    "CtrLoRAVAEConditionEncode": "VAE Condition Encode",
    "CtrLoRAApply": "Apply CtrLoRA",
}
START_TIMEOUT = 120
PROMPT_TIMEOUT = 60


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    device_args = ("--cpu",)  # the tests run on the CPU; bench/bench_soak.py may clear it for a GPU

    def __init__(self, root):
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "server.log"
        self.output_dir = root / "output"
        self.proc = None

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def explain(self, message):
        """``message`` followed by the server log, for assertion failures."""
        return f"{message}\n----- ComfyUI server log ({self.log_path}) -----\n{self.log()}"

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.load(response)

    def post(self, path, body):
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.load(response)
        except urllib.error.HTTPError as e:
            raise AssertionError(self.explain(f"POST {path} -> HTTP {e.code}: {e.read().decode(errors='replace')}"))

    def start(self):
        models = self.root / "models"
        (models / "ctrlora").mkdir(parents=True)
        for name in ("base.ckpt", "lora0.ckpt"):
            shutil.copy(os.path.join(GOLDEN, name), models / "ctrlora" / name)
        packs = self.root / "packs"
        packs.mkdir()
        os.symlink(ROOT, packs / PACK_LINK, target_is_directory=True)
        os.symlink(FIXTURES, packs / "ctrlora_test_fixtures", target_is_directory=True)
        # An isolated base directory: nothing from the host's own custom_nodes/, models/, output/ or user/.
        base = self.root / "base"
        (base / "custom_nodes").mkdir(parents=True)
        config = self.root / "extra_model_paths.yaml"
        config.write_text(
            "ctrlora_test:\n"
            f"    base_path: {models}\n"
            "    ctrlora: ctrlora/\n"
            f"    custom_nodes: {packs}\n"
        )
        self.launch(config, base)

    def launch(self, config, base, *extra_args):
        """Starts main.py with the model paths file ``config`` and base directory ``base``; waits until it answers."""
        command = [
            sys.executable, "main.py", *self.device_args, "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-auto-launch", "--disable-api-nodes", "--extra-model-paths-config", str(config),
            "--base-directory", str(base), "--output-directory", str(self.output_dir),
            # A file database: an in-memory one logs SQLite cross-thread errors in this host.
            "--database-url", f"sqlite:///{self.root / 'comfyui.db'}", *extra_args,
        ]
        # Passive OpenMP threads: spinning ones make a step 10-30x slower when other processes share the cores.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, cwd=COMFYUI, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.explain(f"ComfyUI exited with code {self.proc.returncode} before it was ready"))
            try:
                self.object_info = self.get("/object_info")
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                time.sleep(0.5)
        raise RuntimeError(self.explain(f"ComfyUI did not answer /object_info within {START_TIMEOUT} s"))

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)

    def run(self, graph):
        """Queues an API-format graph and returns its history entry once it has finished."""
        prompt_id = self.post("/prompt", {"prompt": graph, "client_id": str(uuid.uuid4())})["prompt_id"]
        deadline = time.monotonic() + PROMPT_TIMEOUT
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None \
                    and entry["status"].get("status_str") in ("success", "error"):
                return entry
            if self.proc.poll() is not None:
                raise AssertionError(self.explain(f"ComfyUI exited with code {self.proc.returncode} while running"))
            time.sleep(0.25)
        raise AssertionError(self.explain(f"prompt {prompt_id} did not finish within {PROMPT_TIMEOUT} s"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("comfyui_server"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


def graph(lora_name="lora0.ckpt"):
    """Tiny models -> base -> LoRA; a 32x32 condition image -> its 16x16 latent -> control on a 64x64 px
    (8x8 latent) sample, so the hint latent is resized to the sampled size; decoded to 16x16 and saved."""
    return {
        "1": {"class_type": "CtrLoRATestTinyModels", "inputs": {"seed": 0}},
        "2": {"class_type": "CtrLoRALoadBase", "inputs": {"base_name": "base.ckpt"}},
        "3": {"class_type": "CtrLoRALoad", "inputs": {"base": ["2", 0], "lora_name": lora_name}},
        "4": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0x3366CC}},
        "5": {"class_type": "CtrLoRAVAEConditionEncode", "inputs": {"image": ["4", 0], "vae": ["1", 3]}},
        "6": {"class_type": "CtrLoRAApply", "inputs": {
            "positive": ["1", 1], "negative": ["1", 2], "condition": ["3", 0], "condition_latent": ["5", 0],
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["6", 0], "negative": ["6", 1], "latent_image": ["7", 0],
            "seed": 1, "steps": 3, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 3]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "ctrlora_server_test"}},
    }


def _combo(info, node, name):
    spec = info[node]["input"]["required"][name]
    if isinstance(spec[0], list):
        return spec[0]
    return spec[1]["options"]  # "COMBO" form


def test_pack_imports_without_failure(server):
    log = server.log()
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line
              and (PACK_LINK in line or "ctrlora_test_fixtures" in line)]
    assert not failed, server.explain(f"the pack failed to import: {failed}")
    loaded = [line for line in log.splitlines() if "seconds" in line and "IMPORT FAILED" not in line
              and line.rstrip().endswith(PACK_LINK)]
    assert loaded, server.explain("the pack does not appear in ComfyUI's custom node import times")


def test_object_info_lists_the_nodes_and_model_files(server):
    info = server.object_info
    for node_id, display_name in NODES.items():
        assert node_id in info, server.explain(f"{node_id} is missing from /object_info")
        assert info[node_id]["display_name"] == display_name
        assert info[node_id]["category"] == "conditioning/ctrlora"
    assert "base.ckpt" in _combo(info, "CtrLoRALoadBase", "base_name")
    assert "lora0.ckpt" in _combo(info, "CtrLoRALoad", "lora_name")
    assert "CtrLoRATestTinyModels" in info


def test_workflow_samples_and_saves_an_image(server):
    entry = server.run(graph())
    status = entry["status"]
    assert status["status_str"] == "success" and status["completed"], \
        server.explain(f"prompt failed: {json.dumps(status['messages'], indent=1)}")
    images = entry["outputs"]["10"]["images"]
    assert len(images) == 1
    path = server.output_dir / images[0]["subfolder"] / images[0]["filename"]
    assert path.is_file(), server.explain(f"{path} was not written")
    with Image.open(path) as image:
        assert image.size == (16, 16)  # 8x8 latent, tiny VAE upsamples by 2


def test_lora_loader_given_a_base_fails_with_a_clear_error(server):
    entry = server.run(graph(lora_name="base.ckpt"))
    status = entry["status"]
    assert status["status_str"] == "error", server.explain(f"expected an execution error: {status}")
    errors = [data for kind, data in status["messages"] if kind == "execution_error"]
    assert len(errors) == 1, server.explain(f"no execution_error in {status['messages']}")
    error = errors[0]
    assert error["node_type"] == "CtrLoRALoad"
    assert "is a CtrLoRA base ControlNet, not a condition LoRA" in error["exception_message"], error
    assert "Load Base ControlNet" in error["exception_message"]
