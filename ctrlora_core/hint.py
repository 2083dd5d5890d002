"""Condition images -> hint latents, the official way: the VAE encoder sees the image in [0, 1].

(ControlNet's hint CNN is replaced by the SD VAE encoder; the official code never rescales the condition
image to [-1, 1] as it does for targets.) The 0.18215 scaling is applied later, by the sampled model's
latent format, where the latent enters the ControlNet.
"""
import logging

import torch

from .errors import CtrLoRAError


def to_rgb(image, name="image"):
    """IMAGE [B, H, W, C] -> RGB: grayscale is repeated, an alpha channel dropped, other layouts refused."""
    if image.ndim != 4:
        raise CtrLoRAError(f"{name}: expected an IMAGE [batch, height, width, channels], got shape {tuple(image.shape)}.")
    channels = image.shape[-1]
    if channels == 1:
        return image.repeat(1, 1, 1, 3)
    if channels in (3, 4):
        return image[..., :3]
    raise CtrLoRAError(f"{name}: {channels} channels; a condition image must be grayscale, RGB or RGBA.")


FOREIGN_LATENT = (
    "its condition latent does not come from VAE Condition Encode (is it from ComfyUI's VAE Encode?). VAE Encode "
    "gives the encoder the image in [-1, 1] where CtrLoRA was trained on [0, 1], so the control is off. Encode the "
    "condition image with VAE Condition Encode.")


def foreign_latent_warning(latent, mark):
    """A warning for a LATENT dict that VAE Condition Encode did not make (it sets ``mark``), else None."""
    return None if mark in latent else FOREIGN_LATENT


def encode_condition(vae, image):
    """Encodes condition images with ``vae`` so that its encoder sees the pixel values unchanged.

    Returns the unscaled latent (posterior mode, as ComfyUI's VAE Encode). Sizes that are not a multiple of
    the VAE's downscale factor are centre-cropped, as ComfyUI's VAE Encode does.
    """
    image = to_rgb(image, "VAE Condition Encode")
    # ComfyUI's VAE maps its input p through vae.process_input first (2p - 1 for SD VAEs); undo that map
    # (it is affine for image VAEs) so the encoder itself receives the [0, 1] condition image.
    probe = vae.process_input(torch.tensor([0.0, 1.0]))
    offset, scale = probe[0].item(), (probe[1] - probe[0]).item()
    factor = vae.downscale_ratio if isinstance(vae.downscale_ratio, int) else 8
    height, width = image.shape[1], image.shape[2]
    if height < factor or width < factor:
        raise CtrLoRAError(f"VAE Condition Encode: the image ({width}x{height}) is smaller than {factor}x{factor}.")
    if height % factor or width % factor:
        logging.info("VAE Condition Encode: %dx%d is not a multiple of %d; centre-cropping as VAE Encode does.",
                     width, height, factor)
    return vae.encode((image - offset) / scale)
