"""Full-size SD1.5-shaped stand-ins for the released model files, with random weights. Never downloaded.

* ``write_sd15_checkpoint``: a single-file SD1.5 checkpoint (UNet, CLIP-L text encoder, VAE) in the original
  LDM key layout (``model.diffusion_model.*``, ``cond_stage_model.transformer.text_model.*``,
  ``first_stage_model.*``), which ComfyUI's CheckpointLoaderSimple detects as SD1.5. The key names and shapes
  come from ComfyUI's own modules built on the meta device; the tokenizer is ComfyUI's bundled SD1 one.
* ``write_ctrlora_base`` / ``write_ctrlora_lora``: a Base ControlNet and a rank-128 condition LoRA with the keys
  and shapes of the official files (``tests/data/sd15_key_manifest.json``), as ``.ckpt`` (torch.save) like the
  released ones.

Values are seeded and small (weights ~ N(0, 1/fan_in) / 2, norm scales 1, biases 0), so every run is finite.
"""
import json
import os

import safetensors.torch
import torch

import comfy.ldm.models.autoencoder
import comfy.ldm.modules.diffusionmodules.openaimodel
import comfy.ops
import comfy.sd1_clip

MANIFEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sd15_key_manifest.json")

# ComfyUI's SD1.5 UNet configuration (comfy/model_detection.py, unet_config_from_diffusers_unet).
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# ComfyUI's default SD1.x VAE (comfy/sd.py).
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def _shapes(module, prefix):
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


def sd15_checkpoint_shapes():
    """Key -> shape of an original-layout SD1.5 checkpoint, from ComfyUI's modules on the meta device."""
    with torch.device("meta"):
        unet = comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel(
            **SD15_UNET, operations=comfy.ops.disable_weight_init)
        clip = comfy.sd1_clip.SDClipModel(device="meta")
        vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=SD_VAE, embed_dim=4)
    shapes = {**_shapes(unet, "model.diffusion_model."), **_shapes(vae, "first_stage_model.")}
    for key, shape in _shapes(clip.transformer, "cond_stage_model.transformer.").items():
        # The SD1.5 release carries the bare HF CLIPTextModel: no projection, no logit scale.
        if "text_projection" not in key and "logit_scale" not in key:
            shapes[key] = shape
    return shapes


def random_tensors(shapes, seed, dtype):
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if len(shape) <= 1:
            norm_scale = "norm" in key and key.endswith("weight")
            out[key] = (torch.ones(shape) if norm_scale else torch.zeros(shape)).to(dtype)
        else:
            fan_in = 1
            for n in shape[1:]:
                fan_in *= n
            out[key] = (torch.randn(shape, generator=generator) * (0.5 / fan_in ** 0.5)).to(dtype)
    return out


def write_sd15_checkpoint(path, seed=0):
    tensors = random_tensors(sd15_checkpoint_shapes(), seed, torch.float16)
    safetensors.torch.save_file(tensors, str(path))
    return path


def manifest():
    with open(MANIFEST) as f:
        return json.load(f)


def write_ctrlora_base(path, seed=1, dtype=torch.float16):
    """A released-layout base: core + zero convs + norms, plus the one set of LoRA layers the release carries.

    fp16 by default (the release is fp32) to halve the bytes written; the loader takes either.
    """
    base = manifest()["base_controlnet"]
    shapes = {**base["keys_core_plus_zero_convs_and_norms"], **base["extra_lora_layer_keys_in_released_base_file"]}
    torch.save(random_tensors({k: tuple(v) for k, v in shapes.items()}, seed, dtype), str(path))
    return path


def write_ctrlora_lora(path, seed=2):
    """A rank-128 condition LoRA in the released layout and dtype (246 fp32 tensors, about 148 MB)."""
    shapes = manifest()["lora_file_rank128"]["keys"]
    torch.save(random_tensors({k: tuple(v) for k, v in shapes.items()}, seed, torch.float32), str(path))
    return path
