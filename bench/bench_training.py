#!/usr/bin/env python
"""Training benchmark: steps/s and peak memory of Train CtrLoRA's loop against a straightforward fp32 loop that
re-encodes every step, as the official recipe does (same models, same data, same objective, one run).

    .venv/bin/python bench/bench_training.py [--size tiny,sd15-half|sd15] [--steps N] [--rounds N] [--threads N]

Loops (all through ``training.Trainer``: the same AdamW, the same objective through ComfyUI's UNet, the same
random draws per step):

* ``naive``: every step VAE-encodes the batch's targets and condition images and CLIP-encodes its prompts
  (after prompt dropout), in fp32, as the official recipe does. The images are decoded once and held in memory,
  so file reading is not counted against it.
* ``official recipe``: the same with gradient checkpointing, which the official configs switch on for the UNet
  and the ControlNet (``use_checkpoint: True`` in ``configs/ctrlora_finetune_sd15_rank*.yaml``).
* ``ours``: the encode-once cache; on CUDA bf16 autocast (fp16 + loss scaling without bf16), frozen parts in the
  dtype ComfyUI loaded them in (half on GPUs); fp32 on CPU.
* ``ours + checkpointing``: the same with gradient checkpointing (less memory, some recomputation).
* ``ours bf16`` (CPU, ``--cpu-bf16``): bf16 autocast on the CPU.

Models are built in-process with seeded random weights (nothing is downloaded):

* ``tiny``: the test suite's tiny SD model, tiny VAE and golden base (32 px), and a real ComfyUI CLIP at width 32;
* ``sd15-half``: the SD1.5 UNet, VAE and CLIP-L layouts with every width halved (UNet 160 channels, VAE 64, CLIP
  384 x 12 layers), 256 px: the compute shares of VAE, CLIP, UNet and ControlNet stay roughly those of SD1.5;
* ``sd15``: full SD1.5 sizes, 512 px (for a GPU).

The base ControlNet is a copy of the UNet's encoder (as the official base starts), loaded with ``load_base``.

"Setup" is the time to scan and encode the dataset and load the models (for ``ours`` it includes building the
cache, a one-time cost). Each measurement runs in its own process (so peak memory is that loop's alone): setup (models, data, the cache),
``--warmup`` untimed steps, ``--steps`` timed steps. Rounds rotate the order of the loops so load changes on the
machine affect all of them alike; the table shows the median steps/s over rounds. Memory: on CPU the peak resident
set size during one warm-up and one step (``VmHWM`` after resetting it) and its growth over the resident size after
setup, from an extra short run per loop in which glibc hands freed blocks of 128 KiB or more back to the system (so
the resident size follows the live tensors); on CUDA ``max_memory_allocated`` and its growth over
``memory_allocated`` after setup, from the timed runs. JSON goes to ``bench/results/``.
"""
import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench_inference import SD15_UNET, setup_host as setup_comfyui  # bench/ is this script's folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK = "comfyui_ctrlora"

SD15_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
            "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
SD15_CLIP = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
             "projection_dim": 768}
HALF = 2  # GroupNorm's 32 groups need widths divisible by 32: SD1.5 / 2 is the narrowest exact scale-down
SIZES = {
    # unet config, vae ddconfig (None: the tests' tiny VAE), clip config, resolution, rank, batch
    "tiny": (None, None, {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                          "num_hidden_layers": 1, "projection_dim": 32}, 32, 8, 4),
    "sd15-half": (
        {**SD15_UNET, "model_channels": 320 // HALF, "context_dim": 768 // HALF},
        {**SD15_VAE, "ch": 128 // HALF},
        {"hidden_size": 768 // HALF, "intermediate_size": 3072 // HALF, "num_attention_heads": 12 // HALF,
         "num_hidden_layers": 12, "projection_dim": 768 // HALF},
        256, 128 // HALF, 1),
    "sd15": (SD15_UNET, SD15_VAE, SD15_CLIP, 512, 128, 1),
}
TEMPLATE = "a 3D dental model of {jaw} teeth, {view} view, with professional lighting, high quality"
LOOPS = {
    "naive": "naive: fp32, re-encode every step",
    "official": "official recipe: naive + gradient checkpointing",
    "ours": "ours: encode once{precision}",
    "ours-ckpt": "ours + gradient checkpointing",
    "ours-bf16": "ours, bf16 autocast on the CPU",
}
NAIVE = ("naive", "official")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default=None, help="comma-separated: tiny, sd15-half, sd15 "
                                                "(default: tiny,sd15-half on CPU, sd15 on CUDA)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default by size)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default by size)")
    p.add_argument("--rounds", type=int, default=None, help="rounds over all loops (default by size)")
    p.add_argument("--pairs", type=int, default=None, help="synthetic pairs in the dataset (default by size; a "
                                                            "step uses batch-size pairs, so this only sets setup time)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cpu-bf16", action="store_true", help="also time bf16 autocast on the CPU")
    p.add_argument("--no-checkpointing", action="store_true", help="skip the gradient-checkpointing loop")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- the worker: one loop, one process ------------------------------------------------------------------------------

def setup_host(device):
    """The inference benchmark's host setup (ComfyUI on sys.path, CPU mode unless CUDA, the pack imported as
    ComfyUI does), plus the test suite's tiny models on sys.path."""
    pack = setup_comfyui(device)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    return pack


def init_(module, seed):
    """Seeded fan-in-scaled weights (ComfyUI's layers leave them uninitialised); norms at 1, biases at 0."""
    import torch
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype)
                        / math.sqrt(p[0].numel()))
            else:
                p.zero_()
        for sub in module.modules():
            if isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and sub.weight is not None:
                sub.weight.fill_(1)
    return module


def build_models(size, folder):
    import safetensors.torch
    import torch

    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import tiny

    pack = sys.modules[PACK]
    unet_config, vae_config, clip_config, _, _, _ = SIZES[size]
    if unet_config is None:
        model = tiny.tiny_model()
        vae = tiny.tiny_vae()
        base_path = os.path.join(tiny.GOLDEN, "base.ckpt")
    else:
        config = comfy.supported_models.SD15(unet_config)
        config.set_inference_dtype(comfy.model_management.unet_dtype(
            model_params=-1, supported_dtypes=[torch.float16, torch.bfloat16, torch.float32]), None)
        inner = config.get_model({})
        init_(inner.diffusion_model, 0)
        device = comfy.model_management.get_torch_device()
        model = comfy.model_patcher.ModelPatcher(inner, load_device=device,
                                                 offload_device=comfy.model_management.unet_offload_device())
        vae = comfy.sd.VAE(sd={}, config={"params": {"embed_dim": 4, "ddconfig": vae_config}})
        init_(vae.first_stage_model, 1)
        base_path = os.path.join(folder, "base.safetensors")
        if not os.path.exists(base_path):
            encoder = {k: v.float().contiguous() for k, v in inner.diffusion_model.state_dict().items()
                       if k.split(".")[0] in ("input_blocks", "middle_block", "time_embed")}
            safetensors.torch.save_file({"control_model." + k: v for k, v in encoder.items()}, base_path)
    clip = comfy.sd.CLIP(comfy.supported_models.SD15({}).clip_target(),
                         model_options={"clip_l_model_config": clip_config})
    init_(clip.cond_stage_model, 2)
    base = pack.ctrlora_core.load_base(base_path)
    return model, vae, clip, base


def write_dataset(folder, count, resolution):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for sub in ("source", "target"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for i in range(count):
        name = f"{('upper', 'lower')[i % 2]}_{('front', 'left', 'right')[i % 3]}_{i:04d}.png"
        cells = rng.integers(0, 2, (8, 8)).repeat(resolution // 8, 0).repeat(resolution // 8, 1).astype(bool)
        condition = np.where(cells[..., None], 255, 0).astype(np.uint8).repeat(3, 2)
        target = (rng.random((resolution, resolution, 3)) * 255).astype(np.uint8)
        Image.fromarray(condition).save(os.path.join(folder, "source", name))
        Image.fromarray(target).save(os.path.join(folder, "target", name))


def naive_trainer_class(training):
    import torch

    class NaiveTrainer(training.Trainer):
        """The official recipe's data path: VAE and CLIP encode every batch at every step, fp32."""

        def prepare(self):
            super().prepare()
            pairs, report = training.scan(self.dataset_folder, self.template)
            self.images = [training.dataset.load_pair(p, self.config.resolution, report) for p in pairs]
            self.prompts = [p.prompt for p in pairs]
            return self

        def make_batch(self, ids, dropped, timesteps, noise):
            with torch.no_grad():
                condition = torch.stack([self.images[i][0] for i in ids.tolist()])
                target = torch.stack([self.images[i][1] for i in ids.tolist()])
                hint, x0 = training.encode_images(self.vae, self.model.model.latent_format, condition, target)
                prompts = ["" if d else self.prompts[i] for i, d in zip(ids.tolist(), dropped.tolist())]
                context = torch.cat([self.encode_prompt(p) for p in prompts]).float()
            device = self.device
            return {"hint": hint.to(device), "x0": x0.to(device), "context": context.to(device),
                    "timesteps": timesteps.to(device), "noise": noise.to(device)}

    return NaiveTrainer


class Memory:
    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device == "cuda"

    @staticmethod
    def _status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def reset(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.baseline = self.torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (peak RSS) to the current RSS
            self.baseline = self._status("VmRSS")

    def peak(self):
        if self.cuda:
            return self.torch.cuda.max_memory_allocated()
        return self._status("VmHWM")


def worker(args):
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    setup_host(device)
    import importlib
    training = importlib.import_module(f"{PACK}.training")
    import comfy.model_management

    size, loop = args.worker.split(":")
    _, _, _, resolution, rank, batch = SIZES[size]
    data_folder = os.path.join(args.data, size)
    model, vae, clip, base = build_models(size, args.data)
    config = training.TrainConfig(rank=rank, steps=10 ** 6, batch_size=batch, lr=1e-5, resolution=resolution,
                                  save_every=0, gradient_checkpointing=loop in ("official", "ours-ckpt"),
                                  precision="fp32" if loop in NAIVE else "bf16" if loop == "ours-bf16" else "auto")
    cls = naive_trainer_class(training) if loop in NAIVE else training.Trainer
    out = tempfile.mkdtemp(dir=args.data)
    trainer = cls(model, base, vae, training.clip_prompt_encoder(clip), data_folder, out, "bench", config,
                  template=TEMPLATE, reporter=training.ComfyReporter(output="bench", min_interval=1e9,
                                                                     log_every_s=1e9))
    started = time.perf_counter()
    trainer.prepare()
    prepare_s = time.perf_counter() - started
    memory = Memory(torch, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.enable_grad(), trainer.checkpointing():
        memory.reset()
        for _ in range(args.warmup):
            trainer.train_step()
        sync()
        started = time.perf_counter()
        losses = [trainer.train_step() for _ in range(args.steps)]
        sync()
        elapsed = time.perf_counter() - started
    print(json.dumps({
        "size": size, "loop": loop, "steps_per_s": args.steps / elapsed, "prepare_s": prepare_s,
        "peak_bytes": memory.peak(), "baseline_bytes": memory.baseline, "final_loss": losses[-1],
        "dtype": str(trainer.dtype).replace("torch.", ""), "unet_dtype": str(trainer.objective.unet_dtype),
        "device": str(comfy.model_management.get_torch_device()), "threads": torch.get_num_threads(),
    }))


# --- the driver -----------------------------------------------------------------------------------------------------

def run_worker(args, size, loop, data, memory=False):
    """One loop in a fresh process. ``memory``: a short run for the CPU memory columns, with glibc returning every
    block of 128 KiB or more to the system when freed, so that the peak RSS follows the live tensors (too slow
    for the timing runs)."""
    steps, warmup = (1, 1) if memory else (args.steps_for[size], args.warmup_for[size])
    command = [sys.executable, os.path.abspath(__file__), "--worker", f"{size}:{loop}", "--data", data,
               "--device", args.device, "--steps", str(steps), "--warmup", str(warmup)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)} if memory else None
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"worker {size}:{loop} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(n):
    return f"{n / 2 ** 20:,.0f}"


def main(argv=None):
    args = parse_args(argv)
    if args.device is None:
        try:
            import torch
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            args.device = "cpu"
    if args.worker:
        return worker(args)
    sizes = (args.size or ("sd15" if args.device == "cuda" else "tiny,sd15-half")).split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"unknown size(s) {unknown}; choose from {sorted(SIZES)}")
    loops = ["naive", "official", "ours"] + ([] if args.no_checkpointing else ["ours-ckpt"]) + \
        (["ours-bf16"] if args.cpu_bf16 and args.device == "cpu" else [])
    args.steps_for = {s: args.steps or {"tiny": 15, "sd15-half": 2, "sd15": 20}[s] for s in sizes}
    pairs = {s: args.pairs or {"tiny": 16, "sd15-half": 4, "sd15": 8}[s] for s in sizes}
    args.warmup_for = {s: args.warmup if args.warmup is not None else {"tiny": 2, "sd15-half": 1, "sd15": 3}[s]
                       for s in sizes}
    rounds = {s: args.rounds or {"tiny": 2, "sd15-half": 1, "sd15": 3}[s] for s in sizes}

    data = tempfile.mkdtemp(prefix="ctrlora-bench-train-")
    results = []
    try:
        for size in sizes:
            write_dataset(os.path.join(data, size), pairs[size], SIZES[size][3])
            for r in range(rounds[size]):
                order = loops[r % len(loops):] + loops[:r % len(loops)]
                for loop in order:
                    result = run_worker(args, size, loop, data)
                    result["round"] = r
                    results.append(result)
                    print(f"  {size} round {r + 1}/{rounds[size]} {loop:10s} {result['steps_per_s']:.3f} steps/s",
                          file=sys.stderr)
            if args.device == "cpu":
                for loop in loops:
                    memory = run_worker(args, size, loop, data, memory=True)
                    for result in results:
                        if result["size"] == size and result["loop"] == loop:
                            result.update(peak_bytes=memory["peak_bytes"], baseline_bytes=memory["baseline_bytes"])
    finally:
        shutil.rmtree(data, ignore_errors=True)
    report(args, sizes, loops, results)


def report(args, sizes, loops, results):
    lines = [f"Train CtrLoRA benchmark - {platform.processor() or platform.machine()}, device {args.device}, "
             f"threads {results[0]['threads']}; median steps/s over rounds", ""]
    summary = {}
    for size in sizes:
        _, _, _, resolution, rank, batch = SIZES[size]
        rows = {loop: [r for r in results if r["size"] == size and r["loop"] == loop] for loop in loops}
        speed = {loop: statistics.median(r["steps_per_s"] for r in rs) for loop, rs in rows.items()}
        lines += [f"### {size}: {resolution} px, rank {rank}, batch {batch}, {args.steps_for[size]} timed steps, "
                  f"{len(rows[loops[0]])} round(s)",
                  "", "| loop | steps/s | x naive | x official | peak memory (MiB) | growth during steps (MiB) "
                  "| setup (s) |", "|---|---|---|---|---|---|---|"]
        for loop, rs in rows.items():
            peak = max(r["peak_bytes"] for r in rs)
            growth = max(r["peak_bytes"] - r["baseline_bytes"] for r in rs)
            precision = "" if rs[0]["dtype"] == "float32" else f", {rs[0]['dtype']} autocast"
            name = LOOPS[loop].format(precision=precision)
            lines.append(f"| {name} | {speed[loop]:.3f} | {speed[loop] / speed['naive']:.2f} | "
                         f"{speed[loop] / speed['official']:.2f} | {mib(peak)} | {mib(growth)} | "
                         f"{statistics.median(r['prepare_s'] for r in rs):.1f} |")
        lines.append("")
        summary[size] = {loop: {"steps_per_s": speed[loop], "x_naive": speed[loop] / speed["naive"],
                                "x_official": speed[loop] / speed["official"]} for loop in loops}
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(ROOT, "bench", "results", f"training-{args.device}-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items() if not k.endswith("_for")}, "steps": args.steps_for,
                   "warmup": args.warmup_for,
                   "summary": summary, "results": results, "table": text}, f, indent=1)
    print(f"(JSON: {os.path.relpath(path, ROOT)})")


if __name__ == "__main__":
    main()
