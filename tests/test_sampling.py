"""Whole sampling runs through ComfyUI's own KSampler with a tiny SD model and the tiny VAE."""
import pytest
import torch

import nodes as comfy_nodes

from helpers import apply, load_lora, nodes, write_lora
from tiny import conditioning, tiny_model, tiny_vae


def _sample(model, positive, negative, batch=1, seed=7, sampler="euler", scheduler="normal", cfg=7.5):
    latent = {"samples": torch.zeros(batch, 4, 16, 16)}
    (out,) = comfy_nodes.common_ksampler(model, seed, 4, cfg, sampler, scheduler, positive, negative, latent)
    return out["samples"]


@pytest.fixture
def graph(golden_files):
    (base,) = nodes.LoadBaseControlNet().load("base.ckpt")
    write_lora(base, golden_files / "second.safetensors", seed=1)
    vae = tiny_vae()
    image = torch.linspace(0, 1, 32 * 32 * 3).reshape(1, 32, 32, 3)
    (latent,) = nodes.VAEConditionEncode().encode(image, vae)
    return base, tiny_model(), latent["samples"]


@pytest.mark.parametrize("sampler,scheduler,cfg,batch", [
    ("euler", "normal", 7.5, 1),
    ("dpmpp_2m", "karras", 4.0, 2),
    ("ddim", "ddim_uniform", 1.0, 1),
])
def test_control_changes_sampling_and_is_deterministic(graph, sampler, scheduler, cfg, batch):
    base, model, hint = graph
    condition = load_lora(base, "lora0.ckpt")
    plain = (conditioning(0), conditioning(1))
    controlled = apply(*plain, condition, hint)
    without = _sample(model, *plain, batch, sampler=sampler, scheduler=scheduler, cfg=cfg)
    first = _sample(model, *controlled, batch, sampler=sampler, scheduler=scheduler, cfg=cfg)
    second = _sample(model, *controlled, batch, sampler=sampler, scheduler=scheduler, cfg=cfg)
    assert torch.isfinite(first).all()
    assert (first - without).abs().mean() > 1e-3
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_two_conditions_differ_from_each_alone(graph):
    base, model, hint = graph
    a = load_lora(base, "lora0.ckpt")
    b = load_lora(base, "second.safetensors")
    plain = (conditioning(0), conditioning(1))
    only_a = _sample(model, *apply(*plain, a, hint))
    both = _sample(model, *apply(*apply(*plain, a, hint), b, hint, 0.5))
    assert (both - only_a).abs().mean() > 1e-3


def test_control_models_are_loaded_by_model_management(graph):
    """ComfyUI's model management loads the base and adapter patchers for sampling, with the UNet."""
    import comfy.model_management as mm
    base, model, hint = graph
    condition = load_lora(base, "lora0.ckpt")
    _sample(model, *apply(conditioning(0), conditioning(1), condition, hint))
    loaded = [m.model for m in mm.current_loaded_models]  # the ModelPatchers model management holds
    assert any(p is base.patcher for p in loaded) and any(p is condition.patcher for p in loaded)
