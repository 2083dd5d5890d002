"""The four inference nodes: thin schemas over ``ctrlora_core``."""
from ..ctrlora_core import (
    CONTROL_CLASSES, FAMILIES, LATENT_FAMILY_KEY, apply_control, check_latent_family, encode_condition,
    encode_xl_condition, list_embedded, load_base, load_condition, load_xl_condition,
)
from ..ctrlora_core.hint import foreign_latent_warning
from ..ctrlora_core.info import describe_lora
from ..ctrlora_core.xl.info import describe_xl_condition
from . import model_folders
from .messages import warn_on_node

CATEGORY = "conditioning/ctrlora"
# The pack's own socket types, declared once (saved workflows name them).
BASE_TYPE = "CTRLORA_BASE"
CONDITION_TYPE = "CTRLORA"


class LoadBaseControlNet:
    DESCRIPTION = "Loads a CtrLoRA Base ControlNet (e.g. ctrlora_sd15_basecn700k.ckpt). Load it once; every condition shares it."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"base_name": (model_folders.list_files(model_folders.BASE_FOLDERS),
                                           {"tooltip": "From models/ctrlora/ or models/controlnet/."})}}

    RETURN_TYPES = (BASE_TYPE,)
    RETURN_NAMES = ("base",)
    OUTPUT_TOOLTIPS = ("The base ControlNet, held once: connect it to every Load CtrLoRA.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, base_name):
        return (load_base(model_folders.resolve(base_name, model_folders.BASE_FOLDERS, "Load Base ControlNet")),)


def _embedded_conditions():
    """``<base file>:<adapter>`` for the base-condition adapters CtrLoRA-XL base files carry."""
    folders = model_folders.BASE_FOLDERS
    return [entry for name in model_folders.list_files(folders)
            for entry in list_embedded(model_folders.resolve(name, folders, "Load CtrLoRA"))]


class LoadCtrLoRA:
    DESCRIPTION = "Loads one condition LoRA (canny, depth, ...) onto a base. N conditions cost one base plus N small LoRAs."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "base": (BASE_TYPE, {"tooltip": "From Load Base ControlNet: the shared base this LoRA runs on."}),
            "lora_name": (model_folders.list_files([model_folders.FOLDER]) + _embedded_conditions(),
                          {"tooltip": "From models/ctrlora/; 'file:adapter' is a condition built into a "
                                      "CtrLoRA-XL base file."}),
        }}

    RETURN_TYPES = (CONDITION_TYPE,)
    RETURN_NAMES = ("condition",)
    OUTPUT_TOOLTIPS = ("One condition (its LoRA on the shared base): connect it to Apply CtrLoRA.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, base, lora_name):
        """The condition, and what the file is (condition, rank, keys, size) for the node's display."""
        file_name, embedded, adapter = lora_name.rpartition(":")
        if embedded:  # a CtrLoRA-XL base file's own condition
            path = model_folders.resolve(file_name, model_folders.BASE_FOLDERS, "Load CtrLoRA")
        else:
            path, adapter = model_folders.resolve(lora_name, [model_folders.FOLDER], "Load CtrLoRA"), None
        if base.family == "xl":
            condition = load_xl_condition(base, path, adapter)
            info = describe_xl_condition(path, condition, adapter)
        else:
            condition = load_condition(base, path)
            info = describe_lora(path, condition.adapter.rank, len(condition.adapter.names))
        return {"ui": {"ctrlora_lora": [info]}, "result": (condition,)}


class VAEConditionEncode:
    DESCRIPTION = ("Encodes a condition image (canny map, depth map, ...) with the checkpoint's VAE, as CtrLoRA "
                   "expects: for SD1.5 the encoder sees the image in [0, 1]; for SDXL (CtrLoRA-XL) in [-1, 1].")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE", {"tooltip": "The condition image (a canny map, a depth map, ...)."}),
                             "vae": ("VAE", {"tooltip": "The VAE of the checkpoint you sample with."})},
                "optional": {"model_family": (list(FAMILIES), {
                    "default": "SD1.5", "tooltip": "The checkpoint's family: SD1.5, or SDXL for CtrLoRA-XL."})}}

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("condition_latent",)
    OUTPUT_TOOLTIPS = ("The condition image's latent: connect it to Apply CtrLoRA's condition_latent.",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, image, vae, model_family="SD1.5"):
        family = FAMILIES[model_family]
        samples = (encode_xl_condition if family == "xl" else encode_condition)(vae, image)
        return ({"samples": samples, LATENT_FAMILY_KEY: family},)


class ApplyCtrLoRA:
    DESCRIPTION = ("Adds one CtrLoRA condition to the conditioning. Chain several to combine conditions: "
                   "the control is the sum of strength x control over the chain.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "positive": ("CONDITIONING", {"tooltip": "Positive prompt conditioning, or an earlier Apply CtrLoRA's."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt conditioning; it gets the control too, as in "
                                                     "the official sampler."}),
            "condition": (CONDITION_TYPE, {"tooltip": "From Load CtrLoRA (or Train CtrLoRA's condition)."}),
            "condition_latent": ("LATENT", {"tooltip": "From VAE Condition Encode."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "Weight of this condition (official default 1.0; 0-2 is the useful range)."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                        "tooltip": "Share of the sampling at which the control starts (0: at once)."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                      "tooltip": "Share of the sampling at which the control stops (1: at the end)."}),
        }}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = ("The positive conditioning with this condition's control.",
                       "The negative conditioning with the same control.")
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, positive, negative, condition, condition_latent, strength, start_percent, end_percent):
        check_latent_family(condition, condition_latent.get(LATENT_FAMILY_KEY))
        # (CtrLoRA-XL encodes in [-1, 1] as VAE Encode does: only SD1.5 conditions need VAE Condition Encode.)
        warning = condition.base.family == "sd15" and foreign_latent_warning(condition_latent, LATENT_FAMILY_KEY)
        if warning:  # it still runs: a hand-made latent may be meant
            warn_on_node(f"Apply CtrLoRA ({condition.name}): {warning}")
        return apply_control(positive, negative, condition, condition_latent["samples"],
                             strength, start_percent, end_percent, CONTROL_CLASSES[condition.base.family])


NODE_CLASS_MAPPINGS = {
    "CtrLoRALoadBase": LoadBaseControlNet,
    "CtrLoRALoad": LoadCtrLoRA,
    "CtrLoRAVAEConditionEncode": VAEConditionEncode,
    "CtrLoRAApply": ApplyCtrLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "CtrLoRALoadBase": "Load Base ControlNet",
    "CtrLoRALoad": "Load CtrLoRA",
    "CtrLoRAVAEConditionEncode": "VAE Condition Encode",
    "CtrLoRAApply": "Apply CtrLoRA",
}
