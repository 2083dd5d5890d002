"""CtrLoRA-XL (the community SDXL port, github limerenceaid/CtrLoRA-XL) on the same nodes as SD1.5.

Laid out as the SD1.5 core: ``checkpoint`` (file forms and family detection from keys), ``model`` (the XL ControlNet
on ComfyUI's cldm ControlNet), ``base`` (the shared base), ``lora`` (peft condition LoRAs), ``control`` (sampling)
and ``hint`` (condition encoding). Import from the submodules: ``ctrlora_core.base`` detects XL files through
``checkpoint`` before ``base`` and the rest exist.
"""
