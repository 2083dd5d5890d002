"""Multi-condition semantics, strength, timestep range, hint handling and memory, on the real host."""
import pytest
import torch

from conftest import pack
from helpers import apply, control_outputs, load_condition, load_lora, nodes, sigmas_for, write_lora
from tiny import conditioning, tiny_model

core = pack.ctrlora_core
TIMESTEPS = torch.tensor([999, 500])


@pytest.fixture
def setup(golden_files):
    (base,) = nodes.LoadBaseControlNet().load("base.ckpt")
    write_lora(base, golden_files / "second.safetensors", seed=1)
    write_lora(base, golden_files / "third.safetensors", seed=2)
    model = tiny_model()
    generator = torch.Generator().manual_seed(0)
    latents = [torch.randn(1, 4, 16, 16, generator=generator) for _ in range(3)]
    context = torch.randn(2, 7, 32, generator=generator)
    return base, model, latents, context


def _run(model, context, steps, timesteps=TIMESTEPS):
    """Chains ``steps`` [(condition, latent, strength, start, end)] and returns the control the UNet gets."""
    positive, negative = conditioning(0), conditioning(1)
    for condition, latent, strength, start, end in steps:
        positive, negative = apply(positive, negative, condition, latent, strength, start, end)
    return control_outputs(positive, model, sigmas_for(model, timesteps), context)


def test_chained_conditions_sum_their_weighted_controls(setup):
    base, model, latents, context = setup
    a = load_lora(base, "lora0.ckpt")
    b = load_lora(base, "second.safetensors")
    alone_a = _run(model, context, [(a, latents[0], 1.0, 0.0, 1.0)])
    alone_b = _run(model, context, [(b, latents[1], 1.0, 0.0, 1.0)])
    both = _run(model, context, [(a, latents[0], 0.7, 0.0, 1.0), (b, latents[1], 1.3, 0.0, 1.0)])
    for got, x, y in zip(both, alone_a, alone_b):
        torch.testing.assert_close(got, 0.7 * x + 1.3 * y, rtol=1e-5, atol=1e-5)
    # Each condition really is different: its own LoRA and its own hint.
    assert max((x - y).abs().max().item() for x, y in zip(alone_a, alone_b)) > 1e-2


def test_same_lora_with_other_hint_changes_the_control(setup):
    base, model, latents, context = setup
    a = load_lora(base, "lora0.ckpt")
    first = _run(model, context, [(a, latents[0], 1.0, 0.0, 1.0)])
    second = _run(model, context, [(a, latents[1], 1.0, 0.0, 1.0)])
    assert max((x - y).abs().max().item() for x, y in zip(first, second)) > 1e-2


def test_strength_zero_equals_no_control(setup):
    base, model, latents, context = setup
    a = load_lora(base, "lora0.ckpt")
    b = load_lora(base, "second.safetensors")
    assert _run(model, context, [(a, latents[0], 0.0, 0.0, 1.0)]) is None
    only_a = _run(model, context, [(a, latents[0], 1.0, 0.0, 1.0)])
    a_and_zero_b = _run(model, context, [(a, latents[0], 1.0, 0.0, 1.0), (b, latents[1], 0.0, 0.0, 1.0)])
    for x, y in zip(only_a, a_and_zero_b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_strength_scales_linearly(setup):
    base, model, latents, context = setup
    a = load_lora(base, "lora0.ckpt")
    one = _run(model, context, [(a, latents[0], 1.0, 0.0, 1.0)])
    half = _run(model, context, [(a, latents[0], 0.5, 0.0, 1.0)])
    for x, y in zip(one, half):
        torch.testing.assert_close(0.5 * x, y, rtol=1e-6, atol=1e-6)


def test_start_end_percent_limit_the_control_to_its_steps(setup):
    base, model, latents, context = setup
    a = load_lora(base, "lora0.ckpt")
    b = load_lora(base, "second.safetensors")
    early, late = torch.tensor([990, 990]), torch.tensor([20, 20])  # near 0% and near 100% of sampling
    late_only = [(a, latents[0], 1.0, 0.5, 1.0)]
    assert _run(model, context, late_only, early) is None
    assert _run(model, context, late_only, late) is not None
    # In a chain, a condition outside its range leaves the others' control untouched.
    chain = [(a, latents[0], 1.0, 0.0, 1.0), (b, latents[1], 1.0, 0.5, 1.0)]
    for x, y in zip(_run(model, context, chain, early), _run(model, context, chain[:1], early)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_condition_latent_of_another_size_is_resized(setup):
    base, model, latents, context = setup
    a = load_lora(base, "lora0.ckpt")
    small = latents[0][:, :, :8, :8]
    resized = torch.nn.functional.interpolate(small, size=(16, 16), mode="bilinear")
    got = _run(model, context, [(a, small, 1.0, 0.0, 1.0)])
    expected = _run(model, context, [(a, resized, 1.0, 0.0, 1.0)])
    assert [t.shape[-1] for t in got] == [16, 16, 8, 8, 8]
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_one_condition_image_serves_a_batch_and_mismatched_batches_are_refused(setup):
    base, model, latents, context = setup
    a = load_lora(base, "lora0.ckpt")
    positive, negative = apply(conditioning(0, batch=2), conditioning(1, batch=2), a, latents[0])
    x = torch.zeros(4, 4, 16, 16)  # cond and uncond of a batch of 2
    sigmas = sigmas_for(model, torch.tensor([500] * 4))
    ctx = torch.randn(4, 7, 32)
    out = control_outputs(positive, model, sigmas, ctx, x=x, batched_number=2)
    assert out[0].shape[0] == 4
    three = torch.cat([latents[0]] * 3)
    positive, negative = apply(conditioning(0, batch=2), conditioning(1, batch=2), a, three)
    with pytest.raises(core.CtrLoRAError, match="batch of 3 but the sampled latent has 2"):
        control_outputs(positive, model, sigmas, ctx, x=x, batched_number=2)


def test_three_conditions_hold_one_base(setup):
    base, model, latents, context = setup
    conditions = [load_lora(base, name)
                  for name in ("lora0.ckpt", "second.safetensors", "third.safetensors")]
    assert all(c.base is base for c in conditions)

    def storages(module):
        return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in list(module.parameters()) + list(module.buffers())}

    held = {}
    for c in conditions:
        held.update(storages(c.base.model))
        held.update(storages(c.adapter))
    base_bytes = sum(storages(base.model).values())
    lora_bytes = [sum(storages(c.adapter).values()) for c in conditions]
    assert sum(held.values()) == base_bytes + sum(lora_bytes)
    assert all(b < base_bytes / 2 for b in lora_bytes)
    # The patchers ComfyUI loads for a 3-condition chain: one base, three adapters.
    chain = [(c, latents[0], 1.0, 0.0, 1.0) for c in conditions]
    positive, negative = conditioning(0), conditioning(1)
    for condition, latent, strength, start, end in chain:
        positive, negative = apply(positive, negative, condition, latent, strength, start, end)
    patchers = set(positive[0][1]["control"].get_models())
    assert len(patchers) == 4
    assert sum(p.model is base.model for p in patchers) == 1


def test_head_count_comes_from_the_sampled_model(setup):
    base, model, latents, context = setup
    a = load_lora(base, "lora0.ckpt")
    two_heads = _run(model, context, [(a, latents[0], 1.0, 0.0, 1.0)])
    one_head_model = tiny_model(unet_config={**model.model.model_config.unet_config})
    one_head_model.model.model_config.unet_config["num_heads"] = 1
    one_head = _run(one_head_model, context, [(a, latents[0], 1.0, 0.0, 1.0)])
    assert max((x - y).abs().max().item() for x, y in zip(two_heads, one_head)) > 1e-4


def _direct(condition, seed=0):
    condition.base.model.set_attention_heads({"num_heads": 2, "num_head_channels": -1})
    generator = torch.Generator().manual_seed(seed)
    hint, context = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 7, 32, generator=generator)
    with torch.no_grad():
        out = condition(hint, torch.tensor([10.0, 500.0]), context)
    return out["output"] + out["middle"]


def test_lowvram_partial_load_gives_the_same_control(golden_files):
    """With lowvram ComfyUI leaves weights offloaded and casts them per layer, LoRA layers included."""
    (base,) = nodes.LoadBaseControlNet().load("base.ckpt")
    condition = load_lora(base, "lora0.ckpt")
    reference = _direct(condition)
    base.patcher.load(torch.device("cpu"), lowvram_model_memory=1, force_patch_weights=False, full_load=False)
    assert sum(getattr(m, "comfy_cast_weights", False) for m in base.model.modules()) > 0
    for x, y in zip(reference, _direct(condition)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_half_precision_base_with_manual_cast(golden_files):
    reference = _direct(load_lora(nodes.LoadBaseControlNet().load("base.ckpt")[0], "lora0.ckpt"))
    base = core.load_base(str(golden_files / "base.ckpt"), dtype=torch.bfloat16)
    assert base.dtype == torch.bfloat16
    half = _direct(core.load_condition(base, str(golden_files / "lora0.ckpt")))
    for x, y in zip(reference, half):
        assert (x - y.float()).abs().max() <= 5e-2 * max(1.0, x.abs().max().item())
