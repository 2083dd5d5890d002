"""CtrLoRA-XL (the SDXL port) through the four inference nodes, checked against the port's own numbers.

The golden set ``tests/data/golden_xl_tiny`` (a copy of ctrlora_xl_tiny_public) holds a tiny ControlNet made and
run by the port's model code: its base file with embedded adapters, two peft LoRA files (and one in the checkpoint
form), inputs and the expected residuals for each condition alone and for a weighted two-condition mix.
"""
import importlib
import json
import os
import shutil

import pytest
import safetensors.torch
import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_patcher
import comfy.ops
import comfy.sample
import comfy.supported_models
import comfy.supported_models_base
import comfy.utils
from comfy.ldm.modules.diffusionmodules.openaimodel import Timestep

import sdxl_standins
from conftest import pack
from helpers import apply, load_lora
from tiny import DATA, GOLDEN, fill_, tiny_model, tiny_vae

core = pack.ctrlora_core
xl_model = importlib.import_module(f"{core.__name__}.xl.model")
nodes = pack.nodes.inference
GOLDEN_XL = os.path.join(DATA, "golden_xl_tiny")
MANIFEST = json.load(open(os.path.join(GOLDEN_XL, "manifest.json")))
TOLERANCE = MANIFEST["tolerances"]["every tensor of expected.safetensors (cases and aux)"]["max"]
INPUTS = safetensors.torch.load_file(os.path.join(GOLDEN_XL, "inputs.safetensors"))
EXPECTED = safetensors.torch.load_file(os.path.join(GOLDEN_XL, "expected.safetensors"))
SCALE = INPUTS["conditioning_scale"].item()
LATENT_SCALE = comfy.latent_formats.SDXL.scale_factor
TIME_ID_DIM = 8  # the tiny layout's addition_time_embed_dim (SDXL: 256)

# The golden UNet config (diffusers) in ComfyUI's terms: the tiny SDXL-like UNet the control runs with.
TINY_XL_UNET = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [2, 2],
    "channel_mult": [1, 2], "transformer_depth": [0, 0, 2, 2], "transformer_depth_output": [0, 0, 0, 2, 2, 2],
    "transformer_depth_middle": 2, "context_dim": 64, "use_linear_in_transformer": True, "adm_in_channels": 80,
    "num_classes": "sequential", "use_spatial_transformer": True, "legacy": False, "use_checkpoint": False,
    "num_head_channels": 16, "use_temporal_attention": False, "use_temporal_resblock": False,
}


class TinySDXLModel(comfy.model_base.SDXL):
    """ComfyUI's SDXL model class; only the size-condition sinusoid is the tiny layout's (8 instead of 256)."""

    def __init__(self, model_config, device=None):
        super().__init__(model_config, device=device)
        self.embedder = Timestep(TIME_ID_DIM)


class TinySDXL(comfy.supported_models_base.BASE):
    unet_config = {}
    unet_extra_config = {}
    latent_format = comfy.latent_formats.SDXL

    def get_model(self, state_dict, prefix="", device=None):
        return TinySDXLModel(self, device=device)


def tiny_xl_model(seed=0):
    config = TinySDXL(dict(TINY_XL_UNET))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    fill_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def golden_y():
    """SDXL's y for the golden inputs, built as ComfyUI's SDXL model builds it: pooled text, then the six size
    conditions' sinusoids."""
    time_ids = Timestep(TIME_ID_DIM)(INPUTS["time_ids"].flatten()).reshape(INPUTS["time_ids"].shape[0], -1)
    return torch.cat([INPUTS["text_embeds"], time_ids], dim=1)


@pytest.fixture
def xl_files(models_dir):
    """The golden base (with its embedded adapters 'canny' and 'depth') and LoRA files in models/ctrlora/."""
    folder = models_dir / "ctrlora"
    for name in os.listdir(GOLDEN_XL):
        if name.startswith(("base.", "lora_")):
            shutil.copy(os.path.join(GOLDEN_XL, name), folder / name)
    return folder


def latent(hint, family="xl"):
    """What VAE Condition Encode returns for a hint: the unscaled latent, marked with its family."""
    return {"samples": hint / LATENT_SCALE, core.LATENT_FAMILY_KEY: family}


def xl_control_outputs(positive, model, y=None):
    """The golden case's residuals as the sampler gets them from the chain on ``positive``."""
    control = positive[0][1]["control"]
    base_model = model.model
    control.pre_run(base_model, lambda p: base_model.model_sampling.percent_to_sigma(p))
    sigmas = base_model.model_sampling.sigma(INPUTS["timesteps"])
    # The ControlNet sees calculate_input(sigma, x_noisy) = x_noisy / sqrt(sigma^2 + 1): undo that for x.
    x_noisy = INPUTS["x"] * (sigmas ** 2 + 1).sqrt()[:, None, None, None]
    cond = {"c_crossattn": INPUTS["encoder_hidden_states"], "y": golden_y() if y is None else y}
    try:
        with torch.no_grad():
            out = control.get_control(x_noisy, sigmas, cond, 1, {})
    finally:
        control.cleanup()
    return out["output"] + out["middle"]


def assert_matches(outputs, case):
    expected = [EXPECTED[f"{case}.down.{i}"] for i in range(6)] + [EXPECTED[f"{case}.mid"]]
    assert len(outputs) == len(expected)
    for got, want in zip(outputs, expected):
        assert got.shape == want.shape
        error = ((got - want).abs().max() / want.abs().max()).item()
        assert error <= TOLERANCE, f"{case}: relative error {error:.2e} > {TOLERANCE}"


def conditioning(batch=2):
    return [[INPUTS["encoder_hidden_states"][:batch], {}]]


def test_sdxl_y_layout_matches_port():
    """ComfyUI's y (pooled text, then the size-condition sinusoids) is the port's add_embeds."""
    torch.testing.assert_close(golden_y(), EXPECTED["aux.add_embeds"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("case,lora_name,hint", [
    ("canny", "base.safetensors:canny", "hint1"),
    ("palette", "lora_palette.safetensors", "hint1"),
    ("palette", "lora_palette.modelform.safetensors", "hint1"),
    ("lineart", "lora_lineart.safetensors", "hint2"),
])
def test_single_condition_matches_port(xl_files, case, lora_name, hint):
    (base,) = nodes.LoadBaseControlNet().load("base.safetensors")
    condition = load_lora(base, lora_name)
    positive, _ = apply(conditioning(), conditioning(), condition, INPUTS[hint] / LATENT_SCALE, SCALE)
    assert_matches(xl_control_outputs(positive, tiny_xl_model()), case)


def test_weighted_mix_matches_port_with_one_base(xl_files):
    (base,) = nodes.LoadBaseControlNet().load("base.safetensors")
    palette, lineart = load_lora(base, "lora_palette.safetensors"), load_lora(base, "lora_lineart.safetensors")
    assert palette.base is lineart.base
    w1, w2 = INPUTS["mix_weights"].tolist()
    positive, negative = conditioning(), conditioning()
    apply_node = nodes.ApplyCtrLoRA()
    positive, negative = apply_node.apply(positive, negative, palette, latent(INPUTS["hint1"]), w1 * SCALE, 0.0, 1.0)
    positive, negative = apply_node.apply(positive, negative, lineart, latent(INPUTS["hint2"]), w2 * SCALE, 0.0, 1.0)
    assert_matches(xl_control_outputs(positive, tiny_xl_model()), "mix")


def test_base_alone_matches_port(xl_files):
    """No adapter bound: the shared base's own numbers (the port's disable_adapter case)."""
    (base,) = nodes.LoadBaseControlNet().load("base.safetensors")
    condition = pack.ctrlora_core.xl.lora.XLCondition(base, core.ConditionAdapter({}, 0), "base only")
    positive, _ = apply(conditioning(), conditioning(), condition, INPUTS["hint1"] / LATENT_SCALE, SCALE)
    assert_matches(xl_control_outputs(positive, tiny_xl_model()), "base_only")


def test_lora_scale_without_adapter_config_is_the_ports(xl_files):
    """Released LoRA files carry no alpha: the port's fixed LoraConfig gives scale 2 (this set's alpha/r too);
    an adapter_config.json beside the file sets it."""
    (xl_files / "lora_palette.adapter_config.json").unlink()
    (base,) = nodes.LoadBaseControlNet().load("base.safetensors")
    positive, _ = apply(conditioning(), conditioning(), load_lora(base, "lora_palette.safetensors"),
                        INPUTS["hint1"] / LATENT_SCALE, SCALE)
    assert_matches(xl_control_outputs(positive, tiny_xl_model()), "palette")
    file_up = safetensors.torch.load_file(str(xl_files / "lora_palette.safetensors"))[
        "base_model.model.mid_block.attentions.0.transformer_blocks.0.attn2.to_v.lora_B.weight"]
    bound_name = "middle_block.1.transformer_blocks.0.attn2.to_v.lora_up"

    def bound_up():
        adapter = load_lora(base, "lora_palette.safetensors").adapter
        return adapter.tensors[adapter.names.index(bound_name)]

    torch.testing.assert_close(bound_up(), 2 * file_up, rtol=0, atol=0)
    (xl_files / "lora_palette.adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 4}))
    torch.testing.assert_close(bound_up(), file_up, rtol=0, atol=0)


def test_load_ctrlora_lists_the_base_files_embedded_conditions(xl_files):
    names = nodes.LoadCtrLoRA.INPUT_TYPES()["required"]["lora_name"][0]
    assert {"base.safetensors:canny", "base.safetensors:depth", "lora_palette.safetensors"} <= set(names)
    (base,) = nodes.LoadBaseControlNet().load("base.safetensors")
    result = nodes.LoadCtrLoRA().load(base, "base.safetensors:depth")
    info = result["ui"]["ctrlora_lora"][0]
    assert info["file"] == "base.safetensors:depth" and info["condition"] == "depth" and info["rank"] == 4
    assert info["keys"] == 72  # lora_A and lora_B of 36 projections
    assert info["expects"].startswith("depth: use ")


class RecordingCondition(core.xl.lora.XLCondition):
    """The loaded condition, keeping the y of every call."""

    def __init__(self, condition):
        super().__init__(condition.base, condition.adapter, condition.name)
        self.seen = []

    def __call__(self, x, hint, timesteps, context, y):
        self.seen.append(y.clone())
        return super().__call__(x, hint, timesteps, context, y)


def test_sampling_takes_y_from_the_sdxl_model(xl_files):
    """A real sampling step: the control gets the y that ComfyUI's SDXL model builds from pooled text and sizes
    (the port's add_embeds layout), and the sizes change the result."""
    (base,) = nodes.LoadBaseControlNet().load("base.safetensors")
    condition = RecordingCondition(load_lora(base, "base.safetensors:canny"))
    model = tiny_xl_model()
    pooled = INPUTS["text_embeds"][:1]
    results = []
    for size in (1024, 512):
        positive = [[INPUTS["encoder_hidden_states"][:1], {"pooled_output": pooled, "width": size, "height": size}]]
        negative = [[torch.zeros(1, 8, 64), {"pooled_output": torch.zeros_like(pooled), "width": size, "height": size}]]
        positive, negative = apply(positive, negative, condition, INPUTS["hint1"][:1] / LATENT_SCALE)
        noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        results.append(comfy.sample.sample(model, noise, 1, 5.0, "euler", "normal", positive, negative,
                                           torch.zeros(1, 4, 16, 16), seed=0))
    sizes = torch.tensor([1024.0, 1024, 0, 0, 1024, 1024])
    expected_y = torch.cat([pooled, Timestep(TIME_ID_DIM)(sizes).reshape(1, -1)], dim=1)
    assert any(torch.allclose(y, expected_y, atol=1e-6) for y in condition.seen[0].split(1))
    assert torch.isfinite(results[0]).all() and not torch.equal(results[0], results[1])


def test_vae_condition_encode_sdxl_sees_minus_one_to_one():
    vae = tiny_vae()
    image = torch.rand(1, 8, 8, 3, generator=torch.Generator().manual_seed(0))
    encode = nodes.VAEConditionEncode().encode
    (xl,) = encode(image, vae, "SDXL")
    (sd15,) = encode(image, vae, "SD1.5")
    assert xl[core.LATENT_FAMILY_KEY] == "xl" and sd15[core.LATENT_FAMILY_KEY] == "sd15"
    with torch.no_grad():
        direct = vae.first_stage_model.encode(image.movedim(-1, 1) * 2 - 1)
    torch.testing.assert_close(xl["samples"], direct, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(xl["samples"], sd15["samples"], atol=1e-3)


def test_vae_encode_latent_is_taken_without_warning_for_xl(xl_files, caplog):
    """ComfyUI's VAE Encode encodes in [-1, 1] as the port does: only SD1.5 conditions warn about it."""
    (base,) = nodes.LoadBaseControlNet().load("base.safetensors")
    condition = load_lora(base, "lora_palette.safetensors")
    nodes.ApplyCtrLoRA().apply(conditioning(), conditioning(), condition, {"samples": INPUTS["hint1"]}, 1.0, 0.0, 1.0)
    assert "VAE Condition Encode" not in caplog.text


def test_full_size_xl_layout_loads_on_meta():
    """The port's base file layout at SDXL size (the port's from_unet of ComfyUI's SDXL UNet: channels
    320/640/1280, transformer depths 2 and 10, context 2048, y 2816, one embedded rank-64 adapter), built on the
    meta device, loads: 9 down residuals, q/k/v of 34 transformer blocks x 2 attentions = 204 LoRA projections,
    ~1.25B parameters (the port's ControlNet); a rank-64 LoRA file of the adapter-only form fits."""
    sdxl = {**sdxl_standins.VEGA_UNET, **comfy.supported_models.SDXL.unet_config, "transformer_depth_middle": 10,
            "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]}
    base_keys = sdxl_standins.ctrlora_xl_base_shapes(sdxl)
    tensors = {k: torch.empty(s, device="meta") for k, s in base_keys.items()}
    model = xl_model.build_from_state_dict(core.xl.checkpoint.base_weights(tensors), torch.float16, "meta",
                                                comfy.ops.disable_weight_init, "ctrlora-xl-base.safetensors")
    assert [z[0].out_channels for z in model.zero_convs] == [320] * 4 + [640] * 3 + [1280] * 2
    assert len(model.lora_modules) == 204
    assert 1.2e9 < sum(p.numel() for p in model.parameters()) < 1.3e9
    model.set_attention_heads({"num_head_channels": 64})
    rank = 64
    lora = {}
    for module, path in model.lora_modules.items():
        linear = model.get_submodule(path)
        lora[f"base_model.model.{module}.lora_A.weight"] = torch.empty(rank, linear.in_features, device="meta")
        lora[f"base_model.model.{module}.lora_B.weight"] = torch.empty(linear.out_features, rank, device="meta")
    pairs = core.xl.checkpoint.lora_pairs(lora)[None]
    adapter = core.xl.lora.adapter_from_pairs(pairs, 2.0, model, "lora.safetensors")
    assert adapter.rank == rank and len(adapter.names) == 408


# Bad input: files of the other family, the wrong checkpoint, the wrong latent.

def test_sd15_lora_on_xl_base_is_refused(xl_files):
    shutil.copy(os.path.join(GOLDEN, "lora0.ckpt"), xl_files / "lora0.ckpt")
    (base,) = nodes.LoadBaseControlNet().load("base.safetensors")
    with pytest.raises(core.CtrLoRAError, match=r"lora0.ckpt is an SD1.5 CtrLoRA file.*a CtrLoRA-XL \(SDXL\) base"):
        load_lora(base, "lora0.ckpt")


def test_xl_lora_on_sd15_base_is_refused(xl_files):
    shutil.copy(os.path.join(GOLDEN, "base.ckpt"), xl_files / "sd15_base.ckpt")
    (base,) = nodes.LoadBaseControlNet().load("sd15_base.ckpt")
    message = r"lora_palette.safetensors is a CtrLoRA-XL \(SDXL\) file.*an SD1.5 CtrLoRA base"
    with pytest.raises(core.CtrLoRAError, match=message):
        load_lora(base, "lora_palette.safetensors")
    with pytest.raises(core.CtrLoRAError, match=r"CtrLoRA-XL"):
        load_lora(base, "base.safetensors:canny")


def test_xl_base_with_sd15_checkpoint_is_refused_when_sampling(xl_files):
    (base,) = nodes.LoadBaseControlNet().load("base.safetensors")
    positive, _ = apply(conditioning(), conditioning(), load_lora(base, "lora_palette.safetensors"),
                        INPUTS["hint1"] / LATENT_SCALE)
    model = tiny_model()
    control = positive[0][1]["control"]
    with pytest.raises(core.CtrLoRAError, match=r"CtrLoRA-XL base and controls SDXL checkpoints.*Load an SDXL"):
        control.pre_run(model.model, lambda p: p)


def test_sd15_base_with_sdxl_checkpoint_is_refused_when_sampling(xl_files):
    shutil.copy(os.path.join(GOLDEN, "base.ckpt"), xl_files / "sd15_base.ckpt")
    shutil.copy(os.path.join(GOLDEN, "lora0.ckpt"), xl_files / "lora0.ckpt")
    (base,) = nodes.LoadBaseControlNet().load("sd15_base.ckpt")
    positive, _ = apply(conditioning(), conditioning(), load_lora(base, "lora0.ckpt"), torch.zeros(1, 4, 8, 8))
    with pytest.raises(core.CtrLoRAError, match=r"is an SD1.5 CtrLoRA base \(text context 32\), but the sampled "
                                                r"model is TinySDXL \(text context 64\)"):
        positive[0][1]["control"].pre_run(tiny_xl_model().model, lambda p: p)


def test_latent_of_the_other_family_is_refused(xl_files):
    (base,) = nodes.LoadBaseControlNet().load("base.safetensors")
    condition = load_lora(base, "lora_palette.safetensors")
    with pytest.raises(core.CtrLoRAError, match=r"encoded for SD1.5.*model_family to SDXL"):
        nodes.ApplyCtrLoRA().apply(conditioning(), conditioning(), condition, latent(INPUTS["hint1"], "sd15"),
                                   1.0, 0.0, 1.0)


def test_wrong_xl_files_are_refused(xl_files):
    lora = safetensors.torch.load_file(str(xl_files / "lora_palette.safetensors"))
    (base,) = nodes.LoadBaseControlNet().load("base.safetensors")
    with pytest.raises(core.CtrLoRAError, match="CtrLoRA-XL condition LoRA, not a base ControlNet"):
        nodes.LoadBaseControlNet().load("lora_palette.safetensors")
    with pytest.raises(core.CtrLoRAError, match="has no adapter 'sketch' .*canny, depth"):
        load_lora(base, "base.safetensors:sketch")
    with pytest.raises(core.CtrLoRAError, match="holds several adapters .*base.safetensors:<adapter>"):
        load_lora(base, "base.safetensors")
    missing = {k: v for k, v in lora.items() if "mid_block" not in k}
    safetensors.torch.save_file(missing, str(xl_files / "partial.safetensors"))
    with pytest.raises(core.CtrLoRAError, match="does not fit this CtrLoRA-XL base.*missing: mid_block"):
        load_lora(base, "partial.safetensors")
    wider = {k: torch.zeros(8, v.shape[1]) if ".lora_A." in k else torch.zeros(v.shape[0], 8) for k, v in lora.items()}
    wider[next(iter(wider))] = torch.zeros(4, 64)
    safetensors.torch.save_file(wider, str(xl_files / "mixed.safetensors"))
    with pytest.raises(core.CtrLoRAError, match="mixed ranks"):
        load_lora(base, "mixed.safetensors")
    regular = {"controlnet_cond_embedding.conv_in.weight": torch.zeros(16, 3, 3, 3), "conv_in.weight": torch.zeros(1)}
    safetensors.torch.save_file(regular, str(xl_files / "controlnet-canny-sdxl.safetensors"))
    with pytest.raises(core.CtrLoRAError, match="regular ControlNet"):
        nodes.LoadBaseControlNet().load("controlnet-canny-sdxl.safetensors")
