#!/usr/bin/env python
"""Inference benchmark: one sampling step with Apply CtrLoRA vs ComfyUI's native ControlNet of the same size.

    .venv/bin/python bench/bench_inference.py [--size tiny|sd15] [--resolution N] [--steps N] [--device cpu|cuda]

Everything is built in-process with random weights (nothing is downloaded):

* an SD UNet (``--size sd15``: the SD1.5 config, 860M parameters; ``--size tiny``: the same layout at 64 channels,
  for quick CPU runs) as a ComfyUI MODEL (``supported_models_base.BASE`` subclass + ``ModelPatcher``);
* ComfyUI's native ControlNet of the same size: ``comfy.cldm.cldm.ControlNet`` (hint_channels 3) wrapped in
  ``comfy.controlnet.ControlNet``, applied as ``ControlNetApplyAdvanced`` does (``copy().set_cond_hint(image,
  strength, (start, end))`` + ``set_previous_controlnet``);
* a CtrLoRA base file (the same network without ``input_hint_block``, official key layout) and 3 condition LoRA
  files (rank 128 at SD1.5 size, nonzero ``up`` weights, own zero convs and norms) written to a temporary folder,
  loaded through the pack's loaders (``load_base``, ``load_condition``) and applied with ``apply_control`` as the
  Apply CtrLoRA node does; N conditions share one loaded base.

"One sampling step" is one call of the sampler's model function inside ComfyUI's real sampling path
(``comfy.samplers.sample`` -> ``CFGGuider`` -> ``sampling_function``): cond + uncond batched with cfg, every
control's ``get_control`` and the UNet. A custom ``KSAMPLER`` makes one untimed call first (it prepares the hint for
the latent size) and then times ``--steps`` calls; model loading and ``pre_run`` happen before it, outside the
timing. Configurations run in interleaved rounds (the order rotates each round) so drift affects all of them alike.

Memory: bytes of unique tensor storage (each storage counted once by ``data_ptr``) held by the base + N conditions
vs N native ControlNets (one per condition file); on CUDA also ``torch.cuda.memory_allocated`` at the start of
sampling and ``max_memory_allocated`` during it, per configuration, each measured after unloading all models.

Prints a markdown table and writes JSON to ``bench/results/``.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# SD1.5's UNet (what comfy.model_detection reports for an SD1.5 checkpoint).
SD15_UNET = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1,
    "context_dim": 768, "use_linear_in_transformer": False, "adm_in_channels": None,
    "use_spatial_transformer": True, "legacy": False, "use_checkpoint": False,
    "use_temporal_attention": False, "use_temporal_resblock": False, "num_heads": 8, "num_head_channels": -1,
}
# The same layout (4 levels, 2 res blocks, attention at 3 levels) at a fifth of the width, for quick CPU runs.
TINY_UNET = {**SD15_UNET, "model_channels": 64, "context_dim": 128, "num_heads": 4}
SIZES = {
    # unet config, default LoRA rank, text tokens
    "sd15": (SD15_UNET, 128, 77),
    "tiny": (TINY_UNET, 32, 77),
}
CONDITIONS = 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--resolution", type=int, default=None,
                   help="image size in pixels, latent = resolution / 8 (default: 512 on cuda, 256 on cpu)")
    p.add_argument("--steps", type=int, default=4, help="timed sampling steps per configuration and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all configurations")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: 128 for sd15, 32 for tiny)")
    p.add_argument("--batch", type=int, default=1, help="latent batch size (cfg doubles it)")
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-native-multi", action="store_true",
                   help="skip timing 2 and 3 chained native ControlNets (saves time on CPU)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one step of native x1 and CtrLoRA x1 with torch.profiler and print the top ops")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/inference_<...>.json)")
    return p.parse_args(argv)


def setup_host(device):
    """ComfyUI on sys.path (CPU mode unless CUDA is wanted) and the pack imported as ComfyUI would."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import comfy_host
    return comfy_host.start(cpu=device == "cpu")


# --------------------------------------------------------------------------------------------------- model building

def fill_random_(module, seed):
    """ComfyUI's layers leave weights uninitialised: give every tensor finite, well-scaled random values."""
    import torch
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                values = torch.randn(p.shape, generator=generator) / fan_in ** 0.5
            elif "norm" in name and name.endswith("weight"):
                values = 1 + 0.1 * torch.randn(p.shape, generator=generator)
            else:
                values = 0.02 * torch.randn(p.shape, generator=generator)
            p.copy_(values.to(p.dtype))
    return module


def build_unet(unet_config, seed):
    """A ComfyUI MODEL (ModelPatcher) with the SD1.5 latent format and the dtype ComfyUI's loader would choose."""
    import torch
    import comfy.latent_formats
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models_base

    heads = unet_config["num_heads"]

    class BenchSD(comfy.supported_models_base.BASE):
        unet_config = {}
        unet_extra_config = {"num_heads": heads, "num_head_channels": -1}
        latent_format = comfy.latent_formats.SD15

    config = BenchSD(dict(unet_config))
    load_device = mm.get_torch_device()
    # As comfy.sd.load_state_dict_guess_config does for an fp16 SD1.5 checkpoint.
    dtype = mm.unet_dtype(model_params=-1, supported_dtypes=config.supported_inference_dtypes,
                          weight_dtype=torch.float16)
    manual_cast = mm.unet_manual_cast(dtype, load_device, config.supported_inference_dtypes)
    config.set_inference_dtype(dtype, manual_cast)
    model = config.get_model({})
    fill_random_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device,
                                            offload_device=mm.unet_offload_device())


def build_native_controlnet(unet_config, seed):
    """ComfyUI's ControlNet of the same size, set up as comfy.controlnet.load_controlnet_state_dict does."""
    import torch
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management as mm
    import comfy.ops
    import comfy.supported_models

    load_device = mm.get_torch_device()
    supported = comfy.supported_models.SD15.supported_inference_dtypes
    dtype = mm.unet_dtype(model_params=-1, supported_dtypes=supported, weight_dtype=torch.float32)
    manual_cast = mm.unet_manual_cast(dtype, load_device)
    config = {k: v for k, v in unet_config.items() if k != "out_channels"}
    control_model = comfy.cldm.cldm.ControlNet(hint_channels=3, dtype=dtype, device=mm.unet_offload_device(),
                                               operations=comfy.ops.pick_operations(dtype, manual_cast), **config)
    fill_random_(control_model, seed)
    return comfy.controlnet.ControlNet(control_model, load_device=load_device, manual_cast_dtype=manual_cast)


def write_ctrlora_files(pack, native, folder, rank, seed):
    """The base file (the native network minus its hint block, official keys) and 3 condition LoRA files.

    Returns (base_path, [lora_paths]). The LoRA files are made with ConditionAdapter.fresh on the loaded base and
    then given nonzero ``up`` weights and their own zero convs / norms, so the LoRA maths runs as in a trained file.
    """
    import safetensors.torch
    import torch

    core = pack.ctrlora_core
    prefix = core.checkpoint.PREFIX
    base_sd = {prefix + k: v.detach().to("cpu", torch.float32).contiguous()
               for k, v in native.control_model.state_dict().items() if not k.startswith("input_hint_block.")}
    base_path = os.path.join(folder, "bench_base.safetensors")
    safetensors.torch.save_file(base_sd, base_path)
    del base_sd
    # Only to derive the LoRA key layout: a meta-device copy of the base (no memory).
    meta = {k: torch.empty(v.shape, device="meta")
            for k, v in native.control_model.state_dict().items() if not k.startswith("input_hint_block.")}
    import comfy.ops
    layout = core.model.build_from_state_dict(meta, torch.float32, "meta", comfy.ops.disable_weight_init, "layout")
    lora_paths = []
    for i in range(CONDITIONS):
        generator = torch.Generator().manual_seed(seed + 100 + i)
        names = core.lora.binding_names(layout)
        tensors = {}
        for name in names:
            module, _, attr = name.rpartition(".")
            if attr in ("lora_down", "lora_up"):
                linear = layout.get_submodule(module)
                shape = (rank, linear.in_features) if attr == "lora_down" else (linear.out_features, rank)
                # Official init for down (N(0, 1/rank)); up as after training: small but nonzero.
                scale = 1 / rank if attr == "lora_down" else 0.02
                tensors[name] = scale * torch.randn(shape, generator=generator)
            else:
                shape = tuple(layout.get_parameter(name).shape)
                if "norm" in name and name.endswith("weight"):
                    tensors[name] = 1 + 0.1 * torch.randn(shape, generator=generator)
                elif len(shape) >= 2:
                    tensors[name] = torch.randn(shape, generator=generator) / (torch.Size(shape[1:]).numel() ** 0.5)
                else:
                    tensors[name] = 0.02 * torch.randn(shape, generator=generator)
        adapter = core.ConditionAdapter(tensors, rank)
        path = os.path.join(folder, f"bench_condition{i}_rank{rank}.safetensors")
        core.checkpoint.save_lora_file(adapter.file_tensors(), path)
        lora_paths.append(path)
    return base_path, lora_paths


def check_sd15_layout(pack, base, condition, rank):
    """At full size, the files must have exactly the official SD1.5 keys and shapes (golden manifest)."""
    manifest = json.load(open(os.path.join(ROOT, "tests", "data", "sd15_key_manifest.json")))
    strip = lambda keys: {k[len("control_model."):]: tuple(v) for k, v in keys.items()}  # noqa: E731
    base_keys = strip(manifest["base_controlnet"]["keys_core_plus_zero_convs_and_norms"])
    actual = {k: tuple(v.shape) for k, v in base.model.state_dict().items()}
    assert actual == base_keys, "the benchmark's SD1.5 base does not have the official key layout"
    if rank == 128:
        lora_keys = strip(manifest["lora_file_rank128"]["keys"])
        actual = {k: tuple(v.shape) for k, v in condition.adapter.file_tensors().items()}
        assert actual == lora_keys, "the benchmark's rank-128 LoRA does not have the official key layout"


# --------------------------------------------------------------------------------------------------- measurements

def unique_storage_bytes(tensors, seen):
    """Bytes of the storages behind ``tensors`` not yet in ``seen`` (each storage counted once)."""
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def module_tensors(module):
    return list(module.parameters()) + list(module.buffers())


def make_timed_sampler(record, steps, sync, cuda):
    """A KSAMPLER whose sampler function calls the model once untimed, then ``steps`` times timed.

    The model it gets is ComfyUI's full model function (KSamplerX0Inpaint -> CFGGuider -> sampling_function):
    cond + uncond, get_control of the chain, UNet, cfg. x stays fixed (random weights would only drift).
    """
    import torch
    import comfy.samplers

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        s_in = x.new_ones([x.shape[0]])
        if cuda:
            record["allocated_at_start"] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        out = model(x, sigmas[0] * s_in, **extra_args)  # first step: hint preparation, lazy inits
        record["finite"] = bool(torch.isfinite(out).all())
        times = []
        for i in range(steps):
            sigma = sigmas[i % (len(sigmas) - 1)]
            sync()
            start = time.perf_counter()
            model(x, sigma * s_in, **extra_args)
            sync()
            times.append(time.perf_counter() - start)
        if cuda:
            record["peak_allocated"] = torch.cuda.max_memory_allocated()
        record["times"] = times
        return x

    return comfy.samplers.KSAMPLER(sample)


def run_session(model, positive, negative, latent_shape, steps, cfg, seed, sync, cuda):
    """One sampling run through comfy.samplers.sample; returns what the timed sampler recorded."""
    import torch
    import comfy.samplers

    record = {}
    sampler = make_timed_sampler(record, steps, sync, cuda)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 20).cpu()
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latent_shape, generator=generator)
    latent = torch.zeros(latent_shape)
    comfy.samplers.sample(model, noise, positive, negative, cfg, model.load_device, sampler, sigmas,
                          latent_image=latent, disable_pbar=True, seed=seed)
    return record


def profile_step(name, model, positive, negative, latent_shape, cfg, seed, sync, cuda, rows=25):
    """One profiled sampling step (after a warm-up step), top ops by self time."""
    import torch
    import comfy.samplers

    result = {}

    def sample(m, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        s_in = x.new_ones([x.shape[0]])
        m(x, sigmas[0] * s_in, **extra_args)
        m(x, sigmas[1] * s_in, **extra_args)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            m(x, sigmas[2] * s_in, **extra_args)
            sync()
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        result["table"] = prof.key_averages().table(sort_by=key, row_limit=rows)
        return x

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 20).cpu()
    noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed))
    comfy.samplers.sample(model, noise, positive, negative, cfg, model.load_device, comfy.samplers.KSAMPLER(sample),
                          sigmas, latent_image=torch.zeros(latent_shape), disable_pbar=True, seed=seed)
    print(f"\n### torch.profiler: one step, {name}\n")
    print(result["table"])


# --------------------------------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    import torch
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available.")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    pack = setup_host(args.device)
    import comfy.controlnet
    import comfy.model_management as mm
    core = pack.ctrlora_core

    unet_config, default_rank, tokens = SIZES[args.size]
    rank = args.rank or default_rank
    if args.resolution is None:
        args.resolution = 512 if cuda else 256
    if args.resolution % 8:
        sys.exit("--resolution must be a multiple of 8.")
    latent_shape = (args.batch, 4, args.resolution // 8, args.resolution // 8)

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    log(f"building random-weight models ({args.size}, rank {rank}) ...")
    unet = build_unet(unet_config, args.seed)
    native = build_native_controlnet(unet_config, args.seed + 1)
    tmp = tempfile.TemporaryDirectory(prefix="ctrlora_bench_")
    base_path, lora_paths = write_ctrlora_files(pack, native, tmp.name, rank, args.seed)
    base = core.load_base(base_path)  # as the Load Base ControlNet node
    conditions = [core.load_condition(base, p) for p in lora_paths]  # as the Load CtrLoRA node
    if args.size == "sd15":
        check_sd15_layout(pack, base, conditions[0], rank)
    file_bytes = {"base": os.path.getsize(base_path), "lora": os.path.getsize(lora_paths[0])}
    tmp.cleanup()  # everything is in memory now
    log(f"built in {time.perf_counter() - t0:.1f} s; dtype UNet {unet.model_dtype()}, native {native.control_model.dtype}, "
        f"CtrLoRA base {base.dtype} (compute {base.compute_dtype})")

    generator = torch.Generator().manual_seed(args.seed + 7)
    context_dim = unet_config["context_dim"]
    positive = [[torch.randn(args.batch, tokens, context_dim, generator=generator), {}]]
    negative = [[torch.randn(args.batch, tokens, context_dim, generator=generator), {}]]
    hint_image = torch.rand(1, args.resolution, args.resolution, 3, generator=generator)  # IMAGE, [0, 1]
    hint_latents = [torch.randn(1, 4, *latent_shape[2:], generator=generator) for _ in range(CONDITIONS)]

    def with_native(n):
        """ComfyUI's own Apply ControlNet (Advanced), chained n times (n condition images on one network: the same
        compute as n ControlNet files)."""
        import nodes as comfy_nodes
        pos, neg = positive, negative
        for _ in range(n):
            pos, neg = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, native, hint_image, 1.0, 0.0, 1.0)
        return pos, neg

    def with_ctrlora(n):
        pos, neg = positive, negative
        for i in range(n):  # as the Apply CtrLoRA node, chained
            pos, neg = core.apply_control(pos, neg, conditions[i], hint_latents[i], 1.0, 0.0, 1.0)
        return pos, neg

    configs = {"no control": (positive, negative), "native x1": with_native(1)}
    if not args.no_native_multi:
        configs["native x2"] = with_native(2)
        configs["native x3"] = with_native(3)
    for n in range(1, CONDITIONS + 1):
        configs[f"CtrLoRA x{n}"] = with_ctrlora(n)
    names = list(configs)

    times = {name: [] for name in names}
    round_medians = {name: [] for name in names}
    finite = {}
    with torch.inference_mode():  # as ComfyUI runs nodes
        log("warm-up: one session per configuration ...")
        for name in names:
            record = run_session(unet, *configs[name], latent_shape, 1, args.cfg, args.seed, sync, cuda)
            finite[name] = record["finite"]
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                record = run_session(unet, *configs[name], latent_shape, args.steps, args.cfg, args.seed, sync, cuda)
                times[name] += record["times"]
                round_medians[name].append(statistics.median(record["times"]))
            log(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{n} {1000 * round_medians[n][-1]:.1f}" for n in names) + " ms/step")

        cuda_memory = {}
        if cuda:
            for name in names:
                mm.unload_all_models()
                mm.soft_empty_cache(True)
                record = run_session(unet, *configs[name], latent_shape, 1, args.cfg, args.seed, sync, cuda)
                cuda_memory[name] = {k: record[k] for k in ("allocated_at_start", "peak_allocated")}

        if args.profile:
            profile_step("native x1", unet, *configs["native x1"], latent_shape, args.cfg, args.seed, sync, cuda)
            profile_step("CtrLoRA x1", unet, *configs["CtrLoRA x1"], latent_shape, args.cfg, args.seed, sync, cuda)

    # ---- memory held by the controls (unique storages)
    native_one = unique_storage_bytes(module_tensors(native.control_model), set())
    seen = set()
    base_bytes = unique_storage_bytes(module_tensors(base.model), seen)
    per_condition = [unique_storage_bytes(module_tensors(c.adapter), seen) for c in conditions]
    assert all(c.base is base for c in conditions)
    memory = {"native_one_bytes": native_one, "ctrlora_base_bytes": base_bytes,
              "ctrlora_condition_bytes": per_condition, "file_bytes": file_bytes, "by_n": {}}
    for n in range(1, CONDITIONS + 1):
        seen = set()
        ctrlora_n = unique_storage_bytes(module_tensors(base.model), seen) + sum(
            unique_storage_bytes(module_tensors(c.adapter), seen) for c in conditions[:n])
        memory["by_n"][n] = {"ctrlora_bytes": ctrlora_n, "native_bytes": n * native_one,
                             "ratio": ctrlora_n / (n * native_one)}

    # ---- report
    med = {name: statistics.median(times[name]) for name in names}
    ref_native = med["native x1"]
    ref_none = med["no control"]

    def native_for(name):
        n = int(name[-1]) if name.startswith("CtrLoRA") else None
        key = f"native x{n}" if n else None
        return key if key in med else None

    lo = {name: min(times[name]) for name in names}
    rows = []
    for name in names:
        paired = None
        same_n = native_for(name)
        if same_n:
            # Per round: ratio of the round medians (drift cancels within a round); the median of those.
            paired = statistics.median(a / b for a, b in zip(round_medians[name], round_medians[same_n]))
        rows.append({
            "config": name, "median_ms": 1000 * med[name], "min_ms": 1000 * lo[name],
            "max_ms": 1000 * max(times[name]), "samples": len(times[name]),
            "vs_native_x1": med[name] / ref_native, "vs_native_x1_min": lo[name] / lo["native x1"],
            "vs_no_control": med[name] / ref_none,
            "vs_native_same_n": (med[name] / med[same_n]) if same_n else None,
            "vs_native_same_n_min": (lo[name] / lo[same_n]) if same_n else None,
            "vs_native_same_n_paired": paired,
            "control_ms": 1000 * (med[name] - ref_none),
            "finite": finite[name],
        })

    device_name = torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine())
    header = (f"CtrLoRA inference benchmark: size {args.size}, {args.resolution} px (latent "
              f"{latent_shape[2]}x{latent_shape[3]}), batch {args.batch} x 2 (cfg {args.cfg}), LoRA rank {rank}, "
              f"{args.device} ({device_name}, {torch.get_num_threads()} threads), torch {torch.__version__}, "
              f"dtype {unet.model_dtype()}; {args.rounds} rounds x {args.steps} steps")
    print("\n" + header + "\n")
    print("Ratios: median-based (min-based in brackets). 'control cost' = median minus the no-control median.\n")
    print("| configuration | ms/step median | ms/step min | vs native x1 | vs native, same N "
          "| vs no control | control cost ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        same = "" if row["vs_native_same_n"] is None else \
            f"{row['vs_native_same_n']:.3f}x ({row['vs_native_same_n_min']:.3f}x)"
        print(f"| {row['config']} | {row['median_ms']:.1f} | {row['min_ms']:.1f} "
              f"| {row['vs_native_x1']:.3f}x ({row['vs_native_x1_min']:.3f}x) | {same} "
              f"| {row['vs_no_control']:.3f}x | {row['control_ms']:.1f} |")
    goal = rows[names.index("CtrLoRA x1")]
    print(f"\nGoal 'one condition <= 1.05x native ControlNet': {goal['vs_native_x1']:.3f}x median, "
          f"{goal['vs_native_x1_min']:.3f}x min -> {'met' if goal['vs_native_x1'] <= 1.05 else 'NOT met'}")
    if not all(finite.values()):
        print("warning: non-finite model outputs in: " + ", ".join(n for n, f in finite.items() if not f))

    mib = lambda b: b / 2 ** 20  # noqa: E731
    print(f"\nMemory held by the controls (unique tensor storage; base {mib(base_bytes):.1f} MiB, one condition "
          f"{mib(per_condition[0]):.1f} MiB, one native ControlNet {mib(native_one):.1f} MiB; files: base "
          f"{mib(file_bytes['base']):.1f} MiB, LoRA {mib(file_bytes['lora']):.1f} MiB fp32)\n")
    print("| conditions | CtrLoRA: base + N LoRAs (MiB) | N native ControlNets (MiB) | ratio |")
    print("|---:|---:|---:|---:|")
    for n, m in memory["by_n"].items():
        print(f"| {n} | {mib(m['ctrlora_bytes']):.1f} | {mib(m['native_bytes']):.1f} | {m['ratio']:.3f} |")
    totals = " / ".join(f"{mib(m['ctrlora_bytes']):.0f}" for m in memory["by_n"].values())
    print(f"\nN conditions hold one base: {all(c.base is base for c in conditions)} "
          f"(one base object, counted once: base + N LoRAs = {totals} MiB for N = 1 / 2 / 3)")
    if cuda:
        none = cuda_memory["no control"]
        print("\nCUDA, each configuration loaded alone (after unloading all models); 'controls' = minus no control.\n")
        print("| configuration | allocated at sampling start (MiB) | of it controls | peak during sampling (MiB) "
              "| of it controls |")
        print("|---|---:|---:|---:|---:|")
        for name in names:
            m = cuda_memory[name]
            print(f"| {name} | {mib(m['allocated_at_start']):.1f} "
                  f"| {mib(m['allocated_at_start'] - none['allocated_at_start']):.1f} "
                  f"| {mib(m['peak_allocated']):.1f} | {mib(m['peak_allocated'] - none['peak_allocated']):.1f} |")

    result = {
        "args": vars(args), "header": header, "unet_config": unet_config, "rank": rank,
        "env": {"torch": torch.__version__, "device": args.device, "device_name": device_name,
                "threads": torch.get_num_threads(), "python": platform.python_version(),
                "comfyui": _comfyui_version(), "unet_dtype": str(unet.model_dtype()),
                "native_dtype": str(native.control_model.dtype), "ctrlora_dtype": str(base.dtype)},
        "rows": rows, "times_s": times, "round_medians_s": round_medians,
        "memory": memory, "cuda_memory": cuda_memory,
    }
    out = args.out or os.path.join(ROOT, "bench", "results", "inference_{}_{}_{}px_{}.json".format(
        args.size, args.device, args.resolution, datetime.datetime.now().strftime("%Y%m%d-%H%M%S")))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nJSON: {os.path.relpath(out, ROOT)}")
    return result


def _comfyui_version():
    try:
        import comfyui_version
        return comfyui_version.__version__
    except Exception:
        return None


if __name__ == "__main__":
    main()
