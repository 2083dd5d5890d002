"""Training a condition on the real host (CPU, tiny models): it learns, its file is official, cancel/resume, errors."""
import dataclasses
import json
import os
import sys
import types

import pytest
import safetensors
import safetensors.torch
import torch

import comfy.model_management
import comfy.ops
import comfy.utils

import tiny
from conftest import pack
from helpers import apply, control_outputs, sigmas_for
from training_helpers import (SIZE, base_from_unet, config, core, golden_base, held_out_batch, objective,
                              pretrain_unet, prompt_encoder, tiny_clip, trainer, training, unit_latent_model,
                              write_pairs)
from training_helpers import dataset, one_thread  # noqa: F401 (fixtures)

CtrLoRAError = core.CtrLoRAError
Interrupted = comfy.model_management.InterruptProcessingException


@pytest.fixture
def input_dataset(dataset, monkeypatch):
    """The dataset as the node sees it: by name, in ComfyUI's input folder."""
    import folder_paths
    monkeypatch.setattr(folder_paths, "input_directory", os.path.dirname(dataset))
    return os.path.basename(dataset)


@pytest.fixture
def out(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def adapter_tensors(path):
    return safetensors.torch.load_file(str(path))


class CancelAt(training.ComfyReporter):
    """Presses ComfyUI's cancel (the real interrupt flag) at the ``call``-th cancel check of the run."""

    def __init__(self, call, **kwargs):
        super().__init__(min_interval=0.0, **kwargs)
        self.call, self.calls = call, 0

    def check_cancel(self):
        self.calls += 1
        if self.calls == self.call:
            comfy.model_management.interrupt_current_processing(True)
        super().check_cancel()


# --- it learns ---------------------------------------------------------------------------------------------------

def test_it_learns_the_condition(tmp_path):
    """A tiny SD model pretrained (unconditionally) on the domain; the condition fixes where the red cells are.

    The base is a copy of the UNet's encoder with zero zero-convs, so at step 0 (and for the base alone) the control
    is zero: step-0 loss == base-only loss == UNet-alone loss. After 400 steps the held-out loss (fixed timesteps
    over the whole schedule, fixed noise) is clearly lower, and giving the trained condition other items' hints
    makes it worse than the UNet alone: it uses the condition, not just a shift of the output.

    Learning rate 3e-3, not the official 1e-5, and why: AdamW moves every weight by about the learning rate per
    step whatever the model's size. For SD1.5 the official rate is enough because each control output sums rank-128
    LoRAs over 320-1280 channels; this model has 32 channels and rank 8, so its weights must travel much further per
    unit of control, and at 1e-5 the same 400 steps move each of them 300x less than here (it would need hours of
    CI). The rate is part of the recipe being tested only through AdamW's update rule, which is the same.
    """
    folder = write_pairs(str(tmp_path / "train"), 64, seed=0)
    held_folder = write_pairs(str(tmp_path / "held"), 16, seed=1)
    model, vae, encode = unit_latent_model(), tiny.tiny_vae(), prompt_encoder()
    latent_format = model.model.latent_format
    pairs, report = training.scan(folder, "a pattern")
    pretrain_unet(model, training.encode_dataset(pairs, report, vae, encode, latent_format, SIZE), steps=400)
    base = core.load_base(str(base_from_unet(model, tmp_path / "base.safetensors")))

    cfg = config(rank=8, steps=400, batch_size=4, lr=3e-3)
    result = trainer(model, base, vae, folder, tmp_path, "learnt", encode, config=cfg, template="a pattern").run()

    pairs, report = training.scan(held_folder, "a pattern")
    held, timesteps, noise = held_out_batch(training.encode_dataset(pairs, report, vae, encode, latent_format, SIZE))
    loss = training.NoisePrediction(model, base)
    step0 = core.Condition(base, core.ConditionAdapter.fresh(base.model, 8, torch.Generator().manual_seed(0)), "0")
    shuffled = dataclasses.replace(held, hints=held.hints.roll(1, 0))
    losses = {
        "step 0": objective.mean_loss(loss, step0, held, timesteps, noise),
        "UNet alone (= base only)": objective.mean_loss(loss, None, held, timesteps, noise),
        "trained": objective.mean_loss(loss, result.condition, held, timesteps, noise),
        "trained, other items' hints": objective.mean_loss(loss, result.condition, shuffled, timesteps, noise),
    }
    print(json.dumps(losses, indent=1))
    assert losses["step 0"] == pytest.approx(losses["UNet alone (= base only)"], rel=1e-6)
    assert losses["trained"] < 0.9 * losses["step 0"]
    assert losses["trained, other items' hints"] > 1.1 * losses["trained"]
    assert losses["trained, other items' hints"] > losses["UNet alone (= base only)"]


# --- the file ------------------------------------------------------------------------------------------------------

def test_saved_file_is_official_and_loads_through_load_ctrlora(golden_files, dataset):
    base = golden_base()
    result = trainer(tiny.tiny_model(), base, tiny.tiny_vae(), dataset, golden_files, "pattern",
                     config=config(steps=3), template="a {kind} pattern").run()
    path = golden_files / "pattern.safetensors"
    assert result.path == str(path) and result.steps == 3 and len(result.losses) == 3
    tensors = adapter_tensors(path)
    expected = core.lora.expected_shapes(base.model, 4)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"control_model." + k: s for k, s in expected.items()}
    with safetensors.safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert metadata["rank"] == "4" and metadata["base"] == "base.ckpt" and metadata["steps"] == "3"
    # One of the 8 pairs is held out for the validation loss (the default fraction, at least one pair).
    assert metadata["dataset_size"] == "7" and metadata["validation_pairs"] == "1"
    assert metadata["prompt_template"] == "a {kind} pattern"
    assert not os.path.exists(golden_files / "pattern.train" / "state.json")  # a finished run keeps no state

    (loaded_base,) = pack.nodes.inference.LoadBaseControlNet().load("base.ckpt")
    loaded = pack.nodes.inference.LoadCtrLoRA().load(loaded_base, "pattern.safetensors")["result"][0]
    model = tiny.tiny_model()
    hint, context = torch.randn(1, 4, 8, 8), torch.randn(1, 7, tiny.CONTEXT_DIM)
    timesteps = torch.tensor([500.0])
    sigmas = sigmas_for(model, timesteps)
    outputs = [control_outputs(apply(*[[[context, {}]]] * 2, condition, hint)[0], model, sigmas, context)
               for condition in (result.condition, loaded)]
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(o.abs().max() > 0 for o in outputs[0])


def test_sd15_output_has_the_246_official_keys():
    """At SD1.5 size the trainer writes ``ConditionAdapter.file_tensors()``: the official rank-128 LoRA layout."""
    manifest = json.load(open(os.path.join(tiny.DATA, "sd15_key_manifest.json")))
    base_keys = manifest["base_controlnet"]["keys_core_plus_zero_convs_and_norms"]
    model = core.model.build_from_state_dict(
        {k[len("control_model."):]: torch.empty(s, device="meta") for k, s in base_keys.items()},
        torch.float32, "meta", comfy.ops.disable_weight_init, "sd15")
    written = {"control_model." + core.lora.file_key(n) for n in core.lora.binding_names(model)}
    assert written == set(manifest["lora_file_rank128"]["keys"]) and len(written) == 246


def test_training_from_an_existing_file_continues_from_its_weights(dataset, out):
    model, base, vae = tiny.tiny_model(), golden_base(), tiny.tiny_vae()
    first = trainer(model, base, vae, dataset, out, "first", config=config(steps=4, lr=1e-2)).run()
    fresh = core.ConditionAdapter.fresh(base.model, 4, torch.Generator().manual_seed(0)).file_tensors()
    second = trainer(model, base, vae, dataset, out, "second", config=config(steps=1, lr=1e-8, seed=3),
                     start_from=first.path).run()
    before, after = adapter_tensors(first.path), adapter_tensors(second.path)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=1e-6)
    moved = max((before["control_model." + k] - v).abs().max().item() for k, v in fresh.items())
    assert moved > 1e-3  # the first run did move away from a fresh start; the second started where it ended
    with pytest.raises(CtrLoRAError, match="rank 4"):
        trainer(model, base, vae, dataset, out, "third", config=config(rank=8), start_from=first.path).run()


# --- cancel, resume ------------------------------------------------------------------------------------------------

def test_cancel_mid_step_saves_a_loadable_checkpoint_and_resume_matches_an_uninterrupted_run(dataset, out):
    """8 steps of 2 micro-batches; cancel arrives in the second micro-batch of step 6 (cancel check 13 of the run:
    1 while encoding, then 2 per step), after the first micro-batch's backward.

    The saved state is the step-5 boundary (weights, AdamW moments, RNG and data order); the resumed run redoes
    step 6 and ends with exactly the weights of an uninterrupted run (CPU, fp32: bit-identical).
    """
    model, base, vae = tiny.tiny_model(), golden_base(), tiny.tiny_vae()
    cfg = config(steps=8, grad_accum=2, save_every=3)
    full = trainer(model, base, vae, dataset, out, "full", config=cfg).run()

    with pytest.raises(Interrupted):
        trainer(model, base, vae, dataset, out, "cond", config=cfg, reporter=CancelAt(13)).run()
    assert not (out / "cond.safetensors").exists()
    run_folder = out / "cond.train"
    state = json.load(open(run_folder / "state.json"))
    assert state["step"] == 5
    assert sorted(os.listdir(run_folder)) == ["cond_step000003.safetensors", "cond_step000005.safetensors",
                                              "state-00000005.tensors", "state.json"]
    snapshot = core.load_condition(base, str(run_folder / "cond_step000005.safetensors"))
    assert snapshot.adapter.rank == 4

    resumed = trainer(model, base, vae, dataset, out, "cond", config=cfg).run()
    assert resumed.steps == 8 and "resumed at step 5" in resumed.report
    assert [l for _, l in resumed.losses] == [l for _, l in full.losses]
    expected, actual = adapter_tensors(full.path), adapter_tensors(resumed.path)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_resume_refuses_a_different_run(dataset, out, tmp_path):
    model, base, vae = tiny.tiny_model(), golden_base(), tiny.tiny_vae()
    with pytest.raises(Interrupted):
        trainer(model, base, vae, dataset, out, "cond", config=config(steps=5), reporter=CancelAt(3)).run()
    with pytest.raises(CtrLoRAError, match="lr: saved 0.001, now 0.002"):
        trainer(model, base, vae, dataset, out, "cond", config=config(steps=5, lr=2e-3)).run()
    with pytest.raises(CtrLoRAError, match="saved run of 'cond' exists"):
        trainer(model, base, vae, dataset, out, "cond", config=config(steps=5), resume=False).run()
    other = write_pairs(str(tmp_path / "other"), 8, seed=5)
    with pytest.raises(CtrLoRAError, match="dataset differs"):
        trainer(model, base, vae, other, out, "cond", config=config(steps=5)).run()
    # A longer run of the same settings continues it.
    assert trainer(model, base, vae, dataset, out, "cond", config=config(steps=7)).run().steps == 7


def test_a_new_run_does_not_mix_with_files_of_an_earlier_one(dataset, out):
    (out / "cond.train").mkdir()
    (out / "cond.train" / "cond_step000002.safetensors").write_bytes(b"earlier run")
    with pytest.raises(CtrLoRAError, match="earlier run"):
        trainer(tiny.tiny_model(), golden_base(), tiny.tiny_vae(), dataset, out, "cond").run()
    assert (out / "cond.train" / "cond_step000002.safetensors").read_bytes() == b"earlier run"


def test_a_failing_run_never_reports_success_and_keeps_its_state(dataset, out):
    class Failing(training.ComfyReporter):
        def step(self, step, total, loss, **kwargs):
            super().step(step, total, loss, **kwargs)
            if step == 3:
                raise RuntimeError("device lost")

    with pytest.raises(RuntimeError, match="device lost"):
        trainer(tiny.tiny_model(), golden_base(), tiny.tiny_vae(), dataset, out, "cond",
                reporter=Failing(output="cond")).run()
    assert not (out / "cond.safetensors").exists()
    assert json.load(open(out / "cond.train" / "state.json"))["step"] == 3


# --- visible ------------------------------------------------------------------------------------------------------

def test_progress_bar_loss_events_and_text(dataset, out, monkeypatch):
    sent, texts, bar = [], [], []
    server = types.SimpleNamespace(send_sync=lambda event, data, sid=None: sent.append((event, json.loads(json.dumps(data)))),
                                   send_progress_text=lambda text, node_id, sid=None: texts.append((node_id, text)))
    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=server)))
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None: bar.append((value, total, node_id)))
    reporter = training.ComfyReporter(node_id="12", output="cond", min_interval=0.0)
    result = trainer(tiny.tiny_model(), golden_base(), tiny.tiny_vae(), dataset, out, "cond",
                     config=config(steps=5), reporter=reporter).run()

    assert {event for event, _ in sent} == {training.EVENT}
    train = [data for _, data in sent if data["phase"] == "train"]
    assert all(data["node"] == "12" for _, data in sent)
    assert [p for data in train for p in data["losses"]] == [list(x) for x in result.losses]
    assert train[-1]["status"] == "done" and train[-2]["loss"] == pytest.approx(result.losses[-1][1])
    assert any(data["phase"] == "encode" for _, data in sent)
    assert bar[-1] == (5, 5, "12")
    assert any("loss" in text for _, text in texts)


# --- options --------------------------------------------------------------------------------------------------------

def test_gradient_checkpointing_gives_the_same_training(dataset, out):
    model, base, vae = tiny.tiny_model(), golden_base(), tiny.tiny_vae()
    plain = trainer(model, base, vae, dataset, out, "plain", config=config(steps=3)).run()
    checkpointed = trainer(model, base, vae, dataset, out, "ckpt", config=config(steps=3, gradient_checkpointing=True)).run()
    a, b = adapter_tensors(plain.path), adapter_tensors(checkpointed.path)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert "forward" not in base.model.input_blocks[1].__dict__  # unwrapped afterwards


def test_bf16_autocast_path_runs(dataset, out):
    result = trainer(tiny.tiny_model(), golden_base(), tiny.tiny_vae(), dataset, out, "bf16",
                     config=config(steps=2, precision="bf16")).run()
    assert all(torch.isfinite(torch.tensor(l)) for _, l in result.losses) and os.path.exists(result.path)


def test_fp16_with_loss_scaling_resumes_with_its_scaler(dataset, out):
    """The GPU path's fp16 autocast + GradScaler, on the CPU: the scaler's state is saved and restored."""
    model, base, vae = tiny.tiny_model(), golden_base(), tiny.tiny_vae()
    cfg = config(steps=4, precision="fp16")
    full = trainer(model, base, vae, dataset, out, "full", config=cfg).run()
    with pytest.raises(Interrupted):
        trainer(model, base, vae, dataset, out, "cond", config=cfg, reporter=CancelAt(4)).run()
    saved = json.load(open(out / "cond.train" / "state.json"))
    assert saved["step"] == 2 and saved["updater"]["scaler"]["scale"] > 1
    resumed = trainer(model, base, vae, dataset, out, "cond", config=cfg).run()
    expected, actual = adapter_tensors(full.path), adapter_tensors(resumed.path)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


# --- bad input ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", "..", "", "   ", ".hidden", "c:evil"])
def test_output_names_that_leave_the_folder_are_refused(dataset, out, name):
    with pytest.raises(CtrLoRAError, match="output name"):
        trainer(tiny.tiny_model(), golden_base(), tiny.tiny_vae(), dataset, out, name).run()
    assert os.listdir(out) == [] and not os.path.exists(out.parent / "evil.safetensors")


def test_an_existing_output_is_never_overwritten(dataset, out):
    (out / "taken.safetensors").write_bytes(b"precious")
    with pytest.raises(CtrLoRAError, match="already exists"):
        trainer(tiny.tiny_model(), golden_base(), tiny.tiny_vae(), dataset, out, "taken").run()
    assert (out / "taken.safetensors").read_bytes() == b"precious" and sorted(os.listdir(out)) == ["taken.safetensors"]


@pytest.mark.parametrize("overrides,message", [
    ({"rank": 0}, "rank 0 is out of range"),
    ({"rank": 4096}, "rank 4096 is out of range"),
    ({"resolution": 16}, "resolution 16 is out of range"),
    ({"resolution": 4096}, "resolution 4096 is out of range"),
    ({"resolution": 34}, "must be a multiple of 4"),
    ({"lr": 0.0}, "learning rate"),
])
def test_out_of_range_settings_are_refused(dataset, out, overrides, message):
    with pytest.raises(CtrLoRAError, match=message):
        trainer(tiny.tiny_model(), golden_base(), tiny.tiny_vae(), dataset, out, "cond", config=config(**overrides)).run()
    assert os.listdir(out) == []


# --- the node ------------------------------------------------------------------------------------------------------

def test_frozen_models_are_prepared_before_comfyui_loads_them(dataset, out, monkeypatch):
    """Weights a node made under inference mode are replaced by copies autograd can use before ComfyUI loads the
    models (moves, pins or patches them), never after: a model a sampler left loaded is unloaded first."""
    with torch.inference_mode():
        model, base = tiny.tiny_model(), golden_base()
    comfy.model_management.load_models_gpu([model])  # as a sampling run leaves it
    loads = []
    load_models_gpu = comfy.model_management.load_models_gpu

    def spy(models, *args, **kwargs):
        loads.append(any(p.is_inference() for m in models for p in m.model.parameters()))
        return load_models_gpu(models, *args, **kwargs)

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", spy)
    trainer(model, base, tiny.tiny_vae(), dataset, out, "cond", config=config(steps=1)).prepare()
    assert loads and not any(loads)
    assert any(m is model for m in comfy.model_management.loaded_models())


def test_node_trains_inside_inference_mode_with_a_real_clip(golden_files, input_dataset):
    """As ComfyUI runs it: models loaded and the node executed under torch.inference_mode(), a real (tiny) CLIP."""
    node = pack.nodes.training.TrainCtrLoRA
    assert pack.NODE_CLASS_MAPPINGS["CtrLoRATrain"] is node and node.CATEGORY == "conditioning/ctrlora"
    assert "lora0.ckpt" in node.INPUT_TYPES()["required"]["start_from"][0]
    with torch.inference_mode():
        model, vae, clip = tiny.tiny_model(), tiny.tiny_vae(), tiny_clip()
        (base,) = pack.nodes.inference.LoadBaseControlNet().load("base.ckpt")
        output = node().train(model, clip, vae, base, input_dataset, "a {kind} pattern, {name}", "from_node", 4, 3, 2, 1,
                              1e-3, 0.3, SIZE, 0, 0, True, pack.nodes.training.NO_START, False, unique_id="3")
        condition, report, grid = output["result"]
        assert "Saved" in report and "8 pairs used" in report and "Held-out loss (1 pairs)" in report
        # The default preview (at the last step) of the held-out pair: condition | target | preview at step 3.
        assert grid.shape == (1, SIZE, 3 * SIZE, 3) and output["ui"]["images"][0]["type"] == "temp"
        assert (golden_files / "from_node.train" / "previews" / "step000003.png").exists()
        assert (golden_files / "from_node.safetensors").exists()
        positive, _ = apply(*[[[torch.randn(1, 77, tiny.CONTEXT_DIM), {}]]] * 2, condition, torch.randn(1, 4, 8, 8))
        outputs = control_outputs(positive, model, sigmas_for(model, torch.tensor([10.0])), positive[0][0])
        assert len(outputs) == 5 and all(torch.isfinite(o).all() for o in outputs)


def test_node_cancel_then_queue_again_resumes_inside_inference_mode(golden_files, input_dataset, monkeypatch):
    """Cancel (ComfyUI's interrupt flag) after step 2, then the same node queued again finishes the run."""
    node = pack.nodes.training.TrainCtrLoRA
    step = training.ComfyReporter.step
    pressed = []

    def cancel_after_step_2(self, number, total, loss, **kwargs):
        step(self, number, total, loss, **kwargs)
        if number == 2 and not pressed:
            pressed.append(number)
            comfy.model_management.interrupt_current_processing(True)

    monkeypatch.setattr(training.ComfyReporter, "step", cancel_after_step_2)
    with torch.inference_mode():
        model, vae, clip = tiny.tiny_model(), tiny.tiny_vae(), tiny_clip()
        (base,) = pack.nodes.inference.LoadBaseControlNet().load("base.ckpt")
        inputs = (model, clip, vae, base, input_dataset, "", "resumed", 4, 4, 2, 1, 1e-3, 0.3, SIZE, 0, 0, True,
                  pack.nodes.training.NO_START, False)
        with pytest.raises(Interrupted):
            node().train(*inputs)
        assert json.load(open(golden_files / "resumed.train" / "state.json"))["step"] == 2
        assert not (golden_files / "resumed.safetensors").exists()
        _, report, _ = node().train(*inputs)["result"]
    assert "resumed at step 2" in report and (golden_files / "resumed.safetensors").exists()
