"""Condition images -> hint latents for CtrLoRA-XL, the port's way: the VAE encoder sees the image in [-1, 1]
(ToTensor + Normalize(0.5, 0.5)), as for any SDXL image. ComfyUI's VAE maps its [0, 1] input to [-1, 1] itself.

The port samples the latent distribution; this takes its mode (as ComfyUI's VAE Encode), so a graph is
deterministic. The 0.13025 scaling is applied by the sampled model's latent format where the latent enters the
ControlNet (as for SD1.5).
"""
from ..hint import to_rgb

# VAE Condition Encode's family choices: the VAE alone cannot tell SD1.5 from SDXL (same architecture).
FAMILIES = {"SD1.5": "sd15", "SDXL": "xl"}


def encode_xl_condition(vae, image):
    """Encodes condition images with ``vae`` in [-1, 1]; returns the unscaled latent."""
    return vae.encode(to_rgb(image, "VAE Condition Encode"))
