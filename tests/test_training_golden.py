"""The training objective against the official implementation: loss and the gradient of every trainable tensor of a
condition for a fixed batch, from tests/data/golden_train_tiny/ (official ``p_losses`` with the control added; its
manifest.json says how it was made and how to check a port). Then the real Trainer on the same models: the UNet and
the base stay bit-identical and exactly the official trainable set gets gradients.
"""
import json
import os

import pytest
import safetensors.torch
import torch

from tiny import DATA, tiny_model, tiny_vae
from training_helpers import config, core, objective, trainer, write_pairs

GOLDEN = os.path.join(DATA, "golden_train_tiny")
MANIFEST = json.load(open(os.path.join(GOLDEN, "manifest.json")))
INPUTS = safetensors.torch.load_file(os.path.join(GOLDEN, "inputs.safetensors"))
EXPECTED = safetensors.torch.load_file(os.path.join(GOLDEN, "expected.safetensors"))
TOLERANCES = MANIFEST["tolerances"]
TRAINABLE = MANIFEST["official_trainable"]["names"]  # relative to control_model
ZERO_GRADIENT = TOLERANCES["zero_gradient_tensors"]["names"]
UNET_PREFIX = "model.diffusion_model."


def golden_model():
    """The official tiny UNet as a ComfyUI MODEL (SD1.5 schedule; the manifest's layout is tiny.TINY_UNET's)."""
    model = tiny_model()
    tensors = safetensors.torch.load_file(os.path.join(GOLDEN, "unet.safetensors"))
    unet = {k[len(UNET_PREFIX):]: v.float() for k, v in tensors.items()}  # fp16 file, used as fp32 officially
    model.model.diffusion_model.load_state_dict(unet, strict=True)
    return model


def freeze(model, base):
    """As the manifest says: the condition's tensors trainable, everything else frozen (the UNet adds the control
    in place, which autograd allows only when the UNet does not require grad)."""
    model.model.diffusion_model.requires_grad_(False)
    base.model.requires_grad_(False)


def golden_condition(model):
    base = core.load_base(os.path.join(GOLDEN, "base.ckpt"))
    base.model.set_attention_heads(model.model.model_config.unet_config)
    condition = core.load_condition(base, os.path.join(GOLDEN, "lora.ckpt"))
    freeze(model, base)
    condition.adapter.to(torch.float32).requires_grad_(True)
    return condition


def relative(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def loss_of(model, condition):
    return objective.NoisePrediction(model, condition.base if condition else None).loss(
        condition, INPUTS["hint"], INPUTS["x0"], INPUTS["context"], INPUTS["timesteps"], INPUTS["noise"])


@pytest.fixture(scope="module")
def golden_run():
    """Loss and gradients of the pack's objective on the golden batch (and the UNet-alone loss)."""
    model = golden_model()
    condition = golden_condition(model)
    loss = loss_of(model, condition)
    loss.backward()
    grads = {name: tensor.grad for name, tensor in condition.adapter.file_tensors().items()}
    with torch.no_grad():
        unet_only = loss_of(model, None)
    return loss.detach(), unet_only, grads


def test_loss_matches_official(golden_run):
    loss, unet_only, _ = golden_run
    assert abs(loss.item() - EXPECTED["loss"].item()) / abs(EXPECTED["loss"].item()) <= TOLERANCES["loss"]["max"]
    assert abs(unet_only.item() - EXPECTED["loss_unet_only"].item()) / abs(EXPECTED["loss_unet_only"].item()) \
        <= TOLERANCES["loss_unet_only"]["max"]


def test_every_trainable_gradient_matches_official(golden_run):
    _, _, grads = golden_run
    assert sorted(grads) == sorted(TRAINABLE)
    errors = {}
    for name in TRAINABLE:
        expected = EXPECTED[f"grad/control_model.{name}"]
        actual = grads[name]
        assert actual is not None and actual.shape == expected.shape, name
        if name in ZERO_GRADIENT:
            error = (actual - expected).abs().max().item()
            limit = TOLERANCES["zero_gradient_tensors"]["max"]
        else:
            error = relative(actual, expected)
            limit = TOLERANCES["grads"]["max"]
        if error > limit:
            errors[name] = error
    assert not errors, f"{len(errors)} gradients off the official ones: {errors}"


# --- the real Trainer: what it trains and what it leaves alone ---------------------------------------------------

def state(module):
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def test_trainer_trains_exactly_the_official_set_and_leaves_the_unet_and_base_alone(tmp_path, monkeypatch):
    model = golden_model()
    base = core.load_base(os.path.join(GOLDEN, "base.ckpt"))
    unet_before, base_before = state(model.model.diffusion_model), state(base.model)
    stepped = []  # per optimizer step: {id(parameter): has a gradient}
    adamw_step = torch.optim.AdamW.step

    def recording_step(optimizer, *args, **kwargs):
        stepped.append({id(p): p.grad is not None for group in optimizer.param_groups for p in group["params"]})
        return adamw_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    run = trainer(model, base, tiny_vae(), write_pairs(str(tmp_path / "data"), 4), tmp_path, name="golden",
                  config=config(rank=4, steps=2, batch_size=2, lr=1e-3),
                  start_from=os.path.join(GOLDEN, "lora.ckpt"))
    result = run.run()

    trained = run.adapter.file_tensors()
    assert sorted(trained) == sorted(TRAINABLE)
    assert len(stepped) == 2
    for step in stepped:
        assert set(step) == {id(t) for t in trained.values()} and all(step.values())
    frozen = [*model.model.diffusion_model.named_parameters(), *base.model.named_parameters()]
    assert not [name for name, p in frozen if p.grad is not None or p.requires_grad]
    for before, module in ((unet_before, model.model.diffusion_model), (base_before, base.model)):
        after = module.state_dict()
        assert not [name for name, tensor in before.items() if not torch.equal(after[name], tensor)]

    saved = safetensors.torch.load_file(result.path)
    assert sorted(saved) == sorted(f"control_model.{name}" for name in TRAINABLE)
    start = torch.load(os.path.join(GOLDEN, "lora.ckpt"), weights_only=True)
    assert not [k for k in saved if k[len("control_model."):] not in ZERO_GRADIENT and torch.equal(saved[k], start[k])]
