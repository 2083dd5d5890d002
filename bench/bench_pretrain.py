#!/usr/bin/env python
"""Pretraining benchmark: samples/s and peak memory of streamed pretraining for a small and a 32x larger dataset,
on 1 and 2 processes (``torchrun``; gloo on the CPU, NCCL on GPUs).

    .venv/bin/python bench/bench_pretrain.py [--pairs 1000,32000] [--configs 1x4,2x2] [--size tiny|small|sd15]
                                             [--steps N] [--warmup N] [--rounds N] [--workers N] [--device cpu|cuda]

The data: three conditions of synthetic prepared pairs (random latents and prompt embeddings of the model's shapes,
written as the ``prepare`` stage writes them: WebDataset shards of 1000 pairs, ``index.json``), so that the data
size is the only thing that changes; the image-to-shard stage is timed separately (``--prepare-pairs``, real
images through the tiny VAE, one process). Each measurement is one ``torchrun --standalone`` launch of this script
in worker mode: every process builds the models in-process (``tests/pretrain_models.py``, seeded random weights;
nothing is downloaded), sets up ``training.pretrain.Pretrainer`` exactly as ``scripts/pretrain_base.py train`` does
(DataLoader workers reading the shards, DDP, AdamW over the base and three LoRAs), runs ``--warmup`` untimed
updates and times ``--steps`` updates between two barriers. Peak RSS: the training process (VmHWM) and the largest
DataLoader worker (``RUSAGE_CHILDREN`` after they exit), the largest over the processes. Configurations are
processes x accumulation, batch 1 per micro-batch (the official shape), so 1x4 and 2x2 train the same samples.
Process 0 writes the result; the table shows the median over ``--rounds`` (configurations interleaved). JSON goes
to ``bench/results/``. On a GPU machine: ``--device cuda --size sd15 --configs 1x4,2x2`` (NCCL, 512 px latents).
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
CONDITIONS = ("canny", "depth", "seg")
# (latent channels, latent side, prompt tokens, prompt width) per model size
SHAPES = {"tiny": (4, 16, 7, 32), "small": (4, 32, 7, 32), "sd15": (4, 64, 77, 768)}
SHARD = 1000


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", default="1000,32000", help="pairs per condition, comma-separated")
    p.add_argument("--configs", default="1x4,2x2", help="processes x gradient accumulation")
    p.add_argument("--size", default="tiny", choices=sorted(SHAPES))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per process")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--prepare-pairs", type=int, default=200, help="pairs of real images for the prepare timing")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--accumulation", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def load_script(argv):
    spec = importlib.util.spec_from_file_location("pretrain_base_script", os.path.join(ROOT, "scripts",
                                                                                        "pretrain_base.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.load_pack(argv)
    return script


def synthetic_data(folder, pairs, size):
    """Prepared shards of random latents and prompt embeddings (one distinct prompt per pair, as captioned data)."""
    import torch
    script = load_script(["--cpu"])
    data = script.training_module("pretrain_data")
    channels, side, tokens, width = SHAPES[size]
    g = torch.Generator().manual_seed(0)
    for name in CONDITIONS:
        target = os.path.join(folder, name)
        os.makedirs(target, exist_ok=True)
        count = -(-pairs // SHARD)
        for number in range(count):
            n = min(SHARD, pairs - number * SHARD)
            samples = [{"key": f"{number * SHARD + i:09d}", "hint": torch.randn(channels, side, side, generator=g),
                        "x0": torch.randn(channels, side, side, generator=g),
                        "context": torch.randn(tokens, width, generator=g), "name": f"{i}", "prompt": f"p{i}"}
                       for i in range(n)]
            data.store_shard(target, number, samples)
        with open(os.path.join(target, "empty_prompt.npy"), "wb") as f:
            f.write(script.training_module("streaming").array_bytes(torch.zeros(tokens, width)))
        source = {"folder": target, "pairs": pairs, "resolution": side * 8, "fingerprint": f"synthetic-{pairs}",
                  "model": f"tests/pretrain_models.py:{size}"}
        data.write_index(target, name, count, source)


def peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def worker(args):
    """One measurement, run under torchrun."""
    cpu_flag = ["--cpu"] if args.device == "cpu" else []
    script = load_script(cpu_flag)
    import torch
    torch.set_num_threads(args.threads)
    pretrain = script.training_module("pretrain")
    dist = script.training_module("distributed").Distributed.from_env(cpu=args.device == "cpu")
    if args.checkpoint:  # the SD1.5 stand-in (tests/sd15_standins.py)
        model, _, _, name = script.load_models(checkpoint=args.checkpoint)
    else:
        model, _, _, name = script.load_models(models_from=os.path.join(ROOT, "tests", "pretrain_models.py") + ":" +
                                               args.size)
    config = pretrain.PretrainConfig(rank=8, steps=args.warmup + args.steps, batch_size=1,
                                     grad_accum=args.accumulation, lr=1e-5, save_every=0, workers=args.workers)
    out = tempfile.mkdtemp(prefix="bench-pretrain-")
    trainer = pretrain.Pretrainer(model, args.data, out, "bench", config, dist=dist, model_name=name,
                                  log=lambda message: None).prepare()
    with torch.inference_mode(False), torch.enable_grad():
        micro = trainer.batches(config.steps)
        for _ in range(args.warmup):
            trainer.train_step([next(micro) for _ in range(config.grad_accum)])
        dist.barrier()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step([next(micro) for _ in range(config.grad_accum)])
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        seconds = (time.perf_counter() - started) / args.steps
        next(micro, None)  # the DataLoader's end: its workers exit and are waited for
    memory = {"process_mb": peak_rss_mb(),
              "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    memory = dist.gather(memory)
    if dist.is_writer:
        with open(args.out, "w") as f:
            json.dump({"s_per_update": seconds, "samples_per_update": dist.world * config.grad_accum,
                       "process_mb": max(m["process_mb"] for m in memory),
                       "worker_mb": max(m["worker_mb"] for m in memory), "device": str(trainer.device)}, f)
    dist.close()


def measure(args, processes, accumulation, data, checkpoint=None):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", str(processes), __file__, "--worker", "--size", args.size,
           "--accumulation", str(accumulation), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--workers", str(args.workers), "--device", args.device, "--data", data,
           "--out", out] + (["--checkpoint", checkpoint] if checkpoint else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        sys.exit(f"worker failed ({' '.join(cmd)}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    with open(out) as f:
        result = json.load(f)
    os.unlink(out)
    return result


def time_prepare(pairs, scratch):
    """The image-to-shard stage on one process: pairs/s and peak RSS, tiny model and VAE."""
    code = f"""
import os, sys, time, json
sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
sys.path.insert(0, {os.path.join(ROOT, 'scripts')!r})
import comfy_host
comfy_host.start(cpu=True)
import torch, tiny
from training_helpers import write_pairs
torch.set_num_threads(1)
from comfyui_ctrlora.training.pretrain_data import Preparer
folders = [(c, write_pairs(os.path.join({scratch!r}, 'images', c), {pairs}, seed=i)) for i, c in enumerate(['a', 'b'])]
started = time.perf_counter()
Preparer(tiny.tiny_model(), tiny.prompt_encoder(), tiny.tiny_vae(), folders, os.path.join({scratch!r}, 'prepared'),
         32, log=lambda m: None).run()
seconds = time.perf_counter() - started
status = open('/proc/self/status').read()
peak = [int(l.split()[1]) / 1024 for l in status.splitlines() if l.startswith('VmHWM:')][0]
print(json.dumps({{'pairs_per_s': 2 * {pairs} / seconds, 'peak_rss_mb': peak}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        sys.exit(f"prepare timing failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse(argv)
    if args.worker:
        return worker(args)
    sizes = [int(v) for v in args.pairs.split(",") if v]
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",") if c]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        prepare = time_prepare(args.prepare_pairs, scratch) if args.prepare_pairs else None
        checkpoint = None
        if args.size == "sd15":
            sys.path.insert(0, os.path.join(ROOT, "tests"))
            import sd15_standins
            checkpoint = os.path.join(scratch, "sd15_standin.safetensors")
            sd15_standins.write_sd15_checkpoint(checkpoint)
        data = {}
        for pairs in sizes:
            data[pairs] = os.path.join(scratch, f"data{pairs}")
            started = time.perf_counter()
            synthetic_data(data[pairs], pairs, args.size)
            print(f"wrote {len(CONDITIONS)} x {pairs} synthetic pairs in {time.perf_counter() - started:.0f} s",
                  flush=True)
        results = {(p, c): [] for p in sizes for c in configs}
        for _ in range(args.rounds):
            for key in results:
                results[key].append(measure(args, *key[1], data[key[0]], checkpoint))
        for (pairs, (processes, accumulation)), runs in results.items():
            s = statistics.median(r["s_per_update"] for r in runs)
            rows.append({"pairs_per_condition": pairs, "processes": processes, "accumulation": accumulation,
                         "s_per_update": s, "samples_per_s": processes * accumulation / s,
                         "process_peak_rss_mb": max(r["process_mb"] for r in runs),
                         "worker_peak_rss_mb": max(r["worker_mb"] for r in runs), "device": runs[0]["device"]})
    print("| pairs per condition | processes x accumulation | s/update | samples/s | peak RSS, process | "
          "peak RSS, DataLoader worker |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pairs_per_condition']} | {r['processes']} x {r['accumulation']} | {r['s_per_update']:.3f} | "
              f"{r['samples_per_s']:.1f} | {r['process_peak_rss_mb']:.0f} MiB | {r['worker_peak_rss_mb']:.0f} MiB |")
    if prepare:
        print(f"prepare (real images, tiny VAE, 1 process): {prepare['pairs_per_s']:.0f} pairs/s, "
              f"peak RSS {prepare['peak_rss_mb']:.0f} MiB")
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(ROOT, "bench", "results", f"pretrain-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"args": vars(args), "rows": rows, "prepare": prepare, "machine": platform.platform(),
                   "cpus": os.cpu_count()}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
