"""Training with half-precision models, as on a GPU (fp16 on most, bf16 on some) or a Mac (fp16), simulated on the
CPU by storing the UNet and the base in fp16/bf16 and letting them compute in that dtype."""
import json

import importlib

import pytest
import safetensors.torch
import torch

import comfy.model_management
import comfy.model_patcher

import tiny
from conftest import pack
from training_helpers import config, core, golden_base, trainer
from training_helpers import dataset, one_thread  # noqa: F401 (fixtures)

precision = importlib.import_module(f"{pack.__name__}.training.precision")

STEPS = 6


def half_model(dtype, source):
    """The tiny UNet stored in ``dtype`` (no manual cast: it computes in ``dtype``), with ``source``'s weights."""
    config_ = tiny.TinySD15(tiny.TINY_UNET)
    config_.set_inference_dtype(dtype, None)
    model = config_.get_model({})
    model.diffusion_model.load_state_dict(source.model.diffusion_model.state_dict())
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def rounded(model, dtype):
    """An fp32 model with ``model``'s weights rounded to ``dtype``: the fp32 run sees the same frozen weights."""
    reference = tiny.tiny_model()
    with torch.no_grad():
        for p in reference.model.diffusion_model.parameters():
            p.copy_(p.to(dtype).float())
    return reference


def half_base(dtype, monkeypatch):
    """The golden base stored in ``dtype`` and computing in it, as ComfyUI loads it on a GPU."""
    monkeypatch.setattr(comfy.model_management, "unet_manual_cast", lambda *args, **kwargs: None)
    return core.load_base(tiny.GOLDEN + "/base.ckpt", dtype=dtype)


def fp32_base_from(base):
    tensors = {k: v.float() for k, v in base.model.state_dict().items()}
    return core.base.base_from_tensors(tensors, base.name, dtype=torch.float32)


def moved(path, start):
    """The update of every condition tensor of a trained file, by group (LoRA up, LoRA down, norms, the rest)."""
    trained = safetensors.torch.load_file(path)
    groups = {}
    for key, initial in start.items():
        group = "up" if key.endswith("up.weight") else "down" if key.endswith("down.weight") else \
            "norms" if "norm" in key else "zero convs"
        groups.setdefault(group, []).append((trained["control_model." + key] - initial.float()).flatten())
    return {group: torch.cat(parts) for group, parts in groups.items()}


# Measured (6 steps, lr 1e-4): fp16 at most 0.087 (LoRA up), bf16 0.18 (LoRA down); before the trained tensors were
# kept fp32 and fp16 scaled, fp16 was off by up to 0.39. bf16's 8 bits make its run differ by that much either way:
# test_trained_tensors_enter_the_forward_unrounded covers it.
@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 0.12), (torch.bfloat16, 0.25)])
def test_half_precision_models_train_the_condition_as_fp32_does(dataset, tmp_path, monkeypatch, dtype, tolerance):
    """The condition's tensors move as in an fp32 run of the same (rounded) frozen weights, norms included, although
    the models compute in half precision: per group, |update - fp32 update| / |fp32 update| < ``tolerance``
    (fp16 keeps 11 significant bits, bf16 8; Adam turns small gradient differences into full-size steps)."""
    reference_model = rounded(tiny.tiny_model(), dtype)
    model = half_model(dtype, reference_model)
    base = half_base(dtype, monkeypatch)
    reference_base = fp32_base_from(base)
    cfg = config(steps=STEPS, lr=1e-4, validation_fraction=0)
    half = trainer(model, base, tiny.tiny_vae(), dataset, tmp_path / "out", "half", config=cfg).run()
    full = trainer(reference_model, reference_base, tiny.tiny_vae(), dataset, tmp_path / "out", "full",
                   config=cfg).run()
    expected_precision = "fp16 autocast with loss scaling" if dtype == torch.float16 else "bf16 autocast"
    assert expected_precision + ")" in half.report and "fp32)" in full.report

    start = core.ConditionAdapter.fresh(base.model, 4, torch.Generator().manual_seed(0)).file_tensors()
    half_moves, full_moves = moved(half.path, start), moved(full.path, start)
    differences = {g: float((half_moves[g] - full_moves[g]).norm() / full_moves[g].norm()) for g in full_moves}
    assert all(d < tolerance for d in differences.values()), differences
    # AdamW moves a weight by about lr per step; a norm weight near 1.0 stored in fp16 could not show that.
    assert half_moves["norms"].abs().max() > 0.5 * 1e-4 * STEPS


def test_trained_tensors_enter_the_forward_unrounded(dataset, tmp_path, monkeypatch):
    """With the base stored in fp16, a trained norm runs with its fp32 master weight (computing in fp32), not with a
    copy rounded to the base's dtype."""
    base = half_base(torch.float16, monkeypatch)
    run = trainer(half_model(torch.float16, tiny.tiny_model()), base, tiny.tiny_vae(), dataset, tmp_path / "out",
                  "seen", config=config(steps=1, validation_fraction=0))
    run.prepare()
    seen = []
    norm = base.model.input_blocks[1][1].transformer_blocks[0].norm1
    norm.register_forward_hook(lambda module, args, output: seen.append((module.weight.dtype, output.dtype)))
    with torch.inference_mode(False), torch.enable_grad():
        run.train_step()
    assert seen == [(torch.float32, torch.float16)]


def test_fp16_models_never_train_unscaled(dataset, tmp_path, monkeypatch):
    """'auto' with fp16 models (a Mac's MPS, most GPUs) scales the loss; the scaler's state is saved and restored."""
    model = half_model(torch.float16, tiny.tiny_model())
    base = half_base(torch.float16, monkeypatch)
    cfg = config(steps=2, save_every=1, validation_fraction=0)
    run = trainer(model, base, tiny.tiny_vae(), dataset, tmp_path / "out", "scaled", config=cfg)
    run.prepare()
    assert run.updater.scaler is not None and run.precision.compute == torch.float16
    # The trained tensors stay fp32 masters; the frozen ones stay as ComfyUI stored them.
    assert all(t.dtype == torch.float32 and t.requires_grad for t in run.adapter.tensors)
    assert next(model.model.diffusion_model.parameters()).dtype == torch.float16


@pytest.mark.parametrize("device, models, setting, expected", [
    ("mps", (torch.float16, torch.float16), "auto", (torch.float16, True, "")),
    ("cuda", (torch.bfloat16, torch.bfloat16), "auto", (torch.bfloat16, False, "")),
    ("cpu", (torch.float32, torch.float32), "auto", (torch.float32, False, "")),
    ("cuda", (torch.float16, torch.float16), "bf16", (torch.bfloat16, True, "recast")),
    ("cpu", (torch.float32, torch.float32), "fp16", (torch.float16, True, "")),
])
def test_precision_follows_the_models_dtype(device, models, setting, expected):
    chosen = precision.choose_precision(setting, torch.device(device), models, "Train CtrLoRA")
    assert (chosen.compute, chosen.scaled) == expected[:2] and expected[2] in chosen.note


def test_fp32_with_half_models_says_how_to_get_fp32():
    with pytest.raises(core.CtrLoRAError, match="--fp32-unet"):
        precision.choose_precision("fp32", torch.device("cuda"), (torch.float16,), "Train CtrLoRA")


def test_loss_scaler_skips_are_counted_and_an_all_skipped_run_fails(dataset, tmp_path, monkeypatch):
    """Gradients that overflow are skipped by the scaler and counted; a run in which every step was skipped is an
    error, never 'done'."""
    run = trainer(tiny.tiny_model(), golden_base(), tiny.tiny_vae(), dataset, tmp_path / "out", "inf",
                  config=config(steps=3, precision="fp16", validation_fraction=0))
    run.prepare()
    for tensor in run.adapter.tensors:
        tensor.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(core.CtrLoRAError, match="every one of the 3 steps was skipped"):
        with torch.inference_mode(False), torch.enable_grad():
            run._train_and_save()
    assert run.updater.skipped == 3 and not (tmp_path / "out" / "inf.safetensors").exists()
    saved = json.load(open(tmp_path / "out" / "inf.train" / "state.json"))
    assert saved["updater"]["skipped"] == 3
