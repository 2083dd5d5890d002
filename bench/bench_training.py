#!/usr/bin/env python
"""Training benchmark: steps/s and peak memory of Train CtrLoRA's loop against the official recipe's loop, which
re-encodes every step (same models, same data, same objective, same precision, same memory setting); the memory
estimate the loop reserves from ComfyUI against the measured peak; and the cost of recasting frozen weights.

    .venv/bin/python bench/bench_training.py [--size tiny,small|sd15-half|sd15] [--precision auto|fp32|bf16|fp16]
                                             [--steps N] [--rounds N] [--threads N] [--recast] [--device cpu|cuda]

Loops (all through ``training.Trainer``: the same AdamW, the same objective through ComfyUI's UNet, the same
random draws per step, the same ``--precision``), compared in pairs at the same memory setting:

* ``official``: every step VAE-encodes the batch's targets and condition images and CLIP-encodes its prompts
  (after prompt dropout), as the official recipe does. The images are decoded once and held in memory, so file
  reading is not counted against it. ``ours``: the encode-once cache.
* ``official + checkpointing`` and ``ours + checkpointing``: the same two with gradient checkpointing, which the
  official configs switch on for the UNet and the ControlNet (``use_checkpoint: True`` in
  ``configs/ctrlora_finetune_sd15_rank*.yaml``).

``--recast`` adds, for ``ours`` without checkpointing, the cost of recasting frozen weights at every op against
computing in their storage dtype (the precision rule of ``training/precision.py``): models stored in bf16 and
computed in bf16 (no recast); stored in bf16 and computed in fp32 (ComfyUI's manual cast recasts each weight at
each op); stored in fp32 with bf16 autocast (autocast recasts each frozen weight at each op: only weights that
require grad are cached).

Models are built in-process with seeded random weights (nothing is downloaded):

* ``tiny``: the test suite's tiny SD model, tiny VAE and golden base (32 px), and a real ComfyUI CLIP at width 32;
* ``small``: the tests' small UNet (64 channels, three levels; ``tests/pretrain_models.py``) with the tiny VAE and
  CLIP, 64 px;
* ``sd15-half``: the SD1.5 UNet, VAE and CLIP-L layouts with every width halved (UNet 160 channels, VAE 64, CLIP
  384 x 12 layers), 256 px: the compute shares of VAE, CLIP, UNet and ControlNet stay roughly those of SD1.5;
* ``sd15``: full SD1.5 sizes, 512 px (for a GPU).

The base ControlNet is the golden one for ``tiny`` and otherwise a copy of the UNet's encoder (as the official base
starts), loaded with ``load_base``.

"Setup" is the time to scan and encode the dataset and load the models (for ``ours`` it includes building the
cache, a one-time cost). Each measurement runs in its own process (so peak memory is that loop's alone): setup
(models, data, the cache), ``--warmup`` untimed steps, ``--steps`` timed steps. Rounds rotate the order of the
loops so load changes on the machine affect all of them alike; the table shows the median steps/s over rounds (on
the CPU: steps per CPU second of the process, which a shared machine's load does not distort; with ``--threads 1``
that is the step's own time).
Memory: on CPU the peak resident set size during one warm-up and one step (``VmHWM`` after resetting it) and its
growth over the resident size after setup, from an extra short run per loop in which glibc hands freed blocks of
128 KiB or more back to the system (so the resident size follows the live tensors); on CUDA
``max_memory_allocated`` and its growth over ``memory_allocated`` after setup, from the timed runs. The estimate
is ``training.memory.training_memory_required`` for the run's micro-batch, precision and checkpointing setting:
what the loop asks ComfyUI to keep free beyond the weights; it should cover the growth (ratio >= 1) without
wasting much. JSON goes to ``bench/results/``.
"""
import argparse
import dataclasses
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
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1,
             "projection_dim": 32}
HALF = 2  # GroupNorm's 32 groups need widths divisible by 32: SD1.5 / 2 is the narrowest exact scale-down
SIZES = {
    # unet config (None: the tests' tiny UNet), vae ddconfig (None: the tests' tiny VAE), clip config, resolution,
    # rank, batch
    "tiny": (None, None, TINY_CLIP, 32, 8, 4),
    "small": ("small", None, TINY_CLIP, 64, 16, 2),
    "sd15-half": (
        {**SD15_UNET, "model_channels": 320 // HALF, "context_dim": 768 // HALF},
        {**SD15_VAE, "ch": 128 // HALF},
        {"hidden_size": 768 // HALF, "intermediate_size": 3072 // HALF, "num_attention_heads": 12 // HALF,
         "num_hidden_layers": 12, "projection_dim": 768 // HALF},
        256, 128 // HALF, 1),
    "sd15": (SD15_UNET, SD15_VAE, SD15_CLIP, 512, 128, 1),
}
TEMPLATE = "a 3D dental model of {jaw} teeth, {view} view, with professional lighting, high quality"


@dataclasses.dataclass(frozen=True)
class Loop:
    label: str
    naive: bool = False  # re-encode every step (the official recipe's data path)
    checkpointing: bool = False
    storage: str = None  # models' storage dtype (None: ComfyUI's choice for the device)
    manual_cast: str = None  # "fp32": ComfyUI's manual cast of stored weights at each op; "none": computed as stored
    precision: str = None  # None: --precision


LOOPS = {
    "official": Loop("official recipe: re-encode every step", naive=True),
    "ours": Loop("ours: encode once"),
    "official-ckpt": Loop("official recipe + gradient checkpointing", naive=True, checkpointing=True),
    "ours-ckpt": Loop("ours + gradient checkpointing", checkpointing=True),
    "bf16-own": Loop("stored bf16, computed in bf16 (no recast)", storage="bf16", manual_cast="none",
                     precision="bf16"),
    "bf16-to-fp32": Loop("stored bf16, computed in fp32 (manual cast at every op)", storage="bf16",
                         manual_cast="fp32", precision="fp32"),
    "fp32-to-bf16": Loop("stored fp32, bf16 autocast (recast at every op)", storage="fp32", precision="bf16"),
}
PAIRS = {"ours": "official", "ours-ckpt": "official-ckpt"}  # the same memory setting and precision
RECAST = ("bf16-own", "bf16-to-fp32", "fp32-to-bf16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default=None, help="comma-separated: tiny, small, sd15-half, sd15 "
                                                "(default: tiny,small on CPU, sd15 on CUDA)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="of every compared loop (auto: bf16 or fp16 autocast on CUDA, fp32 on the CPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default by size)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default by size)")
    p.add_argument("--rounds", type=int, default=None, help="rounds over all loops (default by size)")
    p.add_argument("--pairs", type=int, default=None, help="synthetic pairs in the dataset (default by size; a "
                                                            "step uses batch-size pairs, so this only sets setup time)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-checkpointing", action="store_true", help="skip the gradient-checkpointing pair")
    p.add_argument("--recast", action="store_true", help="also time frozen weights recast at every op against "
                                                         "computed in their storage dtype (bf16)")
    p.add_argument("--only-recast", action="store_true", help="only the --recast loops")
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


def build_models(size, folder, loop):
    """MODEL, VAE, CLIP and base of ``size``, stored in ``loop.storage`` (default: ComfyUI's choice for the device)
    and computed as ``loop.manual_cast`` says (default: ComfyUI's choice)."""
    import safetensors.torch
    import torch

    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import pretrain_models
    import tiny

    pack = sys.modules[PACK]
    unet_config, vae_config, clip_config, _, _, _ = SIZES[size]
    device = comfy.model_management.get_torch_device()
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if loop.storage:
        dtype = dtypes[loop.storage]
    elif vae_config is None:
        dtype = torch.float32  # the tests' models, as the tests build them
    else:
        dtype = comfy.model_management.unet_dtype(
            model_params=-1, supported_dtypes=[torch.float16, torch.bfloat16, torch.float32])
    if loop.manual_cast:  # the UNet's and (through ComfyUI's choice) the base's
        cast = dtypes.get(loop.manual_cast)
        comfy.model_management.unet_manual_cast = lambda *args, **kwargs: cast
    if vae_config is None:
        config = tiny.TinySD15(pretrain_models.SMALL_UNET if unet_config == "small" else tiny.TINY_UNET)
        vae = tiny.tiny_vae()
    else:
        config = comfy.supported_models.SD15(unet_config)
        vae = comfy.sd.VAE(sd={}, config={"params": {"embed_dim": 4, "ddconfig": vae_config}})
        init_(vae.first_stage_model, 1)
    config.set_inference_dtype(dtype, comfy.model_management.unet_manual_cast(dtype, device))
    inner = config.get_model({})
    init_(inner.diffusion_model, 0)
    model = comfy.model_patcher.ModelPatcher(inner, load_device=device,
                                             offload_device=comfy.model_management.unet_offload_device())
    if size == "tiny":
        base_path = os.path.join(tiny.GOLDEN, "base.ckpt")
    else:
        base_path = os.path.join(folder, f"{size}-base.safetensors")
        if not os.path.exists(base_path):
            encoder = {k: v.float().contiguous() for k, v in inner.diffusion_model.state_dict().items()
                       if k.split(".")[0] in ("input_blocks", "middle_block", "time_embed")}
            safetensors.torch.save_file({"control_model." + k: v for k, v in encoder.items()}, base_path)
    clip = comfy.sd.CLIP(comfy.supported_models.SD15({}).clip_target(),
                         model_options={"clip_l_model_config": clip_config})
    init_(clip.cond_stage_model, 2)
    base = pack.ctrlora_core.load_base(base_path, dtype=dtype)
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
    training_memory = importlib.import_module(f"{PACK}.training.memory")
    import comfy.model_management

    size, name = args.worker.split(":")
    loop = LOOPS[name]
    _, _, _, resolution, rank, batch = SIZES[size]
    data_folder = os.path.join(args.data, size)
    model, vae, clip, base = build_models(size, args.data, loop)
    config = training.TrainConfig(rank=rank, steps=10 ** 6, batch_size=batch, lr=1e-5, resolution=resolution,
                                  save_every=0, gradient_checkpointing=loop.checkpointing,
                                  precision=loop.precision or args.precision)
    cls = naive_trainer_class(training) if loop.naive else training.Trainer
    out = tempfile.mkdtemp(dir=args.data)
    trainer = cls(model, base, vae, training.clip_prompt_encoder(clip), data_folder, out, "bench", config,
                  template=TEMPLATE, reporter=training.ComfyReporter(output="bench", min_interval=1e9,
                                                                     log_every_s=1e9))
    started = time.perf_counter()
    trainer.prepare()
    prepare_s = time.perf_counter() - started
    started = time.process_time()
    estimate = training_memory.training_memory_required(
        trainer.objective, trainer.base, [batch, *trainer.data.targets.shape[1:]], trainer.precision.compute,
        config.gradient_checkpointing, trainer.adapter)
    estimate_cpu_s = time.process_time() - started
    memory = Memory(torch, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.enable_grad(), trainer.checkpointing():
        memory.reset()
        for _ in range(args.warmup):
            trainer.train_step()
        sync()
        started, cpu_started = time.perf_counter(), time.process_time()
        losses = [trainer.train_step() for _ in range(args.steps)]
        sync()
        elapsed, cpu_elapsed = time.perf_counter() - started, time.process_time() - cpu_started
    print(json.dumps({
        "size": size, "loop": name, "steps_per_s": args.steps / elapsed, "steps_per_cpu_s": args.steps / cpu_elapsed,
        "prepare_s": prepare_s,
        "peak_bytes": memory.peak(), "baseline_bytes": memory.baseline, "final_loss": losses[-1],
        "estimate_bytes": estimate, "estimate_cpu_s": estimate_cpu_s,
        "dtype": str(trainer.precision.compute).replace("torch.", ""), "unet_dtype": str(trainer.objective.unet_dtype),
        "device": str(comfy.model_management.get_torch_device()), "threads": torch.get_num_threads(),
    }))


# --- the driver -----------------------------------------------------------------------------------------------------

def run_worker(args, size, loop, data, memory=False):
    """One loop in a fresh process. ``memory``: a short run for the CPU memory columns, with glibc returning every
    block of 128 KiB or more to the system when freed, so that the peak RSS follows the live tensors (too slow
    for the timing runs)."""
    steps, warmup = (1, 1) if memory else (args.steps_for[size], args.warmup_for[size])
    command = [sys.executable, os.path.abspath(__file__), "--worker", f"{size}:{loop}", "--data", data,
               "--device", args.device, "--steps", str(steps), "--warmup", str(warmup), "--precision", args.precision]
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
    sizes = (args.size or ("sd15" if args.device == "cuda" else "tiny,small")).split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"unknown size(s) {unknown}; choose from {sorted(SIZES)}")
    loops = [] if args.only_recast else \
        ["official", "ours"] + ([] if args.no_checkpointing else ["official-ckpt", "ours-ckpt"])
    loops += list(RECAST) if args.recast or args.only_recast else []
    defaults = {"tiny": (15, 2, 2, 16), "small": (8, 1, 1, 8), "sd15-half": (2, 1, 1, 4), "sd15": (20, 3, 3, 8)}
    args.steps_for = {s: args.steps or defaults[s][0] for s in sizes}
    args.warmup_for = {s: defaults[s][1] if args.warmup is None else args.warmup for s in sizes}
    rounds = {s: args.rounds or defaults[s][2] for s in sizes}
    pairs = {s: args.pairs or defaults[s][3] for s in sizes}

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
                    print(f"  {size} round {r + 1}/{rounds[size]} {loop:13s} {result['steps_per_s']:.3f} steps/s, "
                          f"{result['steps_per_cpu_s']:.3f} per CPU s", file=sys.stderr)
            if args.device == "cpu":
                for loop in (loop for loop in loops if loop not in RECAST):
                    memory = run_worker(args, size, loop, data, memory=True)
                    for result in results:
                        if result["size"] == size and result["loop"] == loop:
                            result.update(peak_bytes=memory["peak_bytes"], baseline_bytes=memory["baseline_bytes"])
    finally:
        shutil.rmtree(data, ignore_errors=True)
    report(args, sizes, loops, results)


def report(args, sizes, loops, results):
    lines = [f"Train CtrLoRA benchmark - {platform.processor() or platform.machine()}, device {args.device}, "
             f"threads {results[0]['threads']}, precision {args.precision}; median over rounds", ""]
    summary = {}
    for size in sizes:
        _, _, _, resolution, rank, batch = SIZES[size]
        rows = {loop: [r for r in results if r["size"] == size and r["loop"] == loop] for loop in loops}
        # On a shared CPU, CPU time is what load does not distort (one thread: it is the step's own time).
        rate = "steps_per_cpu_s" if args.device == "cpu" else "steps_per_s"
        speed = {loop: statistics.median(r[rate] for r in rs) for loop, rs in rows.items()}
        wall = {loop: statistics.median(r["steps_per_s"] for r in rs) for loop, rs in rows.items()}
        summary[size] = {loop: {rate: speed[loop], "steps_per_s": wall[loop]} for loop in loops}
        unit = "steps per CPU s" if args.device == "cpu" else "steps/s"
        lines += [f"### {size}: {resolution} px, rank {rank}, batch {batch}, {args.steps_for[size]} timed steps, "
                  f"{len(rows[loops[0]])} round(s)", ""]
        compared = [loop for loop in loops if loop not in RECAST]
        if compared:
            lines += [f"| loop | compute | {unit} | x official, same memory setting | peak memory (MiB) | growth "
                      "during steps (MiB) | estimate (MiB) | estimate / growth | setup (s) |",
                      "|---|---|---|---|---|---|---|---|---|"]
        for loop in compared:
            rs = rows[loop]
            peak = max(r["peak_bytes"] for r in rs)
            growth = max(r["peak_bytes"] - r["baseline_bytes"] for r in rs)
            estimate = rs[0]["estimate_bytes"]
            versus = f"{speed[loop] / speed[PAIRS[loop]]:.2f}" if PAIRS.get(loop) in speed else ""
            lines.append(f"| {LOOPS[loop].label} | {rs[0]['dtype']} | {speed[loop]:.3f} | {versus} | {mib(peak)} | "
                         f"{mib(growth)} | {mib(estimate)} | {estimate / growth:.2f} | "
                         f"{statistics.median(r['prepare_s'] for r in rs):.1f} |")
            summary[size][loop].update(peak_bytes=peak, growth_bytes=growth, estimate_bytes=estimate,
                                       estimate_cpu_s=rs[0]["estimate_cpu_s"])
            if versus:
                summary[size][loop]["x_official"] = speed[loop] / speed[PAIRS[loop]]
        recast = [loop for loop in loops if loop in RECAST]
        if recast:
            lines += ["", f"| frozen weights (ours, no checkpointing) | {unit} | x computed in their own dtype |",
                      "|---|---|---|"]
            lines += [f"| {LOOPS[loop].label} | {speed[loop]:.3f} | {speed[loop] / speed[RECAST[0]]:.2f} |"
                      for loop in recast]
        if args.device == "cuda" and "ours" in speed and "official" in speed:
            peak = max(r["peak_bytes"] for r in rows["ours"])
            lines += ["", f"Goal (SD1.5, 512 px, batch 1): ours >= 3x official at the same memory setting and "
                          f"peak <= 12 GB: {speed['ours'] / speed['official']:.2f}x, peak {peak / 1e9:.1f} GB"]
        lines.append("")
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
