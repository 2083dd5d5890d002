#!/usr/bin/env python
"""Pretrain a CtrLoRA Base ControlNet on several conditions (one LoRA each): CtrLoRA's first stage.

One process (one GPU, or the CPU):

    .venv/bin/python scripts/pretrain_base.py --checkpoint v1-5-pruned-emaonly.safetensors \\
        --condition canny=/data/canny --condition depth=/data/depth --steps 100000 --batch-size 4

Many GPUs or machines, with PyTorch's own launcher (DDP; NCCL on GPUs, gloo on the CPU):

    .venv/bin/torchrun --nproc_per_node 8 scripts/pretrain_base.py --checkpoint ... --condition ...
    .venv/bin/torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 --nproc_per_node 8 \\
        scripts/pretrain_base.py ...   (and --node_rank 1 on the second machine)

Every machine needs the condition folders and the output folder at the same paths (a shared filesystem).
After a crash, the same command with --resume continues from the last saved step (--save-every). See
``training/pretrain.py`` and ``--help``.

This script only starts the host (``scripts/comfy_host.py``: ComfyUI from COMFYUI_PATH or the repository's
.comfyui, this repository imported as the package ComfyUI would import it), with --cpu when no GPU is usable.
"""
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import comfy_host  # noqa: E402


def load_pack(argv):
    """Starts the host for ``argv`` and returns the pack's ``training.pretrain`` module."""
    import torch

    cpu = "--cpu" in argv or not torch.cuda.is_available()
    if not cpu:
        # Each process on its own GPU before ComfyUI looks at the device.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        comfy_host.start(cpu=cpu)
    except RuntimeError as e:
        sys.exit(str(e))
    return importlib.import_module(f"{comfy_host.PACK}.training.pretrain")


if __name__ == "__main__":
    arguments = sys.argv[1:]
    sys.exit(load_pack(arguments).main(arguments))
