"""The official training objective: noise-prediction MSE through the frozen SD UNet with the control added.

As the official ``LatentDiffusion.p_losses`` (eps parameterisation, DDPM linear schedule 0.00085-0.012 over 1000
steps): ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` with ``a_t`` the model's cumulative alphas (ComfyUI's
``model_sampling`` holds them as ``sigma_t = sqrt((1 - a_t) / a_t)``), and ``loss = mean((eps_pred - eps)^2)``.
``x_t`` is what ComfyUI's ``calculate_input`` hands the UNet at ``sigma_t``; the control runs exactly as at
inference (hint latent, integer timestep, the text context) and is added to the UNet's skip connections and middle
block. The UNet adds controls in place, so neither ``x_t`` nor the UNet may require grad (they do not here).
"""
import torch
import torch.nn.functional as F

import comfy.ldm.modules.attention
import comfy.model_base
import comfy.model_sampling

from ..ctrlora_core import CtrLoRAError


class NoisePrediction:
    def __init__(self, model, base):
        """``model``: the SD checkpoint's MODEL (a ModelPatcher); ``base``: the BaseControlNet."""
        inner = model.model
        sampling = inner.model_sampling
        if not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete) or \
                isinstance(sampling, comfy.model_sampling.ModelSamplingDiscreteEDM):
            raise CtrLoRAError("Train CtrLoRA: the model does not use SD1.5's discrete DDPM schedule; "
                               "CtrLoRA trains on SD1.5-family checkpoints.")
        if inner.model_type not in (comfy.model_base.ModelType.EPS, comfy.model_base.ModelType.V_PREDICTION):
            raise CtrLoRAError(f"Train CtrLoRA: unsupported model type {inner.model_type.name} "
                               "(noise or v prediction only).")
        self.v_prediction = inner.model_type == comfy.model_base.ModelType.V_PREDICTION
        self.unet = inner.diffusion_model
        self.unet_dtype = inner.manual_cast_dtype or inner.get_dtype()
        self.latent_format = inner.latent_format
        sigmas = sampling.sigmas.detach().to("cpu", torch.float32).clone()
        self.alphas_cumprod = 1.0 / (1.0 + sigmas ** 2)
        self.num_timesteps = len(sigmas)
        self.base = base

    def check_compatible(self, latent_channels, context_dim):
        control_channels = self.base.model.in_channels
        if latent_channels != control_channels:
            raise CtrLoRAError(f"Train CtrLoRA: the VAE makes {latent_channels}-channel latents but {self.base.name} "
                               f"takes {control_channels}; use the SD checkpoint's own VAE.")
        unet_in = self.unet.in_channels
        if latent_channels != unet_in:
            raise CtrLoRAError(f"Train CtrLoRA: the VAE makes {latent_channels}-channel latents but the model takes "
                               f"{unet_in}.")
        for name, module in (("the model", self.unet), (self.base.name, self.base.model)):
            expected = _context_dim(module)
            if expected is not None and context_dim != expected:
                raise CtrLoRAError(f"Train CtrLoRA: the text encoder gives {context_dim}-wide embeddings but {name} "
                                   f"expects {expected}; use the SD checkpoint's own CLIP.")

    def alphas(self, timesteps, device):
        return self.alphas_cumprod.to(device)[timesteps.to(device)].view(-1, 1, 1, 1)

    def loss(self, condition, hint, x0, context, timesteps, noise):
        """Mean noise-prediction (or v) MSE of a batch. ``condition``: a ``Condition`` whose adapter may be trained,
        or None for the UNet alone."""
        a = self.alphas(timesteps, x0.device)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        t = timesteps.to(x0.device)
        control = None
        if condition is not None:
            compute = self.base.compute_dtype
            control = condition(hint.to(compute), t.to(compute), context.to(compute))
            # Fresh lists: the UNet pops them while it adds each control to its skip connections.
            control = {
                "input": [],
                "middle": [c.to(self.unet_dtype) for c in control["middle"]],
                "output": [c.to(self.unet_dtype) for c in control["output"]],
            }
        prediction = self.unet(x_t.to(self.unet_dtype), t.float(), context=context.to(self.unet_dtype),
                               control=control, transformer_options={})
        target = a.sqrt() * noise - (1 - a).sqrt() * x0 if self.v_prediction else noise
        return F.mse_loss(prediction.float(), target.float())


def _context_dim(module):
    """Width of the text context the cross attentions of ``module`` take (None without cross attention)."""
    for name, sub in module.named_modules():
        if name.endswith("attn2") and isinstance(sub, comfy.ldm.modules.attention.CrossAttention):
            return sub.to_k.in_features
    return None


def mean_loss(objective, condition, data, timesteps, noise, batch_size=8):
    """Mean loss of ``condition`` (None: the UNet alone) on every item of an ``EncodedDataset`` with fixed
    ``timesteps`` [N] and ``noise`` [N, C, h, w] and each item's own prompt: a held-out score."""
    total = 0.0
    device = noise.device
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            ids = torch.arange(start, min(start + batch_size, len(data)))
            loss = objective.loss(
                condition, data.hints[ids].to(device), data.targets[ids].to(device),
                data.context_batch(data.prompt_ids[ids], device, torch.float32), timesteps[ids], noise[ids],
            )
            total += loss.item() * len(ids)
    return total / len(data)
