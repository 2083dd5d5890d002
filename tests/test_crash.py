"""Crash-proof training runs on the real ComfyUI server (CPU, tiny models).

* The server is killed with SIGKILL during a run; after a restart the same graph (resume on) continues from the last
  save and ends with the same weights, bit for bit, as a run that was never interrupted.
* Cancel pressed in the real page (the frontend's own "Cancel current run" button) stops the run within a step,
  keeps it (state saved, and queueing again continues it), and the node shows that it was cancelled.
"""
import json
import os
import signal
import time

import pytest
import safetensors.torch
import torch

from tiny import GOLDEN
from training_helpers import write_pairs
from ui_host import UIServer, comfy_page, running_server

TRAIN = "CtrLoRATrain"
KILL_STEPS, KILL_SAVE_EVERY = 30, 5
CANCEL_ACCUMULATION = 8  # micro-batches per step: long steps, so "within a step" can be told apart from latency
RUN_TIMEOUT = 120


def training_graph(object_info, output_name, **settings):
    """Tiny model, VAE, CLIP and the golden base -> Train CtrLoRA on input/pairs at 32 px; inputs not given take
    their defaults from /object_info (so the graph keeps working as the node gains inputs)."""
    inputs = {"model": ["1", 0], "vae": ["1", 3], "clip": ["2", 0], "base": ["3", 0], "dataset_folder": "pairs",
              "prompt_template": "", "output_name": output_name, "rank": 4, "resolution": 32, "learning_rate": 1e-3,
              "seed": 3, **settings}
    for name, spec in object_info[TRAIN]["input"]["required"].items():
        if name not in inputs:
            inputs[name] = spec[0][0] if isinstance(spec[0], list) else spec[1]["default"]
    return {
        "1": {"class_type": "CtrLoRATestTinyModels", "inputs": {"seed": 0}},
        "2": {"class_type": "CtrLoRATestTinyCLIP", "inputs": {}},
        "3": {"class_type": "CtrLoRALoadBase", "inputs": {"base_name": "base.ckpt"}},
        "4": {"class_type": TRAIN, "inputs": inputs},
    }


def training_server(dataset):
    """Settings for a server whose input/pairs holds ``dataset`` and whose models/ctrlora the golden base."""
    return {"models": {"ctrlora": {"base.ckpt": os.path.join(GOLDEN, "base.ckpt")}}, "inputs": {"pairs": dataset},
            "fixtures": True}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_pairs(str(tmp_path_factory.mktemp("pairs")), 6, seed=1)


def output_folder(server):
    """Where Train CtrLoRA writes: the first models/ctrlora/ folder, the one in ComfyUI's base directory."""
    return server.root / "base" / "models" / "ctrlora"


def saved_step(run_folder):
    try:
        return json.loads((run_folder / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None  # not written yet (or being replaced)


def report(entry):
    return entry["outputs"]["4"]["text"][0]


def restart(server):
    """Starts ComfyUI again on the same folders and port, as a user restarts it after a crash."""
    server.log_path = server.root / f"server-{time.monotonic_ns()}.log"
    server.launch(server.root / "extra_model_paths.yaml", server.root / "base", "--input-directory",
                  str(server.input_dir))


def wait_in_page(comfy, condition, timeout=RUN_TIMEOUT):
    """Waits until ``condition`` holds in the page; fails with the server's log if the prompt failed or time ran out."""
    server = comfy.server
    deadline = time.monotonic() + timeout
    while not comfy.evaluate(condition):
        failed = [entry["status"] for entry in server.get("/history").values()
                  if entry["status"].get("status_str") == "error"
                  and "execution_interrupted" not in [kind for kind, _ in entry["status"]["messages"]]]
        assert not failed and time.monotonic() < deadline and server.proc.poll() is None, \
            server.explain(f"waiting for {condition}: {json.dumps(failed)[:2000]}")
        time.sleep(0.2)


def test_a_run_killed_with_sigkill_resumes_to_the_same_weights_as_an_uninterrupted_run(tmp_path, dataset):
    server = UIServer(tmp_path, **training_server(dataset)).start()
    try:
        settings = {"steps": KILL_STEPS, "save_every": KILL_SAVE_EVERY}
        graph = training_graph(server.object_info, "killed", **settings)
        run_folder = output_folder(server) / "killed.train"
        server.queue(graph)
        deadline = time.monotonic() + RUN_TIMEOUT
        while not saved_step(run_folder):
            assert time.monotonic() < deadline, server.explain("no state was saved")
            assert server.proc.poll() is None, server.explain("ComfyUI exited")
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=30)
        killed_at = saved_step(run_folder)
        print(f"killed with the state saved at step {killed_at} of {KILL_STEPS}")
        assert KILL_SAVE_EVERY <= killed_at < KILL_STEPS, f"killed after the run ended (state at step {killed_at})"
        assert not (output_folder(server) / "killed.safetensors").exists()

        restart(server)
        resumed = server.wait(server.queue(graph), RUN_TIMEOUT)
        assert resumed["status"]["status_str"] == "success", server.explain(json.dumps(resumed["status"]))
        assert f"resumed at step {killed_at}" in report(resumed), report(resumed)
        straight = server.wait(server.queue(training_graph(server.object_info, "straight", **settings)), RUN_TIMEOUT)
        assert straight["status"]["status_str"] == "success", server.explain(json.dumps(straight["status"]))
    finally:
        server.stop()
    killed = safetensors.torch.load_file(output_folder(server) / "killed.safetensors")
    uninterrupted = safetensors.torch.load_file(output_folder(server) / "straight.safetensors")
    assert killed.keys() == uninterrupted.keys()
    different = [k for k in killed if not torch.equal(killed[k], uninterrupted[k])]
    assert different == [], f"{len(different)} of {len(killed)} tensors differ from the uninterrupted run"


def test_cancel_in_the_page_stops_within_a_step_keeps_the_run_and_shows_it(tmp_path, dataset):
    with running_server(tmp_path, **training_server(dataset)) as server, comfy_page(server) as comfy:
        graph = training_graph(server.object_info, "cancelled", steps=1000, save_every=0,
                               grad_accumulation=CANCEL_ACCUMULATION)
        comfy.evaluate("(graph) => window.app.loadApiJson(graph, 'cancel')", graph)
        # The training node inside a subgraph: the server names it by its path, e.g. "5:4".
        path = comfy.evaluate("""() => {
            const graph = window.app.graph;
            const holder = graph.convertToSubgraph(new Set(graph.nodes.filter((n) => n.type === 'CtrLoRATrain'))).node;
            return [holder.id, holder.subgraph.nodes.find((n) => n.type === 'CtrLoRATrain').id];
        }""")
        # What the chart shows, recorded in the page as the events arrive (the steps and their times).
        comfy.evaluate("""() => {
            window.ctrloraEvents = [];
            window.comfyAPI.api.api.addEventListener('ctrlora.train.progress', ({detail}) =>
                window.ctrloraEvents.push({node: detail.node, status: detail.status, phase: detail.phase,
                                           step: detail.step, at: performance.now()}));
        }""")
        comfy.page.get_by_test_id("queue-button").click()
        wait_in_page(comfy, "() => window.ctrloraEvents.some((e) => e.phase === 'train' && e.step >= 2)")
        clicked = comfy.evaluate("() => ({at: performance.now(), step: window.ctrloraEvents.at(-1).step})")
        comfy.page.get_by_role("button", name="Cancel current run").click()
        wait_in_page(comfy, "() => window.ctrloraEvents.some((e) => e.status === 'cancelled')")
        events = comfy.evaluate("() => window.ctrloraEvents")
        steps = [e for e in events if e["phase"] == "train" and e["status"] == "running" and e["step"] > 0]
        step_seconds = (steps[-1]["at"] - steps[0]["at"]) / 1000 / max(steps[-1]["step"] - steps[0]["step"], 1)
        cancelled = next(e for e in events if e["status"] == "cancelled")
        latency = (cancelled["at"] - clicked["at"]) / 1000
        print(f"cancel: a step takes {step_seconds:.2f} s; stopped {latency:.2f} s after the click, at step "
              f"{cancelled['step']} (step {clicked['step']} shown at the click)")
        assert cancelled["step"] <= clicked["step"] + 1, "more than one step ran after the click"
        assert latency < step_seconds + 1.0, f"cancel took {latency:.2f} s, a step takes {step_seconds:.2f} s"

        # The node says so, and the run is kept: its state is saved at that step ...
        assert {e["node"] for e in events} == {f"{path[0]}:{path[1]}"}
        deadline = time.monotonic() + 30
        while server.get("/queue")["queue_running"] and time.monotonic() < deadline:  # the page sees it end too
            time.sleep(0.2)
        header = comfy.evaluate("""([outer, inner]) => window.app.graph.getNodeById(outer).subgraph.getNodeById(inner)
            .widgets.find((w) => w.name === 'ctrlora_loss').value""", path)
        assert header.startswith(f"step {cancelled['step']}/1000") and header.endswith("(cancelled)"), header
        comfy.evaluate("([outer]) => window.app.canvas.setGraph(window.app.graph.getNodeById(outer).subgraph)", path)
        comfy.page.wait_for_timeout(500)
        comfy.evaluate("""([outer, inner]) => {
            const canvas = window.app.canvas;
            const [x, y, w, h] = window.app.graph.getNodeById(outer).subgraph.getNodeById(inner).boundingRect;
            canvas.ds.fitToBounds([x - 40, y - 40, w + 80, h + 80]);
            canvas.setDirty(true, true);
            canvas.draw(true, true);
        }""", path)
        comfy.page.wait_for_timeout(300)
        comfy.screenshot("crash-cancelled-in-the-page.png")
        assert saved_step(output_folder(server) / "cancelled.train") == cancelled["step"]
        # ... and queueing the graph again continues it (to two more steps here).
        graph["4"]["inputs"]["steps"] = cancelled["step"] + 2
        entry = server.wait(server.queue(graph, client_id=comfy.client_id), RUN_TIMEOUT)
        assert entry["status"]["status_str"] == "success", server.explain(json.dumps(entry["status"]))
        assert f"resumed at step {cancelled['step']}" in report(entry), report(entry)
