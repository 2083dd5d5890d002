"""The training memory estimate (``training.memory``) against what a real training step of the pack keeps for
backward: ``NoisePrediction.loss`` through a ``Condition``, then backward, on the CPU, with and without gradient
checkpointing, at two latent sizes and two batch sizes, for the tiny and a small model."""
import contextlib
import importlib
import json
import os
import time

import pytest
import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.supported_models

import pretrain_models
import tiny
from conftest import pack
from sd15_standins import SD15_UNET
from training_helpers import base_from_unet, core, golden_base, objective, one_thread  # noqa: F401 (fixture)

memory = importlib.import_module(f"{pack.__name__}.training.memory")
checkpointing = importlib.import_module(f"{pack.__name__}.training.checkpointing")

# The activations the estimate counts are within this factor of those a real step keeps, either way: it replays
# the step's own code on meta tensors, so only the stand-ins of a few ops and of attention can differ.
ACTIVATION_FACTOR = 1.05
SHAPES = [(1, 8), (2, 8), (1, 16), (2, 16)]  # (batch, latent side): two sizes, two batches


def stored_model(unet_config, dtype, seed=0):
    """A tiny-family MODEL whose UNet is stored (and computes) in ``dtype``, as ComfyUI loads one on a GPU."""
    config = tiny.TinySD15(unet_config)
    config.set_inference_dtype(dtype, None)
    inner = config.get_model({})
    tiny.fill_(inner.diffusion_model, seed, scale=0.05)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(inner, load_device=device, offload_device=device)


@pytest.fixture(scope="module")
def small_base_file(tmp_path_factory):
    return str(base_from_unet(stored_model(pretrain_models.SMALL_UNET, torch.float32),
                              tmp_path_factory.mktemp("small") / "base.safetensors"))


def setup(size, dtype, small_base_file):
    """Objective, base and a fresh rank-8 adapter; the base stored in ``dtype`` (ComfyUI's manual cast to fp32 on the
    CPU for half dtypes, as it loads it there)."""
    if size == "tiny":
        model = stored_model(tiny.TINY_UNET, dtype)
        base = golden_base() if dtype == torch.float32 else core.load_base(tiny.GOLDEN + "/base.ckpt", dtype=dtype)
    else:
        model = stored_model(pretrain_models.SMALL_UNET, dtype)
        base = core.load_base(small_base_file, dtype=dtype)
    base.model.set_attention_heads(model.model.model_config.unet_config)
    model.model.diffusion_model.requires_grad_(False)
    base.model.requires_grad_(False)
    adapter = core.ConditionAdapter.fresh(base.model, 8, torch.Generator().manual_seed(1))
    adapter.requires_grad_(True)
    return objective.NoisePrediction(model, base), base, adapter


def measured_step(loss_of, base, adapter, shape, compute_dtype, checkpointed, monkeypatch):
    """Runs one real training step; returns the bytes it kept for backward (storages saved by autograd and the
    inputs of checkpointed blocks that recorded anything, weights excluded) and those of its gradients and AdamW
    moments."""
    weights = {t.untyped_storage()._cdata for module in (loss_of.unet, base.model, adapter)
               for t in module.parameters()}
    kept = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            kept[storage._cdata] = storage.nbytes()

    def pack_hook(tensor):
        keep(tensor)
        return tensor

    real_checkpoint = torch.utils.checkpoint.checkpoint

    def checkpoint(function, tensors, args, kwargs, **options):
        output = real_checkpoint(function, tensors, args, kwargs, **options)
        if output.grad_fn is not None:  # else nothing holds the checkpoint's inputs
            for value in (*args, *kwargs.values()):
                if isinstance(value, torch.Tensor):
                    keep(value)
        return output

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", checkpoint)
    batch = shape[0]
    generator = torch.Generator().manual_seed(2)
    inputs = {name: torch.randn(shape, generator=generator) for name in ("hint", "x0", "noise")}
    inputs["context"] = torch.randn(batch, memory.CONTEXT_TOKENS, tiny.CONTEXT_DIM, generator=generator)
    inputs["timesteps"] = torch.randint(0, 1000, (batch,), generator=generator)
    condition = core.Condition(base, adapter, "measured")
    half = compute_dtype != torch.float32
    autocast = torch.autocast("cpu", dtype=compute_dtype) if half else contextlib.nullcontext()
    wrapped = checkpointing.gradient_checkpointing(checkpointing.checkpoint_targets(base.model, loss_of.unet)) \
        if checkpointed else contextlib.nullcontext()
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-5)
    with wrapped, torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        with autocast:
            loss = loss_of.loss(condition, **inputs)
        loss.backward()
    monkeypatch.undo()
    optimizer.step()
    state = [t for p in adapter.parameters() for t in (p.grad, *optimizer.state[p].values()) if t.numel() > 1]
    return sum(kept.values()), sum(t.numel() * t.element_size() for t in state)


@pytest.mark.parametrize("size, dtype, attention, shapes", [
    ("tiny", torch.float32, None, SHAPES),
    ("small", torch.float32, None, SHAPES),
    ("tiny", torch.bfloat16, None, SHAPES[::3]),  # UNet and base stored in bf16, bf16 autocast
    ("tiny", torch.float32, "attention_pytorch", SHAPES[::3]),  # SDPA, as on NVIDIA GPUs: no score matrix saved
], ids=["tiny", "small", "tiny-bf16", "tiny-sdpa"])
@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
def test_estimate_matches_what_a_training_step_keeps(size, dtype, attention, shapes, checkpointed, small_base_file,
                                                      monkeypatch):
    if attention:
        implementation = getattr(comfy_attention, attention)
        monkeypatch.setattr(comfy_attention, "optimized_attention", implementation)
        monkeypatch.setattr(comfy_attention, "optimized_attention_masked", implementation)
    loss_of, base, adapter = setup(size, dtype, small_base_file)
    kept = {}
    for batch, latent in shapes:
        shape = [batch, 4, latent, latent]
        estimate = memory.estimate_training_memory(loss_of, base, shape, dtype, checkpointed, adapter)
        with monkeypatch.context() as patch:
            activations, trained_state = measured_step(loss_of, base, adapter, shape, dtype, checkpointed, patch)
        kept[batch, latent] = activations
        assert activations / ACTIVATION_FACTOR <= estimate.activations <= activations * ACTIVATION_FACTOR, \
            (shape, estimate, activations)
        assert estimate.trained_state == trained_state
        total = memory.training_memory_required(loss_of, base, shape, dtype, checkpointed, adapter)
        assert total == estimate.total >= activations + trained_state
    # What is measured grows with the batch and the latent area: the check above is not met by a constant.
    assert kept[2, 16] > 4 * kept[1, 8], kept


def sd15_meta_setup():
    """A full-size SD1.5 UNet, base and rank-128 adapter on the meta device (nothing allocated)."""
    config = comfy.supported_models.SD15(SD15_UNET)
    config.set_inference_dtype(torch.float16, None)
    inner = config.get_model({}, device="meta")
    model = comfy.model_patcher.ModelPatcher(inner, load_device=torch.device("cpu"), offload_device="cpu")
    manifest = json.load(open(os.path.join(tiny.DATA, "sd15_key_manifest.json")))
    base_keys = manifest["base_controlnet"]["keys_core_plus_zero_convs_and_norms"]
    meta = lambda keys: {k.split(".", 1)[1]: torch.empty(s, device="meta") for k, s in keys.items()}  # noqa: E731
    control_model = core.model.build_from_state_dict(meta(base_keys), torch.float16, "meta",
                                                     comfy.ops.disable_weight_init, "sd15")
    control_model.set_attention_heads(SD15_UNET)
    base = core.BaseControlNet(control_model, "sd15", torch.device("cpu"), None)
    lora_keys = manifest["lora_file_rank128"]["keys"]
    adapter = core.ConditionAdapter.from_file_tensors(meta(lora_keys), control_model, "lora")
    return objective.NoisePrediction(model, base), base, adapter


def test_estimate_at_sd15_size_is_cheap_and_scales():
    loss_of, base, adapter = sd15_meta_setup()
    memory.training_memory_required(loss_of, base, [1, 4, 64, 64], torch.float16, False, adapter)  # imports, caches
    started = time.process_time()
    plain = memory.estimate_training_memory(loss_of, base, [1, 4, 64, 64], torch.float16, False, adapter)
    assert time.process_time() - started < 1.0  # CPU time: the machine's load does not count
    checkpointed = memory.estimate_training_memory(loss_of, base, [1, 4, 64, 64], torch.float16, True, adapter)
    double = memory.estimate_training_memory(loss_of, base, [2, 4, 64, 64], torch.float16, False, adapter)
    assert checkpointed.activations < plain.activations / 10
    assert 1.9 < double.activations / plain.activations < 2.1
    # rank 128: 37M trained fp32 numbers with their gradients and two moments
    assert plain.trained_state == 3 * 4 * sum(t.numel() for t in adapter.tensors) > 400 * 2 ** 20


def test_estimate_leaves_models_and_comfyui_as_they_were(small_base_file):
    loss_of, base, adapter = setup("tiny", torch.float32, small_base_file)
    modules = (loss_of.unet, base.model, adapter)
    before = [(id(t), t.data_ptr(), t._version, t.device) for m in modules for t in m.parameters()]
    attention = comfy_attention.optimized_attention
    # A LoRA ComfyUI applies at each op (a partly loaded model): it needs real weights, so the probe sets it aside.
    patched = next(m for m in loss_of.unet.modules() if hasattr(m, "weight_function"))
    patch = [lambda weight: weight * float(weight.abs().max())]
    patched.weight_function = patch
    memory.training_memory_required(loss_of, base, [2, 4, 16, 16], torch.bfloat16, True, adapter)
    assert patched.weight_function is patch
    assert [(id(t), t.data_ptr(), t._version, t.device) for m in modules for t in m.parameters()] == before
    assert comfy_attention.optimized_attention is attention
    assert not any(m._forward_hooks or m._forward_pre_hooks for module in modules for m in module.modules())
    assert not any("forward" in m.__dict__ for module in modules for m in module.modules())
