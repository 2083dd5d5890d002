"""The CtrLoRA-XL Base ControlNet: loaded once, shared by every XL condition that runs on it."""
from ..base import BaseControlNet, base_from_tensors
from .checkpoint import base_weights
from .model import build_from_state_dict


class XLBaseControlNet(BaseControlNet):
    family = "xl"


def xl_base_from_tensors(tensors, name, dtype=None):
    """The base from a port base file's tensors. Its embedded adapters are not kept: each is a condition of its
    own (Load CtrLoRA lists them as ``<base file>:<adapter>``)."""
    return base_from_tensors(base_weights(tensors), name, dtype, build=build_from_state_dict,
                             base_class=XLBaseControlNet)
