"""Plugs conditions into ComfyUI's sampling: a ``ControlBase`` that sums ``strength_i x control_i``.

Each 'Apply CtrLoRA' adds one ``CtrLoRAControl`` to the conditioning's control chain (ComfyUI's
``previous_controlnet``), so several conditions combine exactly as the official multi-LoRA inference:
each runs the shared base with its own LoRA and its own hint latent, and the outputs are summed.
"""
import logging

import comfy.controlnet
import comfy.utils

from .base import FAMILY_NAMES
from .errors import CtrLoRAError


class CtrLoRAControl(comfy.controlnet.ControlBase):
    def __init__(self, condition):
        super().__init__()
        self.condition = condition
        self.model_sampling = None
        self.model_latent_format = None
        self.hint = None  # the condition latent as the ControlNet sees it, for the current latent size

    def pre_run(self, model, percent_to_timestep_function):
        self.check_model(model)
        super().pre_run(model, percent_to_timestep_function)
        self.model_sampling = model.model_sampling
        # The hint enters the ControlNet like any latent enters the UNet (SD1.5: x 0.18215).
        self.model_latent_format = model.latent_format
        self.condition.base.model.set_attention_heads(model.model_config.unet_config)

    def check_model(self, model):
        """Refuses a sampled model of another family than the base (e.g. SDXL with an SD1.5 base): its text
        context has another width."""
        base = self.condition.base
        context = next(m.to_k.in_features for n, m in base.model.named_modules() if n.endswith("attn2"))
        sampled = model.model_config.unet_config.get("context_dim")
        if sampled != context:
            raise CtrLoRAError(
                f"Apply CtrLoRA ({self.condition.name}): {base.name} is {FAMILY_NAMES[base.family]} base (text "
                f"context {context}), but the sampled model is {type(model.model_config).__name__} (text context "
                f"{sampled}). Sample with a "
                f"checkpoint of the base's family, or use the base made for this checkpoint's family.")

    def hint_for(self, x_noisy, batched_number, transformer_options=None):
        latent = self.cond_hint_original
        height, width = x_noisy.shape[-2:]
        if self.hint is None or self.hint.shape[-2:] != (height, width):
            if latent.shape[-2:] != (height, width):
                # Centre-cropped to the sampled aspect ratio, then scaled: never stretched (the official app
                # centre-crops conditions of different sizes to their common size).
                logging.info("Apply CtrLoRA (%s): condition latent %dx%d, sampled latent %dx%d: centre-cropped to "
                             "the same aspect and resized.", self.condition.name, latent.shape[-1], latent.shape[-2],
                             width, height)
                latent = comfy.utils.common_upscale(latent, width, height, "bilinear", "center")
            self.hint = self.model_latent_format.process_in(latent).to(x_noisy.device, self.condition.base.compute_dtype)
        hint, frames = self.hint, x_noisy.shape[0] // batched_number
        window = (transformer_options or {}).get("ad_params")
        if window is not None and hint.shape[0] > 1:
            # AnimateDiff-Evolved's sliding context windows sample a few frames at a time ("sub_idxs" of
            # "full_length"): each frame's condition goes with its frame, as Advanced-ControlNet's controls do.
            if hint.shape[0] != window["full_length"]:
                raise CtrLoRAError(
                    f"Apply CtrLoRA ({self.condition.name}): {hint.shape[0]} condition frames for "
                    f"{window['full_length']} latent frames; encode 1 condition image (used for all) or one per frame.")
            hint = hint[list(window["sub_idxs"])]
        if hint.shape[0] not in (1, frames):
            raise CtrLoRAError(
                f"Apply CtrLoRA ({self.condition.name}): the condition latent has a batch of {hint.shape[0]} "
                f"but the sampled latent has {frames}; encode 1 condition image (used for all) or {frames}."
            )
        if hint.shape[0] == 1:
            # Unlike ControlNet's, this model never sees x_noisy: pair the hint with every context and timestep.
            return hint.expand(x_noisy.shape[0], *hint.shape[1:])
        return comfy.controlnet.broadcast_image_to(hint, x_noisy.shape[0], batched_number)

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options=None):
        control_prev = None
        if self.previous_controlnet is not None:
            control_prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
        if self.timestep_range is not None and not (self.timestep_range[1] <= t[0] <= self.timestep_range[0]):
            return control_prev
        control = self.run_condition(x_noisy, t, cond, self.hint_for(x_noisy, batched_number, transformer_options))
        return self.control_merge(control, control_prev, output_dtype=None)

    def run_condition(self, x_noisy, t, cond, hint):
        """The condition's raw outputs at this step (CtrLoRA-XL's also takes the noisy latent and SDXL's y)."""
        dtype = self.condition.base.compute_dtype
        context = cond.get("crossattn_controlnet", cond["c_crossattn"]).to(x_noisy.device, dtype)
        timesteps = self.model_sampling.timestep(t).to(dtype)
        return self.condition(hint, timesteps, context)

    def copy(self):
        c = type(self)(self.condition)
        self.copy_to(c)
        return c

    def get_models(self):
        # The base's patcher is shared by every condition on it; ComfyUI loads each patcher once.
        return super().get_models() + [self.condition.base.patcher, self.condition.patcher]

    def cleanup(self):
        self.model_sampling = None
        self.model_latent_format = None
        self.hint = None
        super().cleanup()


def apply_control(positive, negative, condition, latent, strength, start_percent, end_percent,
                  control_class=CtrLoRAControl):
    """Adds ``condition`` (hint ``latent``, unscaled) to the control chain of both conditionings.

    As ComfyUI's own ControlNet apply: the negative pass gets the control too (official sampling does).
    ``control_class``: CtrLoRA-XL conditions run as ``xl.control.XLControl``.
    """
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise CtrLoRAError(
            f"Apply CtrLoRA: start_percent ({start_percent}) must not be greater than end_percent ({end_percent})."
        )
    if latent.ndim != 4:
        raise CtrLoRAError(f"Apply CtrLoRA: the condition latent must be [batch, channels, h, w], got {tuple(latent.shape)}.")
    channels = condition.base.model.in_channels
    if latent.shape[1] != channels:
        raise CtrLoRAError(
            f"Apply CtrLoRA: the condition latent has {latent.shape[1]} channels but {condition.base.name} takes "
            f"{channels}; encode the condition image with 'VAE Condition Encode' and the checkpoint's VAE."
        )
    if strength == 0:
        return positive, negative
    template = control_class(condition)
    by_previous = {}
    result = []
    for conditioning in (positive, negative):
        entries = []
        for embedding, options in conditioning:
            options = options.copy()
            previous = options.get("control", None)
            if previous not in by_previous:
                control = template.copy().set_cond_hint(latent, strength, (start_percent, end_percent))
                control.set_previous_controlnet(previous)
                by_previous[previous] = control
            options["control"] = by_previous[previous]
            options["control_apply_to_uncond"] = False
            entries.append([embedding, options])
        result.append(entries)
    return result[0], result[1]
