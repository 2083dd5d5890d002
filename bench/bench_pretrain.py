#!/usr/bin/env python
"""Pretraining benchmark: seconds per step of the multi-condition base pretraining on 1 and 2 processes
(``torchrun``; gloo on the CPU, NCCL on GPUs), and the scaling between them.

    .venv/bin/python bench/bench_pretrain.py [--sizes tiny,small] [--steps N] [--warmup N] [--rounds N]
                                             [--batch N] [--device cpu|cuda]

Each measurement is one ``torchrun --standalone`` launch of this script in worker mode: every process builds the
models in-process (``tests/pretrain_models.py``, seeded random weights; nothing is downloaded), encodes its shard
of three synthetic condition folders (random images, 24 pairs each) and sets up the run exactly as
``scripts/pretrain_base.py`` does (``training.pretrain.Pretrainer``: DDP, AdamW over the base and the three LoRAs),
then runs ``--warmup`` untimed steps and times ``--steps`` steps between two barriers. Process 0 writes the
result; the table shows the median over ``--rounds`` (configurations interleaved).

Configurations, with ``--batch B``: 1 process x B; 2 processes x B/2 (the same global batch: the same training,
strong scaling); 2 processes x B (twice the samples per step: weak scaling). Sizes: ``tiny`` is the test suite's
model (32 channels, 32 px), ``small`` the same layout at 64 channels with three levels (64 px). On a CPU the two
processes share the machine's cores (``--threads`` each, default 1), so the numbers show the overhead of the
distributed path (gradient all-reduce of every ControlNet parameter, per step) more than a speed-up. JSON goes to
``bench/results/``.
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
SIZES = {"tiny": 32, "small": 64}  # resolution per size
CONDITIONS = ("canny", "depth", "seg")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,small")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=4, help="global batch of the 1-process run")
    p.add_argument("--configs", default="", help="processes x batch per process, e.g. 1x4,2x2 (default: 1xB,2xB/2,2xB)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def write_data(folder, resolution, count=24):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for name in CONDITIONS:
        for sub in ("source", "target"):
            os.makedirs(os.path.join(folder, name, sub), exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, name, sub, f"{i:04d}.png"))


def peak_rss_mb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def worker(args):
    """One measurement, run under torchrun."""
    spec = importlib.util.spec_from_file_location("pretrain_base_script", os.path.join(ROOT, "scripts",
                                                                                        "pretrain_base.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cpu_flag = ["--cpu"] if args.device == "cpu" else []
    pretrain = script.load_pack(cpu_flag)
    import torch
    torch.set_num_threads(args.threads)
    from comfyui_ctrlora.training.distributed import Distributed

    dist = Distributed.from_env(cpu=args.device == "cpu")
    model, encode, vae, _ = pretrain.load_models(
        models_from=os.path.join(ROOT, "tests", "pretrain_models.py") + ":" + args.size)
    config = pretrain.PretrainConfig(rank=8, steps=args.warmup + args.steps, batch_size=args.batch, lr=1e-5,
                                     resolution=SIZES[args.size], save_every=0)
    out = tempfile.mkdtemp(prefix="bench-pretrain-")
    trainer = pretrain.Pretrainer(model, encode, vae, [(c, os.path.join(args.data, c)) for c in CONDITIONS], out,
                                  "bench", config, dist=dist, log=lambda message: None).prepare()
    with torch.inference_mode(False), torch.enable_grad():
        for step in range(args.warmup):
            trainer.train_step(step)
        dist.barrier()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for step in range(args.warmup, args.warmup + args.steps):
            trainer.train_step(step)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        seconds = (time.perf_counter() - started) / args.steps
    if dist.is_writer:
        parameters = sum(p.numel() for p in trainer.module.parameters())
        with open(args.out, "w") as f:
            json.dump({"s_per_step": seconds, "peak_rss_mb": peak_rss_mb(), "parameters": parameters,
                       "device": str(trainer.device)}, f)
    dist.close()


def measure(args, size, processes, batch, data):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", str(processes), __file__, "--worker", "--size", size,
           "--batch", str(batch), "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads",
           str(args.threads), "--device", args.device, "--data", data, "--out", out]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        sys.exit(f"worker failed ({' '.join(cmd)}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    with open(out) as f:
        result = json.load(f)
    os.unlink(out)
    return result


def main(argv=None):
    args = parse(argv)
    if args.worker:
        return worker(args)
    sizes = [s for s in args.sizes.split(",") if s]
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",") if c] or \
        [(1, args.batch), (2, args.batch // 2), (2, args.batch)]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in sizes:
            data = os.path.join(scratch, size)
            write_data(data, SIZES[size])
            results = {c: [] for c in configs}
            for round_ in range(args.rounds):
                for config in configs[round_ % len(configs):] + configs[:round_ % len(configs)]:
                    results[config].append(measure(args, size, *config, data))
            base = statistics.median(r["s_per_step"] for r in results[configs[0]]) / configs[0][1]  # s per sample
            for processes, batch in configs:
                runs = results[(processes, batch)]
                seconds = statistics.median(r["s_per_step"] for r in runs)
                rows.append({"size": size, "processes": processes, "batch_per_process": batch,
                             "global_batch": processes * batch, "s_per_step": seconds,
                             "samples_per_s": processes * batch / seconds,
                             "speedup_samples_per_s": (processes * batch / seconds) * base,
                             "all_s_per_step": [r["s_per_step"] for r in runs],
                             "peak_rss_mb_process0": max(r["peak_rss_mb"] or 0 for r in runs),
                             "parameters": runs[0]["parameters"], "device": runs[0]["device"]})
    print(f"\nPretraining, {args.device}, {os.cpu_count()} cores, {args.threads} thread(s) per process, "
          f"{args.steps} timed steps after {args.warmup}, median of {args.rounds} rounds\n")
    print("| size | processes | batch/process | global batch | s/step | samples/s | samples/s vs the first row |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['processes']} | {r['batch_per_process']} | {r['global_batch']} | "
              f"{r['s_per_step']:.4f} | {r['samples_per_s']:.1f} | {r['speedup_samples_per_s']:.2f}x |")
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(ROOT, "bench", "results", f"pretrain_{args.device}_{stamp}.json")
    with open(path, "w") as f:
        json.dump({"args": vars(args), "machine": platform.platform(), "cpus": os.cpu_count(), "rows": rows}, f,
                  indent=1)
    print(f"\n{path}")


if __name__ == "__main__":
    main()
