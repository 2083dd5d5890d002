"""Official numbers: the golden set made by the official CtrLoRA code, through the nodes' path."""
import json
import os
import shutil

import pytest
import safetensors.torch
import torch

import comfy.ops

from conftest import pack
from helpers import apply, control_outputs, load_condition, sigmas_for
from tiny import DATA, GOLDEN, conditioning, tiny_model, tiny_vae

core = pack.ctrlora_core
MANIFEST = json.load(open(os.path.join(GOLDEN, "manifest.json")))
TOL = MANIFEST["numerics"]["suggested_tolerance"]["fp32 CPU or GPU with TF32 disabled"]
EXPECTED = safetensors.torch.load_file(os.path.join(GOLDEN, "expected.safetensors"))
SCALE = MANIFEST["config"]["vae"]["scale_factor"]


def _variant(folder, name):
    """Format variants the official loader accepts, derived from the golden .ckpt files."""
    source = name.replace("_wrapped", "").replace(".safetensors", ".ckpt")
    sd = torch.load(folder / source, weights_only=True)
    if "_wrapped" in name:
        torch.save({"state_dict": sd}, folder / name)
    elif name.endswith(".safetensors"):
        safetensors.torch.save_file(sd, str(folder / name))
    return name


@pytest.mark.parametrize("base_name,lora_name", [
    ("base.ckpt", "lora0.ckpt"),
    ("base_wrapped.ckpt", "lora0.ckpt"),
    ("base.safetensors", "lora0.safetensors"),
    ("base.safetensors", "lora0.ckpt"),
])
def test_control_outputs_match_official(golden_files, base_name, lora_name):
    for name in (base_name, lora_name):
        if not (golden_files / name).exists():
            _variant(golden_files, name)
    condition = load_condition(base_name, lora_name)
    model = tiny_model()
    positive, negative = conditioning(0), conditioning(1)
    positive, _ = apply(positive, negative, condition, EXPECTED["hint_0"] / SCALE)
    outputs = control_outputs(positive, model, sigmas_for(model, EXPECTED["timesteps"]), EXPECTED["context"])
    assert len(outputs) == MANIFEST["inputs_and_outputs"]["num_outputs"]
    for i, actual in enumerate(outputs):
        expected = EXPECTED[f"out_{i:02d}"]
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, rtol=TOL["rtol"], atol=TOL["atol"])


def test_base_file_per_condition_tensors_are_ignored(golden_files):
    """Replacing the base file's own LoRA layers, zero convs and norms changes nothing (official inference)."""
    sd = torch.load(golden_files / "base.ckpt", weights_only=True)
    altered = {k: (torch.randn_like(v) if core.checkpoint.is_per_condition_key(k) else v) for k, v in sd.items()}
    torch.save(altered, golden_files / "base_altered.ckpt")
    model = tiny_model()
    sigmas = sigmas_for(model, EXPECTED["timesteps"])
    results = []
    for base_name in ("base.ckpt", "base_altered.ckpt"):
        positive, _ = apply(conditioning(0), conditioning(1), load_condition(base_name, "lora0.ckpt"),
                            EXPECTED["hint_0"] / SCALE)
        results.append(control_outputs(positive, model, sigmas, EXPECTED["context"]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_vae_condition_encode_matches_official_hint():
    vae = tiny_vae()
    image = EXPECTED["cond_image"].movedim(1, -1)  # NCHW -> ComfyUI IMAGE
    (latent,) = pack.nodes.inference.VAEConditionEncode().encode(image, vae)
    hint = tiny_model().model.latent_format.process_in(latent["samples"])
    vae_tol = MANIFEST["numerics"]["suggested_tolerance"]["vae expected_hint (fp32)"]
    torch.testing.assert_close(hint, EXPECTED["expected_hint"], rtol=vae_tol["rtol"], atol=vae_tol["atol"])


def test_full_size_sd15_keys_and_shapes():
    """A full-size SD1.5 base and a rank-128 LoRA, built on the meta device, have the official keys and shapes."""
    manifest = json.load(open(os.path.join(DATA, "sd15_key_manifest.json")))
    strip = lambda keys: {k[len("control_model."):]: tuple(v) for k, v in keys.items()}  # noqa: E731
    base_keys = strip(manifest["base_controlnet"]["keys_core_plus_zero_convs_and_norms"])
    lora_keys = strip(manifest["lora_file_rank128"]["keys"])
    meta = lambda keys: {k: torch.empty(s, device="meta") for k, s in keys.items()}  # noqa: E731

    model = core.model.build_from_state_dict(meta(base_keys), torch.float32, "meta", comfy.ops.disable_weight_init, "sd15")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == base_keys
    assert core.lora.expected_shapes(model, 128) == lora_keys
    counts = manifest["inference_model_counts"]
    assert len(core.model.lora_linear_names(model)) == counts["LoRACompatibleLinear"]
    adapter = core.ConditionAdapter.from_file_tensors(meta(lora_keys), model, "lora.ckpt")
    assert {k: tuple(v.shape) for k, v in adapter.file_tensors().items()} == lora_keys
    model.set_attention_heads({"num_heads": 8, "num_head_channels": -1})


def test_full_size_sd15_base_file_with_its_extra_lora_layers_is_accepted():
    manifest = json.load(open(os.path.join(DATA, "sd15_key_manifest.json")))["base_controlnet"]
    keys = {**manifest["keys_core_plus_zero_convs_and_norms"], **manifest["extra_lora_layer_keys_in_released_base_file"]}
    tensors = {k[len("control_model."):]: torch.empty(s, device="meta") for k, s in keys.items()}
    tensors = {k: v for k, v in tensors.items() if "lora_layer" not in k}
    model = core.model.build_from_state_dict(tensors, torch.float16, "meta", comfy.ops.disable_weight_init, "sd15")
    assert sum(p.numel() for p in model.parameters()) == manifest["numel_core_plus_zero_convs_and_norms"]
