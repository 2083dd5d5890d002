"""Load Condition Image (as trained): ComfyUI's Load Image, decoding the file as training does.

ComfyUI's Load Image clips 16-bit grayscale PNG/TIFF (a 16-bit ramp comes out 99.6% white) and 32-bit TIFFs, and
converts CMYK with Pillow's formula; training decodes every mode as the official loader (OpenCV) does. This node is
Load Image (same input folder, upload widget and MASK) with the training decoder.
"""
import os

import nodes as comfy_nodes
import torch

from ..ctrlora_core import CtrLoRAError

from ..training import paths
from ..training.images import decode, decode_alpha

CATEGORY = "conditioning/ctrlora"


class LoadConditionImage(comfy_nodes.LoadImage):
    DESCRIPTION = ("Loads an image from ComfyUI's input folder exactly as Train CtrLoRA reads its training images "
                   "(16-bit and float images scaled to 8 bits as the official loader does, not clipped). Use it for "
                   "condition images at inference. MASK: 1 - alpha, as Load Image.")
    CATEGORY = CATEGORY
    OUTPUT_TOOLTIPS = ("The image as Train CtrLoRA reads its images, in [0, 1].",
                       "1 - alpha, as Load Image's (zeros when the file has no alpha).")

    @classmethod
    def INPUT_TYPES(cls):
        types = super().INPUT_TYPES()
        types["required"]["image"][1]["tooltip"] = "A file of ComfyUI's input folder (upload one here)."
        return types

    @classmethod
    def VALIDATE_INPUTS(cls, image):
        try:  # before looking: whether a file exists outside is nobody's business
            path = paths.input_file(image, "Load Condition Image")
        except CtrLoRAError as e:
            return str(e)
        return True if os.path.isfile(path) else f"Invalid image file: {image}"

    def load_image(self, image):
        path = paths.input_file(image, "Load Condition Image")
        rgb = torch.from_numpy(decode(path)).float().div(255.0)[None]
        alpha = decode_alpha(path)
        mask = torch.zeros((64, 64)) if alpha is None else 1.0 - torch.from_numpy(alpha).float().div(255.0)
        return rgb, mask[None]


NODE_CLASS_MAPPINGS = {"CtrLoRALoadConditionImage": LoadConditionImage}
NODE_DISPLAY_NAME_MAPPINGS = {"CtrLoRALoadConditionImage": "Load Condition Image (as trained)"}
