"""Tiny models of the real architectures (small channel counts), for tests and the test fixture pack.

The tiny UNet has the layout of the official golden set ``golden_tiny_a`` (32 channels, 2 levels, 2 heads,
context 32), so the golden base ControlNet is a valid control for it.
"""
import hashlib
import os

import safetensors.torch
import torch

import comfy.latent_formats
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.supported_models_base

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
GOLDEN = os.path.join(DATA, "golden_tiny_a")

TINY_UNET = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
    "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1, "context_dim": 32, "use_linear_in_transformer": False,
    "adm_in_channels": None, "use_spatial_transformer": True, "legacy": False, "use_checkpoint": False,
    "num_heads": 2, "num_head_channels": -1, "use_temporal_attention": False, "use_temporal_resblock": False,
}
TINY_VAE = {
    "embed_dim": 4,
    "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                 "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
}
CONTEXT_DIM = 32


class TinySD15(comfy.supported_models_base.BASE):
    unet_config = {}
    unet_extra_config = {"num_heads": 2, "num_head_channels": -1}
    latent_format = comfy.latent_formats.SD15


def fill_(module, seed, scale=0.2):
    """ComfyUI's layers leave weights uninitialised: give every tensor seeded values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=generator))
    return module


def tiny_model(seed=0, unet_config=None):
    """A tiny SD1.5-like MODEL (ModelPatcher over a BaseModel with the SD1.5 latent format)."""
    config = TinySD15(unet_config or TINY_UNET)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    fill_(model.diffusion_model, seed)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def tiny_vae():
    """The official tiny VAE of the golden set (downsamples by 2)."""
    sd = safetensors.torch.load_file(os.path.join(GOLDEN, "vae.safetensors"))
    vae = comfy.sd.VAE(sd=sd, config={"params": TINY_VAE})
    vae.downscale_ratio = vae.upscale_ratio = 2
    return vae


def conditioning(seed, batch=1, tokens=7):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, CONTEXT_DIM, generator=generator), {}]]


def prompt_encoder(dim=CONTEXT_DIM, tokens=7):
    """A deterministic stand-in for CLIP: each prompt maps to its own fixed embedding."""
    def encode(prompt):
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
        return torch.randn(1, tokens, dim, generator=torch.Generator().manual_seed(seed))
    return encode


def tiny_clip():
    """A real ComfyUI CLIP (SD1.5 tokenizer and text model code) at width 32, 1 layer, with seeded weights."""
    target = comfy.supported_models.SD15({}).clip_target()
    clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": {
        "hidden_size": CONTEXT_DIM, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1,
        "projection_dim": CONTEXT_DIM}})
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in clip.cond_stage_model.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    return clip
