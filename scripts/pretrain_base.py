#!/usr/bin/env python
"""Pretrain a CtrLoRA Base ControlNet on several conditions (one LoRA each): CtrLoRA's first stage, in two commands.

1. ``prepare``: encode each condition folder once into WebDataset shards (latents and prompt embeddings):

    .venv/bin/python scripts/pretrain_base.py prepare --checkpoint v1-5-pruned-emaonly.safetensors \\
        --condition canny=/data/canny --condition depth=/data/depth --data /shards/mybase

2. ``train``: stream those shards (DataLoader workers) into the pretraining:

    .venv/bin/python scripts/pretrain_base.py train --checkpoint ... --data /shards/mybase --steps 100000

Both run on one process or, with PyTorch's own launcher, on many GPUs or machines (each process prepares its part
of the shards; training is DDP, NCCL on GPUs, gloo on the CPU):

    .venv/bin/torchrun --nproc_per_node 8 scripts/pretrain_base.py train ...
    .venv/bin/torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 --nproc_per_node 8 \\
        scripts/pretrain_base.py train ...   (and --node_rank 1 on the second machine)

Every machine needs the data folder and the output folder at the same paths (a shared filesystem). After a crash,
the same command with --resume (train) or again (prepare) continues. See ``training/pretrain.py``.

This script starts the host (``scripts/comfy_host.py``: ComfyUI from COMFYUI_PATH or the repository's .comfyui,
this repository imported as the package ComfyUI would import it), with --cpu when no GPU is usable, and loads the
models: a ComfyUI checkpoint, or ``--models-from file.py:function`` returning ``(MODEL, CLIP or prompt encoder,
VAE)`` (tests and benchmarks build tiny models that way).
"""
import argparse
import importlib
import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import comfy_host  # noqa: E402

LABEL = "Pretrain base"


def load_pack(argv):
    """Starts the host for ``argv`` and returns the pack."""
    import torch

    cpu = "--cpu" in argv or not torch.cuda.is_available()
    if not cpu:
        # Each process on its own GPU before ComfyUI looks at the device.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        return comfy_host.start(cpu=cpu)
    except RuntimeError as e:
        sys.exit(str(e))


def pack_module(name):
    """A module of the pack, by its path inside it (``training.pretrain``)."""
    return importlib.import_module(f"{comfy_host.PACK}.{name}")


def training_module(name):
    return pack_module(f"training.{name}")


def load_models(checkpoint=None, models_from=None):
    """``(MODEL, prompt encoder, VAE, name)`` from a ComfyUI checkpoint file (a path, or a name in
    models/checkpoints), or from ``file.py:function`` / ``module:function``."""
    import comfy.sd
    import folder_paths
    CtrLoRAError = pack_module("ctrlora_core").CtrLoRAError
    if models_from:
        target, _, function = models_from.rpartition(":")
        if not target or not function:
            raise CtrLoRAError(f"{LABEL}: --models-from {models_from!r}: write it as file.py:function or "
                               "module:function.")
        if target.endswith(".py"):
            sys.path.insert(0, os.path.dirname(os.path.abspath(target)))  # its own imports
            spec = importlib.util.spec_from_file_location(f"ctrlora_models_{abs(hash(target))}", target)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        model, text, vae = getattr(module, function)()
        name = models_from
    else:
        path = checkpoint if os.path.isfile(checkpoint) else folder_paths.get_full_path("checkpoints", checkpoint)
        if path is None:
            raise CtrLoRAError(f"{LABEL}: checkpoint {checkpoint} not found (a path, or a file in models/checkpoints).")
        name = os.path.basename(path)
        try:
            model, text, vae, _ = comfy.sd.load_checkpoint_guess_config(
                path, output_vae=True, output_clip=True,
                embedding_directory=folder_paths.get_folder_paths("embeddings"))
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CtrLoRAError(f"{LABEL}: {name} is not a Stable Diffusion checkpoint ComfyUI can load ({first}).") from e
        if text is None or vae is None:
            raise CtrLoRAError(f"{LABEL}: {name} has no {'CLIP' if text is None else 'VAE'}; use a full checkpoint.")
    encode = training_module("encode").clip_prompt_encoder(text) if hasattr(text, "tokenize") else text
    return model, encode, vae, name


def parser():
    p = argparse.ArgumentParser(prog="pretrain_base.py", description=__doc__.splitlines()[0])
    commands = p.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="encode condition folders into shards (run once, resumable)")
    train = commands.add_parser("train", help="pretrain on prepared shards")
    for sub in (prepare, train):
        models = sub.add_mutually_exclusive_group(required=True)
        models.add_argument("--checkpoint",
                            help="SD1.5-family checkpoint (path, or a name in ComfyUI's models/checkpoints)")
        models.add_argument("--models-from", metavar="FILE.py:FUNCTION",
                            help="advanced: a function returning (MODEL, CLIP or prompt encoder, VAE)")
        sub.add_argument("--data", required=True, help="the prepared data folder (one subfolder per condition)")
        sub.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: torch's default)")
        sub.add_argument("--cpu", action="store_true", help="run on the CPU (gloo) even with CUDA")
    prepare.add_argument("--condition", action="append", default=[], metavar="NAME=FOLDER", required=True,
                         help="a condition and its dataset folder (prompt.json, or source/ + target/); repeat")
    prepare.add_argument("--resolution", type=int, default=512)
    prepare.add_argument("--prompt-template", default="", help="prompt from the file name, e.g. 'a photo, {name}'")
    prepare.add_argument("--name-pattern", default="", help="names the file-name fields for the template")
    prepare.add_argument("--shard-size", type=int, default=1000, help="pairs per shard")

    defaults = training_module("pretrain").PretrainConfig()
    train.add_argument("--init-base", help="continue from an existing base file instead of the checkpoint's UNet")
    train.add_argument("--output-dir", help="where the files go (default: ComfyUI's models/ctrlora)")
    train.add_argument("--name", default="ctrlora_sd15_basecn", help="base file name; LoRAs are <name>_<cond>_rank<r>")
    train.add_argument("--rank", type=int, default=defaults.rank, help="LoRA rank (official: 128)")
    train.add_argument("--steps", type=int, default=defaults.steps, help="optimizer updates")
    train.add_argument("--batch-size", type=int, default=defaults.batch_size,
                       help="pairs per micro-batch and process (official: 1)")
    train.add_argument("--grad-accum", type=int, default=defaults.grad_accum,
                       help="micro-batches per process and update (official: 4)")
    train.add_argument("--mix", default=defaults.mix, choices=["micro-batch", "update"],
                       help="a condition per micro-batch (official: updates mix conditions) or per update")
    train.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate (official: 1e-5)")
    train.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    train.add_argument("--prompt-dropout", type=float, default=defaults.prompt_dropout)
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--save-every", type=int, default=defaults.save_every, help="updates between resumable saves")
    train.add_argument("--keep-snapshots", type=int, default=defaults.keep_snapshots,
                       help="output snapshots kept in <name>.train/ (the newest)")
    train.add_argument("--stop-after", type=int, default=0, help="save and stop at this step (then --resume)")
    train.add_argument("--resume", action="store_true", help="continue the saved run of --name")
    train.add_argument("--precision", default=defaults.precision, choices=["auto", "fp32", "bf16", "fp16"])
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--workers", type=int, default=defaults.workers, help="DataLoader workers per process")
    return p


def _prepare(args, dist, models):
    model, encode, vae, model_name = models
    return training_module("pretrain_data").Preparer(
        model, encode, vae, args.condition, args.data, args.resolution, template=args.prompt_template,
        name_pattern=args.name_pattern, model_name=model_name, shard_size=args.shard_size, dist=dist,
        log=lambda message: print(message, flush=True)).run()


def _train(args, dist, models):
    pretrain = training_module("pretrain")
    model, _, _, model_name = models
    config = pretrain.PretrainConfig(
        rank=args.rank, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, mix=args.mix,
        lr=args.lr, prompt_dropout=args.prompt_dropout, seed=args.seed, save_every=args.save_every,
        keep_snapshots=args.keep_snapshots, stop_after=args.stop_after, precision=args.precision,
        weight_decay=args.weight_decay, gradient_checkpointing=args.gradient_checkpointing, workers=args.workers)
    config.validate()
    output = args.output_dir or _default_output_folder()
    result = pretrain.Pretrainer(model, args.data, output, args.name, config, init_base=args.init_base,
                                 resume=args.resume, dist=dist, model_name=model_name,
                                 log=lambda message: print(message, flush=True)).run()
    return result.report


def main(argv=None, dist=None):
    """The command line. Returns the exit status (0 done or stopped, 2 bad input)."""
    argv = sys.argv[1:] if argv is None else argv
    load_pack(argv)
    import torch
    CtrLoRAError = pack_module("ctrlora_core").CtrLoRAError
    Distributed = training_module("distributed").Distributed

    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    own_dist = dist is None
    dist = dist or Distributed.from_env(cpu=args.cpu)
    try:
        models = dist.exchange(lambda: load_models(args.checkpoint, args.models_from))
        report = (_prepare if args.command == "prepare" else _train)(args, dist, models)
    except CtrLoRAError as e:
        if dist.is_writer:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if own_dist:
            dist.close()
    if dist.is_writer and args.command == "train":
        print(report, flush=True)
    return 0


def _default_output_folder():
    import folder_paths
    return folder_paths.get_folder_paths("ctrlora")[0]


if __name__ == "__main__":
    sys.exit(main())
