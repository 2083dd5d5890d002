"""CtrLoRA-XL conditions in ComfyUI's sampling: as SD1.5's ``CtrLoRAControl``, but the XL ControlNet also takes the
noisy latent and SDXL's ``y`` (pooled text + size conditions), which it reads from the sampling call as ComfyUI's
own ControlNet does."""
import comfy.model_base

from ..control import CtrLoRAControl
from ..errors import CtrLoRAError
from .hint import FAMILIES

LATENT_FAMILY_KEY = "ctrlora_family"  # set by VAE Condition Encode in its LATENT


class XLControl(CtrLoRAControl):
    def check_model(self, model):
        """Refuses a sampled model that is not SDXL-shaped (an SD1.5 checkpoint, most likely): SDXL's y first."""
        unet = model.model_config.unet_config
        adm = self.condition.base.model.label_emb[0][0].in_features
        if unet.get("adm_in_channels") != adm:
            raise CtrLoRAError(
                f"Apply CtrLoRA ({self.condition.name}): {self.condition.base.name} is a CtrLoRA-XL base and "
                f"controls SDXL checkpoints, but the sampled model is {type(model.model_config).__name__} (its extra "
                f"conditioning has {unet.get('adm_in_channels')} channels, the base's {adm}). Load an SDXL "
                "checkpoint, or use an SD1.5 CtrLoRA base and LoRAs with this model.")
        super().check_model(model)

    def run_condition(self, x_noisy, t, cond, hint):
        if cond.get("y") is None:
            raise CtrLoRAError(f"Apply CtrLoRA ({self.condition.name}): the sampled model gave no SDXL 'y' "
                               "(pooled text and size conditions); a CtrLoRA-XL condition needs an SDXL checkpoint.")
        dtype = self.condition.base.compute_dtype
        y = comfy.model_base.convert_tensor(cond["y"], dtype, x_noisy.device)
        context = cond.get("crossattn_controlnet", cond["c_crossattn"]).to(x_noisy.device, dtype)
        # As ComfyUI's ControlNet: the model input the UNet gets at this step, not the raw noisy latent.
        x = self.model_sampling.calculate_input(t, x_noisy).to(dtype)
        timesteps = self.model_sampling.timestep(t).to(dtype)
        return self.condition(x, hint, timesteps, context, y)


def check_latent_family(condition, family):
    """Refuses a condition latent that VAE Condition Encode made for the other model family."""
    wanted = condition.base.family
    if family is not None and family != wanted:
        label = {v: k for k, v in FAMILIES.items()}
        raise CtrLoRAError(
            f"Apply CtrLoRA ({condition.name}): the condition latent was encoded for {label[family]}, but "
            f"{condition.base.name} is an {label[wanted]} base. Set VAE Condition Encode's model_family to "
            f"{label[wanted]} and give it the {label[wanted]} checkpoint's VAE.")


# The control that runs a condition of each base family in sampling.
CONTROL_CLASSES = {"sd15": CtrLoRAControl, "xl": XLControl}
