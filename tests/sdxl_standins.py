"""SDXL-family stand-ins for the released files the SDXL workflow names, with random weights. Never downloaded.

A full-size SDXL checkpoint (2.6B UNet + 0.8B text encoders, ~14 GB in fp32 on the CPU) and the full-size
CtrLoRA-XL base (1.25B) do not fit a 2-core CI machine, so the stand-ins are smaller members of the same family:

* ``write_sdxl_checkpoint``: a single-file checkpoint in SDXL's original key layout with the UNet of
  Segmind-Vega's shape (SDXL's channels, 1/1/2/2 transformer layers instead of 2/2/10/10; ComfyUI's own
  ``Segmind_Vega`` config, an SDXL model for ComfyUI: same latent format, same pooled-text + size ``y``) and the
  real SDXL text encoders (CLIP-L and OpenCLIP bigG, full size: ComfyUI's SDXL CLIP has a fixed shape) and VAE.
* ``write_ctrlora_xl_base``: a CtrLoRA-XL base file in the port's format (diffusers ControlNet names, peft
  ``.base_layer.`` and one embedded rank-64 adapter ``canny``) made, as the port's ``from_unet`` makes it, from
  that UNet's encoder: SDXL's channels and 9 down residuals, so its control fits any SDXL UNet.

Key names and shapes come from ComfyUI's own modules on the meta device; values as in sd15_standins.
"""
import safetensors.torch
import torch

import comfy.ldm.models.autoencoder
import comfy.ldm.modules.diffusionmodules.openaimodel
import comfy.ops
import comfy.sdxl_clip
import comfy.supported_models
import comfy.utils

from sd15_standins import SD_VAE, _shapes, random_tensors

# ComfyUI's Segmind_Vega family member of SDXL, completed with SDXL's fixed entries.
VEGA_UNET = {
    **comfy.supported_models.Segmind_Vega.unet_config, "use_checkpoint": False, "image_size": 32, "out_channels": 4,
    "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential", "in_channels": 4,
    "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth_middle": 1,
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2], "num_head_channels": 64,
}
ADAPTER_RANK = 64  # the port's LoraConfig(r=64, lora_alpha=128)


def _unet(config=VEGA_UNET):
    with torch.device("meta"):
        return comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel(
            **config, operations=comfy.ops.disable_weight_init)


def sdxl_checkpoint_shapes():
    with torch.device("meta"):
        clip = comfy.sdxl_clip.SDXLClipModel(device="meta")
        vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=SD_VAE, embed_dim=4)
    shapes = {**_shapes(_unet(), "model.diffusion_model."), **_shapes(vae, "first_stage_model.")}
    for key, shape in _shapes(clip, "").items():
        if "logit_scale" in key:
            continue
        key = key.replace("clip_l.transformer.", "conditioner.embedders.0.transformer.", 1)
        shapes[key.replace("clip_g.", "conditioner.embedders.1.model.", 1)] = shape
    return shapes


def write_sdxl_checkpoint(path, seed=0):
    safetensors.torch.save_file(random_tensors(sdxl_checkpoint_shapes(), seed, torch.float16), str(path))
    return path


def ctrlora_xl_base_shapes(unet_config=VEGA_UNET, adapters=("canny",), rank=ADAPTER_RANK):
    """The port's base file layout for a ControlNet made from the UNet of ``unet_config``."""
    unet = _unet(unet_config)
    to_diffusers = {v: k for k, v in comfy.utils.unet_to_diffusers(unet_config).items() if "class_embedding" not in k}
    encoder = ("down_blocks", "mid_block", "conv_in", "time_embedding", "add_embedding")
    shapes = {to_diffusers[k]: tuple(v.shape) for k, v in unet.state_dict().items()
              if k in to_diffusers and to_diffusers[k].startswith(encoder)}
    channels = unet_config["model_channels"]
    outputs = [channels]
    for level, (mult, blocks) in enumerate(zip(unet_config["channel_mult"], unet_config["num_res_blocks"])):
        outputs += [channels * mult] * (blocks + (level < len(unet_config["channel_mult"]) - 1))
    for i, c in enumerate(outputs):
        shapes[f"controlnet_down_blocks.{i}.weight"], shapes[f"controlnet_down_blocks.{i}.bias"] = (c, c, 1, 1), (c,)
    last = outputs[-1]
    shapes["controlnet_mid_block.weight"], shapes["controlnet_mid_block.bias"] = (last, last, 1, 1), (last,)
    shapes["conv_in_condition.weight"], shapes["conv_in_condition.bias"] = (channels, 4, 3, 3), (channels,)
    out = {}
    for key, shape in shapes.items():
        module, _, attr = key.rpartition(".")
        if module.rsplit(".", 1)[-1] not in ("to_q", "to_k", "to_v"):
            out[key] = shape
            continue
        out[f"{module}.base_layer.{attr}"] = shape
        for adapter in adapters:
            out[f"{module}.lora_A.{adapter}.weight"] = (rank, shape[1])
            out[f"{module}.lora_B.{adapter}.weight"] = (shape[0], rank)
    return out


def write_ctrlora_xl_base(path, seed=1, dtype=torch.float16):
    safetensors.torch.save_file(random_tensors(ctrlora_xl_base_shapes(), seed, dtype), str(path))
    return path
