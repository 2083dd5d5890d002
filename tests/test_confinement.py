"""On a shared server, a prompt can name only what the server's owner allows.

Dataset folders resolve inside ComfyUI's input folder or the roots the owner allows (CTRLORA_ALLOWED_ROOTS,
``ctrlora_datasets:`` in extra_model_paths.yaml); inside a dataset, links cannot lead out; output names stay in
models/ctrlora/. Refusals say what to do, write nothing, and never name what lies outside. Tested in-process and
through the real server's /prompt (with its websocket events).
"""
import asyncio
import json
import os
import threading
import urllib.error
import urllib.request
import uuid

import pytest
from PIL import Image

import folder_paths

from conftest import pack
from tiny import GOLDEN
from training_helpers import SIZE, training, write_pairs, write_prompt_json
from ui_host import UIServer

paths = pack.training.paths
state = pack.training.state
CtrLoRAError = pack.ctrlora_core.CtrLoRAError
SECRET = "outside_secret_4f1c"  # in every name outside the allowed roots: it must never come back


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """An input folder with a dataset, a folder outside everything allowed (its names carry SECRET), and links
    from the input folder to it."""
    input_dir, outside = tmp_path / "input", tmp_path / f"{SECRET}_folder"
    write_pairs(str(input_dir / "pairs"), 2)
    write_pairs(str(outside), 2)
    os.symlink(outside, input_dir / "escape")
    monkeypatch.setattr(folder_paths, "input_directory", str(input_dir))
    monkeypatch.delenv(paths.ALLOWED_ROOTS_ENV, raising=False)
    monkeypatch.delitem(folder_paths.folder_names_and_paths, paths.DATASETS_FOLDER, raising=False)
    return input_dir, outside


def refused(folder):
    with pytest.raises(CtrLoRAError, match="is outside ComfyUI's input folder and the folders this server allows") \
            as error:
        paths.dataset_folder(folder)
    assert SECRET not in str(error.value) or SECRET in folder
    return str(error.value)


# --- dataset folders ----------------------------------------------------------------------------------------------

def test_names_in_the_input_folder_are_taken_from_there(roots):
    input_dir, _ = roots
    assert paths.dataset_folder("pairs") == str(input_dir / "pairs")
    assert paths.dataset_folder(f"  {input_dir / 'pairs'}  ") == str(input_dir / "pairs")
    assert paths.dataset_folder("pairs/../pairs/source/..") == str(input_dir / "pairs")


@pytest.mark.parametrize("folder", ["/etc", "/", "..", "../..", "pairs/../../..", "~", "/etc/../etc", "a\0b"])
def test_folders_outside_the_allowed_roots_are_refused(roots, folder):
    message = refused(folder)
    assert "CTRLORA_ALLOWED_ROOTS" in message and "ComfyUI/input/" in message


def test_a_link_that_leads_outside_is_refused_without_saying_where(roots):
    message = refused("escape")
    assert "'escape'" in message and "link" in message
    refused("escape/source")


def test_the_owner_allows_more_roots_by_environment_or_extra_model_paths(roots, monkeypatch):
    _, outside = roots
    monkeypatch.setenv(paths.ALLOWED_ROOTS_ENV, os.pathsep.join(["", "/nonexistent/root", str(outside)]))
    assert paths.dataset_folder(str(outside)) == str(outside)
    assert paths.dataset_folder("escape") == str(outside)  # the link now leads inside an allowed root
    monkeypatch.delenv(paths.ALLOWED_ROOTS_ENV)
    refused(str(outside))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, paths.DATASETS_FOLDER, ([str(outside)], set()))
    assert paths.dataset_folder(str(outside / "source")) == str(outside / "source")


def test_an_allowed_root_does_not_allow_its_neighbours(roots, monkeypatch):
    _, outside = roots
    monkeypatch.setenv(paths.ALLOWED_ROOTS_ENV, str(outside / "source"))
    refused(str(outside))  # the parent
    refused(str(outside) + "x")  # a sibling whose name starts the same


def test_an_empty_folder_name_is_an_error(roots):
    with pytest.raises(CtrLoRAError, match="no dataset folder given"):
        paths.dataset_folder("   ")


# --- image names (Load Condition Image) -------------------------------------------------------------------------------

def test_image_names_resolve_inside_their_folder(roots):
    input_dir, outside = roots
    assert paths.input_file("pairs/source/item_0000.png", "L") == str(input_dir / "pairs" / "source" / "item_0000.png")
    for name in ("/etc/hostname", "../x.png", f"../{SECRET}_folder/source/item_0000.png", "escape/source/item_0000.png",
                 str(outside / "source" / "item_0000.png"), "a\0b.png"):
        with pytest.raises(CtrLoRAError, match="is outside ComfyUI's input folder; pick or upload an image there"):
            paths.input_file(name, "Load Condition Image")
    node = pack.nodes.images.LoadConditionImage
    assert node.VALIDATE_INPUTS("pairs/source/item_0000.png") is True
    assert node.VALIDATE_INPUTS("pairs/source/nope.png") == "Invalid image file: pairs/source/nope.png"
    # Outside, a file that exists and one that does not get the same answer.
    assert node.VALIDATE_INPUTS(str(outside / "source" / "item_0000.png")) == \
        node.VALIDATE_INPUTS(str(outside / "source" / "item_9999.png")).replace("item_9999", "item_0000")


# --- inside a dataset: links cannot lead out ---------------------------------------------------------------------------

def test_image_and_caption_links_that_lead_outside_are_skipped_naming_only_the_link(roots):
    input_dir, outside = roots
    data = input_dir / "pairs"
    os.symlink(outside / "source" / "item_0000.png", data / "source" / "leak.png")
    os.symlink(outside / "target" / "item_0000.png", data / "target" / "leak.png")
    (outside / f"{SECRET}.txt").write_text(f"caption from {SECRET}")
    os.symlink(outside / f"{SECRET}.txt", data / "target" / "item_0001.txt")
    os.symlink(data / "source" / "item_0000.png", data / "source" / "inside_link.png")  # inside: fine
    os.symlink(data / "target" / "item_0000.png", data / "target" / "inside_link.png")
    pairs, report = training.scan(str(data))
    assert sorted(p.name for p in pairs) == [os.path.join("target", n)
                                             for n in ("inside_link.png", "item_0000.png", "item_0001.png")]
    assert sorted(report.skipped["link_outside"]) == ["source/leak.png", "target/item_0001.txt", "target/leak.png"]
    assert [p.prompt for p in pairs if p.name.endswith("item_0001.png")] == [""]  # its caption was not read
    summary = report.summary()
    assert "skipped 3 files or captions that are links leading outside the dataset folder" in summary
    assert SECRET not in summary


def test_source_and_target_folders_that_lead_outside_give_no_pairs(roots):
    input_dir, outside = roots
    data = input_dir / "linked"
    data.mkdir()
    os.symlink(outside / "source", data / "source")
    os.symlink(outside / "target", data / "target")
    with pytest.raises(CtrLoRAError, match="no usable condition/target pairs") as error:
        training.scan(str(data))
    assert "links leading outside" in str(error.value) and SECRET not in str(error.value)


def test_prompt_json_paths_and_links_that_lead_outside(roots):
    input_dir, outside = roots
    data = input_dir / "pairs"
    write_prompt_json(data, [
        {"source": "source/item_0000.png", "target": "target/item_0000.png", "prompt": "ok"},
        {"source": str(outside / "source" / "item_0000.png"), "target": "target/item_0001.png"},
        {"source": f"../../{SECRET}_folder/source/item_0001.png", "target": "target/item_0001.png"},
    ])
    pairs, report = training.scan(str(data))
    assert [p.prompt for p in pairs] == ["ok"]
    assert report.skipped["outside"] == ["line 2 (source)", "line 3 (source)"] and report.skipped["missing"] == []
    assert SECRET not in report.summary()
    os.remove(data / "prompt.json")
    write_prompt_json(outside, [{"source": "source/item_0000.png", "target": "target/item_0000.png"}])
    os.symlink(outside / "prompt.json", data / "prompt.json")
    with pytest.raises(CtrLoRAError, match="prompt.json in .* is a link that leads outside the dataset folder") as e:
        training.scan(str(data))
    assert SECRET not in str(e.value)


# --- output names --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", "c:evil", "..", ".hidden", "a..b", "a*b", "a?b", 'a"b',
                                  "a<b", "a>b", "a|b", "a\0b", "a\tb", "CON", "nul", "com1.x", "LPT9.safetensors"])
def test_output_names_that_leave_the_folder_or_no_filesystem_can_store_are_refused(tmp_path, name):
    with pytest.raises(CtrLoRAError, match="must be a plain file name"):
        state.output_paths(str(tmp_path), name)


def test_output_names_longer_than_the_filesystems_allow_are_refused(tmp_path):
    assert state.output_paths(str(tmp_path), "x" * 200)[0] == str(tmp_path / ("x" * 200 + ".safetensors"))
    with pytest.raises(CtrLoRAError, match="201 bytes long; use at most 200"):
        state.output_paths(str(tmp_path), "x" * 201)
    with pytest.raises(CtrLoRAError, match="202 bytes long"):
        state.output_paths(str(tmp_path), "é" * 101)  # bytes, not characters


def test_plain_names_are_kept(tmp_path):
    for name in ("dental_lighting-seg v2", "狗_condition", "console", "con_x", "a.b"):
        lora, run = state.output_paths(str(tmp_path), name + ".safetensors")
        assert lora == str(tmp_path / (name + ".safetensors")) and run == str(tmp_path / (name + ".train"))


# --- through the real server's /prompt ---------------------------------------------------------------------------------

class Events:
    """The server's websocket events for one client id (what a browser tab receives), collected in a thread."""

    def __init__(self, url):
        self.client_id, self.messages, self.ws = str(uuid.uuid4()), [], None
        self.url = url.replace("http://", "ws://") + f"/ws?clientId={self.client_id}"
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._listen(),), daemon=True)
        self.thread.start()
        assert self.ready.wait(30), "the websocket did not connect"

    async def _listen(self):
        import aiohttp
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(self.url) as self.ws:
                self.ready.set()
                async for message in self.ws:
                    if message.type == aiohttp.WSMsgType.TEXT:
                        self.messages.append(message.data)

    def close(self):
        asyncio.run_coroutine_threadsafe(self.ws.close(), self.loop).result(10)
        self.thread.join(10)
        self.loop.close()
        return "\n".join(self.messages)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real server; its owner allows two more roots (CTRLORA_ALLOWED_ROOTS and extra_model_paths.yaml). Its
    input folder holds a dataset with links to a folder outside, and a link to that folder."""
    root = tmp_path_factory.mktemp("confinement")
    allowed, outside = root / "allowed", root / f"{SECRET}_folder"
    write_pairs(str(allowed / "team_pairs"), 2)
    write_pairs(str(outside), 2)
    # extra_model_paths.yaml gets "ctrlora_datasets: ctrlora_datasets/": a second root the owner allows.
    server = UIServer(root, models={"ctrlora": {"base.ckpt": os.path.join(GOLDEN, "base.ckpt")},
                                    paths.DATASETS_FOLDER: {}}, fixtures=True)
    server.outside, server.allowed = outside, allowed
    environment = dict(os.environ)
    os.environ[paths.ALLOWED_ROOTS_ENV] = str(allowed)  # the server process takes its environment at start
    try:
        server.start()
    finally:
        os.environ.clear()
        os.environ.update(environment)
    try:
        pairs = server.input_dir / "pairs"
        write_pairs(str(pairs), 2)
        for kind in ("source", "target"):
            os.symlink(outside / kind / "item_0000.png", pairs / kind / "leak.png")
        os.symlink(outside, server.input_dir / "escape")
        write_pairs(str(root / "models" / paths.DATASETS_FOLDER / "yaml_pairs"), 2)
        yield server
    finally:
        server.stop()


def train_prompt(server, **inputs):
    """Train CtrLoRA on the tiny test models, every setting at its default unless given."""
    values = {}
    for name, declared in server.object_info["CtrLoRATrain"]["input"]["required"].items():
        options = declared[1] if len(declared) > 1 and isinstance(declared[1], dict) else {}
        if isinstance(declared[0], list):  # a combo: its first entry
            values[name] = declared[0][0]
        elif "default" in options:
            values[name] = options["default"]
    # Short and quiet: 2 steps at 32 px, nothing held out, no previews (optional inputs a server may not have).
    values.update({"model": ["1", 0], "clip": ["2", 0], "vae": ["1", 3], "base": ["3", 0], "output_name": "confined",
                   "rank": 4, "steps": 2, "resolution": SIZE, "save_every": 0, "resume": False,
                   "validation_fraction": 0.0, "validate_every": 0, "preview_every": 0, **inputs})
    return {
        "1": {"class_type": "CtrLoRATestTinyModels", "inputs": {"seed": 0}},
        "2": {"class_type": "CtrLoRATestTinyCLIP", "inputs": {}},
        "3": {"class_type": "CtrLoRALoadBase", "inputs": {"base_name": "base.ckpt"}},
        "4": {"class_type": "CtrLoRATrain", "inputs": values},
    }


def written(server):
    """Every file under the server's folders (models, output, input) and next to the outside folder."""
    found = []
    for top in (server.root, server.outside):
        for folder, _, files in os.walk(top):
            found += [os.path.join(folder, f) for f in files if not f.endswith((".log", ".db", ".db-journal"))]
    return sorted(found)


def saved(server, name):
    """Whether ``<name>.safetensors`` was written in the server's models/ctrlora/ (and nowhere else)."""
    return [os.path.relpath(p, server.root) for p in written(server) if p.endswith(f"/{name}.safetensors")] == \
        [os.path.join("base", "models", "ctrlora", f"{name}.safetensors")]


def run(server, prompt):
    events = Events(server.url)
    try:
        prompt_id = server.post("/prompt", {"prompt": prompt, "client_id": events.client_id})["prompt_id"]
        entry = server.wait(prompt_id, 120)
    finally:
        received = events.close()
    return entry, received


def error_of(server, entry):
    status = entry["status"]
    errors = [data for kind, data in status["messages"] if kind == "execution_error"]
    assert status["status_str"] == "error" and len(errors) == 1, server.explain(json.dumps(status))
    return errors[0]


@pytest.mark.parametrize("folder", ["/etc", "../../..", "escape", "escape/source", "/proc/self/cwd"])
def test_the_server_refuses_folders_outside_and_sends_nothing_from_there(server, folder):
    before = written(server)
    entry, events = run(server, train_prompt(server, dataset_folder=folder))
    error = error_of(server, entry)
    assert error["node_type"] == "CtrLoRATrain"
    assert "is outside ComfyUI's input folder and the folders this server allows" in error["exception_message"]
    assert "CTRLORA_ALLOWED_ROOTS" in error["exception_message"]
    for text in (json.dumps(entry), events):
        assert SECRET not in text and "passwd" not in text and "shadow" not in text
    assert written(server) == before


def test_the_server_trains_inside_and_skips_links_that_lead_out_without_naming_their_target(server):
    entry, events = run(server, train_prompt(server, dataset_folder="pairs", output_name="inside"))
    assert entry["status"]["status_str"] == "success", server.explain(json.dumps(entry["status"]))
    report = "\n".join(entry["outputs"]["4"]["text"])
    assert "2 pairs used" in report and "skipped 2 files or captions that are links leading outside" in report
    assert "source/leak.png" in report  # the link's own name is reported; where it leads never is
    assert '"status": "done"' in events  # the node's own events came, and were checked too
    for text in (json.dumps(entry), events):
        assert SECRET not in text
    assert saved(server, "inside")


@pytest.mark.parametrize("how", ["environment", "extra_model_paths"])
def test_the_server_trains_from_a_root_its_owner_allows(server, how):
    folder = server.allowed / "team_pairs" if how == "environment" else \
        server.root / "models" / paths.DATASETS_FOLDER / "yaml_pairs"
    entry, _ = run(server, train_prompt(server, dataset_folder=str(folder), output_name=how))
    assert entry["status"]["status_str"] == "success", server.explain(json.dumps(entry["status"]))
    assert saved(server, how)


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/escaped", "sub/escaped", "CON"])
def test_the_server_keeps_outputs_in_models_ctrlora(server, name):
    before = written(server)
    entry, _ = run(server, train_prompt(server, dataset_folder="pairs", output_name=name))
    assert "must be a plain file name" in error_of(server, entry)["exception_message"]
    assert written(server) == before


def test_model_names_outside_the_models_folder_are_refused_by_comfyui(server):
    """Combo inputs (base, LoRA, start_from) only take names ComfyUI lists: the server refuses others up front."""
    before = written(server)
    for node, inputs in (("3", {"base_name": "../../../../etc/passwd"}),
                         ("4", {"start_from": "../../escape/source/item_0000.png"})):
        prompt = train_prompt(server, dataset_folder="pairs")
        prompt[node]["inputs"].update(inputs)
        request = urllib.request.Request(server.url + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=30)
        assert answer.value.code == 400 and "value_not_in_list" in answer.value.read().decode()
    assert written(server) == before


@pytest.mark.parametrize("name", ["/etc/hostname", "../../../../../../etc/hostname", "escape/source/item_0000.png",
                                  "pairs/source/leak.png"])
def test_the_server_refuses_condition_images_outside_the_input_folder(server, name):
    """Load Condition Image refuses before looking: no file outside is read, and whether it exists is not told."""
    prompt = {"1": {"class_type": "CtrLoRALoadConditionImage", "inputs": {"image": name}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    request = urllib.request.Request(server.url + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=30)
    text = answer.value.read().decode()
    assert answer.value.code == 400 and "is outside ComfyUI's input folder; pick or upload an image there" in text
    assert SECRET not in text
    prompt["1"]["inputs"]["image"] = "pairs/source/item_0000.png"  # inside: loads
    entry, _ = run(server, prompt)
    assert entry["status"]["status_str"] == "success", server.explain(json.dumps(entry["status"]))
