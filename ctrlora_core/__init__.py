"""CtrLoRA model maths for ComfyUI: the base ControlNet, condition LoRAs, hint encoding and the control
that plugs into ComfyUI's sampling. Knows nothing of nodes."""
from .base import BaseControlNet, load_base
from .control import CtrLoRAControl, apply_control
from .errors import CtrLoRAError
from .hint import encode_condition
from .lora import Condition, ConditionAdapter, load_condition

__all__ = [
    "BaseControlNet", "Condition", "ConditionAdapter", "CtrLoRAControl", "CtrLoRAError",
    "apply_control", "encode_condition", "load_base", "load_condition",
]
