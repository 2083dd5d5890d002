#!/usr/bin/env python
"""Soak benchmark: tests/test_soak.py's run at full size. Many prompts through one real ComfyUI server with full-size
SD1.5-shaped stand-in files (random weights, nothing downloaded): a checkpoint through Load Checkpoint and CLIP Text
Encode, two Base ControlNets and three rank-128 condition LoRAs (2 as .ckpt, 1 as .safetensors), alternating,
with one to three chained conditions and three sizes (tests/soak.py builds the prompts).

    .venv/bin/python bench/bench_soak.py [--prompts 50] [--sizes 256,384,512] [--steps 4] [--device cpu|cuda]

Reports, after prompt 10 and after the last: the server's peak and current RSS, the GPU memory in use
(/system_stats), the most models ComfyUI held loaded and the most ModelPatchers alive in each stretch of prompts,
and the time. Prints a markdown table and writes JSON to bench/results/.
"""
import argparse
import datetime
import json
import os
import pathlib
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2**20
BASES = ("soak_base_a.ckpt", "soak_base_b.ckpt")
LORAS = ("soak_lora_a.ckpt", "soak_lora_b.ckpt", "soak_lora_c.safetensors")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--sizes", default="256,384,512", help="three image sizes in px, comma-separated")
    p.add_argument("--steps", type=int, default=4, help="sampling steps per prompt")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one prompt may take")
    p.add_argument("--keep", help="folder for the stand-in files (kept, reused); default: a temporary one")
    p.add_argument("--out", help="JSON result file (default: bench/results/soak-<time>.json)")
    return p.parse_args(argv)


def write_stand_ins(folder):
    """{"checkpoints": {name: path}, "ctrlora": {name: path}} of full-size stand-ins, written into ``folder`` once."""
    import sd15_standins

    os.makedirs(folder, exist_ok=True)
    writers = {
        ("checkpoints", "soak_sd15.safetensors"): lambda p: sd15_standins.write_sd15_checkpoint(p, seed=0),
        ("ctrlora", BASES[0]): lambda p: sd15_standins.write_ctrlora_base(p, seed=1),
        ("ctrlora", BASES[1]): lambda p: sd15_standins.write_ctrlora_base(p, seed=2),
        ("ctrlora", LORAS[0]): lambda p: sd15_standins.write_ctrlora_lora(p, seed=3),
        ("ctrlora", LORAS[1]): lambda p: sd15_standins.write_ctrlora_lora(p, seed=4),
        ("ctrlora", LORAS[2]): lambda p: lora_as_safetensors(p, seed=5),
    }
    files = {}
    for (kind, name), write in writers.items():
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            print(f"writing {path}", flush=True)
            write(path)
        files.setdefault(kind, {})[name] = path
    return files


def lora_as_safetensors(path, seed):
    import safetensors.torch
    import torch

    import sd15_standins

    ckpt = path + ".ckpt"
    sd15_standins.write_ctrlora_lora(ckpt, seed=seed)
    safetensors.torch.save_file(torch.load(ckpt, weights_only=True), path)
    os.unlink(ckpt)


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import conftest  # noqa: F401 (ComfyUI host in this process, to write the stand-ins with its modules)
    from soak import FIRST_CHECK, Soak, checkpoint_models
    from ui_host import UIServer

    sizes = tuple(int(s) for s in args.sizes.split(","))
    assert len(sizes) == 3, "--sizes takes three sizes"
    with tempfile.TemporaryDirectory(prefix="ctrlora-soak-") as tmp:
        files = write_stand_ins(args.keep or os.path.join(tmp, "files"))
        os.makedirs(os.path.join(tmp, "server"))
        server = UIServer(pathlib.Path(tmp, "server"), models=files, fixtures=True)
        if args.device == "cuda":
            server.device_args = ()
        soak = Soak(checkpoint_models("soak_sd15.safetensors"), BASES, LORAS, sizes, args.steps)
        try:
            server.start()
            checks = soak.run(server, args.prompts, args.timeout)
        finally:
            server.stop()
    first, last = checks
    table = ["| after prompt | peak RSS | RSS | GPU in use | most models loaded | most ModelPatchers | time |",
             "|---|---|---|---|---|---|---|"]
    for check in checks:
        gpu = "-" if check["device_used"] is None else f"{check['device_used'] / MIB:.0f} MiB"
        table.append(f"| {check['after']} | {check['peak_rss'] / MIB:.0f} MiB | {check['rss'] / MIB:.0f} MiB | {gpu} | "
                     f"{check['most_loaded']} | {check['most_patchers']} | {check['seconds']:.0f} s |")
    growth = (last["peak_rss"] - first["peak_rss"]) / MIB
    print(f"\nSoak: {args.prompts} prompts, sizes {sizes} px, {args.steps} steps, {args.device}; models loaded: "
          f"{', '.join(last['loaded_kinds'])}\n")
    print("\n".join(table))
    print(f"\nPeak RSS after prompt {args.prompts} - after prompt {FIRST_CHECK}: {growth:+.1f} MiB")
    out = args.out or os.path.join(ROOT, "bench", "results",
                                   f"soak-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"args": vars(args), "checks": checks}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
