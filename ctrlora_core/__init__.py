"""CtrLoRA model maths for ComfyUI: the base ControlNet, condition LoRAs, hint encoding and the control
that plugs into ComfyUI's sampling. Knows nothing of nodes."""
from .base import BaseControlNet, load_base
from .control import CtrLoRAControl, apply_control
from .errors import CtrLoRAError
from .hint import encode_condition
from .lora import Condition, ConditionAdapter, load_condition
from .xl.control import CONTROL_CLASSES, LATENT_FAMILY_KEY, check_latent_family
from .xl.hint import FAMILIES, encode_xl_condition
from .xl.lora import list_embedded, load_xl_condition

__all__ = [
    "BaseControlNet", "CONTROL_CLASSES", "Condition", "ConditionAdapter", "CtrLoRAControl", "CtrLoRAError",
    "FAMILIES", "LATENT_FAMILY_KEY", "apply_control", "check_latent_family", "encode_condition",
    "encode_xl_condition", "list_embedded", "load_base", "load_condition", "load_xl_condition",
]
