"""CtrLoRA-XL file forms, told apart from SD1.5 CtrLoRA files by their keys.

* Base file: diffusers' ``save_pretrained`` of the port's peft-wrapped ControlNetLoraMulti: diffusers ControlNet
  names, ``conv_in_condition`` (the condition-latent conv), every to_q/to_k/to_v weight stored as
  ``<m>.base_layer.weight``, and embedded base-condition adapters as ``<m>.lora_A.<adapter>.weight`` /
  ``<m>.lora_B.<adapter>.weight``.
* Condition LoRA: ``PeftModel.save_pretrained``'s adapter-only form ``base_model.model.<m>.lora_A.weight``, or the
  training checkpoint's form ``<m>.lora_A.<condition>.weight`` (possibly with every base weight too).
"""
import json
import os
import re

import safetensors

HINT_CONV = "conv_in_condition.weight"
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
# The port hard-codes LoraConfig(r=64, lora_alpha=128) everywhere: any file it can load has scale alpha / r = 2.
PORT_LORA_SCALE = 2.0


def _parse_lora_key(key):
    return _LORA_KEY.match(key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key)


def is_xl_base(keys):
    return HINT_CONV in keys


def is_xl_file(keys):
    """An XL base (it has ``conv_in_condition``) or a peft LoRA file (``lora_A``/``lora_B`` keys)."""
    return is_xl_base(keys) or any(_parse_lora_key(k) for k in keys)


def lora_pairs(tensors):
    """``{adapter: {diffusers module: (lora_A, lora_B)}}``; adapter is None in the adapter-only form."""
    parts = {}
    for key, tensor in tensors.items():
        match = _parse_lora_key(key)
        if match:
            module = parts.setdefault(match["adapter"], {}).setdefault(match["module"], {})
            module[match["part"]] = tensor
    return {adapter: {m: (p.get("A"), p.get("B")) for m, p in modules.items()} for adapter, modules in parts.items()}


def base_weights(tensors):
    """The shared weights under diffusers ControlNet names: LoRA keys dropped, peft's ``.base_layer.`` removed."""
    return {k.replace(".base_layer.", "."): v for k, v in tensors.items() if not _parse_lora_key(k)}


def embedded_adapters(keys):
    """Names of the base-condition adapters a base file carries (``<m>.lora_A.<name>.weight``)."""
    return sorted({m["adapter"] for m in map(_parse_lora_key, keys) if m and m["adapter"]})


def adapter_keys(keys, adapter):
    """The ``lora_A``/``lora_B`` keys of the embedded adapter named ``adapter``."""
    return [k for k in keys if (m := _parse_lora_key(k)) and m["adapter"] == adapter]


def read_keys(path):
    """The tensor names of a ``.safetensors`` file, from its header only; None for other files or errors."""
    if not path.endswith(".safetensors"):
        return None
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            return list(f.keys())
    except Exception:  # a listing must not fail on a broken file; loading it reports the problem
        return None


def read_tensors(path, keys):
    """Only ``keys`` of a ``.safetensors`` file (an embedded adapter without reading the whole base)."""
    with safetensors.safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in keys}


def lora_scale(path):
    """alpha / r from the adapter_config.json peft writes beside a LoRA: ``<stem>.adapter_config.json``, or
    ``adapter_config.json`` next to peft's ``adapter_model.safetensors``. Without one, the port's fixed scale 2
    (the released files carry no alpha)."""
    configs = [f"{os.path.splitext(path)[0]}.adapter_config.json"]
    if os.path.basename(path).startswith("adapter_model."):
        configs.append(os.path.join(os.path.dirname(path), "adapter_config.json"))
    for config in configs:
        if os.path.isfile(config):
            with open(config) as f:
                data = json.load(f)
            rank, alpha = float(data["r"]), float(data["lora_alpha"])
            return alpha / rank ** 0.5 if data.get("use_rslora") else alpha / rank
    return PORT_LORA_SCALE
