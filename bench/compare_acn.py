"""Faithfulness and memory against ComfyUI-Advanced-ControlNet (ACN), the other ComfyUI route to CtrLoRA.

Runs both packs' CtrLoRA loaders on the official golden set (tests/data/golden_tiny_a) in one process on
the real host and prints, per control output, the relative error against the official outputs, and the
bytes held for N conditions. ACN is not vendored: pass a checkout of it.

    .venv/bin/python bench/compare_acn.py --acn /path/to/ComfyUI-Advanced-ControlNet [--conditions 3]
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _host():
    """The pack, imported into the real host in this process, and the tests' data helpers on sys.path."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import comfy_host
    return comfy_host.start(cpu=True)


def _held_bytes(modules):
    """Bytes of unique tensor storage across ``modules`` (shared storage counted once)."""
    storages = {}
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--acn", required=True, help="a checkout of ComfyUI-Advanced-ControlNet")
    parser.add_argument("--conditions", type=int, default=3)
    args = parser.parse_args()
    ours = _host().ctrlora_core

    import safetensors.torch
    import torch
    import comfy.model_detection
    from tiny import GOLDEN

    sys.path.insert(0, os.path.abspath(args.acn))  # adv_control/ is a namespace package
    from adv_control.control_ctrlora import load_ctrlora

    base_path, lora_path = os.path.join(GOLDEN, "base.ckpt"), os.path.join(GOLDEN, "lora0.ckpt")
    e = safetensors.torch.load_file(os.path.join(GOLDEN, "expected.safetensors"))
    expected = [e[f"out_{i:02d}"] for i in range(5)]
    timesteps = e["timesteps"].float()

    base = ours.load_base(base_path)
    base.model.set_attention_heads({"num_heads": 2, "num_head_channels": -1})
    with torch.no_grad():
        out = ours.load_condition(base, lora_path)(e["hint_0"], timesteps, e["context"])
    ours_outputs = out["output"] + out["middle"]

    # ACN takes the head layout from ComfyUI's model detection, whose default does not fit the tiny golden
    # model: hand it the golden set's 2 heads so that only its LoRA handling is compared.
    detect = comfy.model_detection.model_config_from_unet

    def detect_with_golden_heads(*a, **k):
        config = detect(*a, **k)
        config.unet_config.update(num_heads=2, num_head_channels=-1)
        return config

    comfy.model_detection.model_config_from_unet = detect_with_golden_heads
    acn = load_ctrlora(base_path, lora_path)
    # ACN's LoRA is a set of ModelPatcher patches, applied when ComfyUI loads the control model to sample.
    acn.control_model_wrapped.patch_model()
    with torch.no_grad():
        out = acn.control_model(x=torch.zeros_like(e["hint_0"]), hint=e["hint_0"], timesteps=timesteps,
                                context=e["context"])
    acn_outputs = out["output"] + out["middle"]

    print("Relative error against the official outputs: L2 (||x - ref|| / ||ref||) and max (max|x - ref| / max|ref|).")
    print("| output | official max abs | ours L2 | ours max | ACN L2 | ACN max |")
    print("| --- | --- | --- | --- | --- | --- |")
    for i, ref in enumerate(expected):
        l2 = lambda x: ((x - ref).norm() / ref.norm()).item()  # noqa: E731
        mx = lambda x: ((x - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
        a, b = ours_outputs[i], acn_outputs[i]
        print(f"| out_{i:02d} | {ref.abs().max().item():.3f} | {l2(a):.1e} | {mx(a):.1e} | {l2(b):.3f} | {mx(b):.3f} |")

    n = args.conditions
    ours_conditions = [ours.load_condition(base, lora_path) for _ in range(n)]
    ours_bytes = _held_bytes([base.model] + [c.adapter for c in ours_conditions])
    acn_bytes = _held_bytes([load_ctrlora(base_path, lora_path).control_model for _ in range(n)])
    print(f"\nHeld for {n} conditions: ours {ours_bytes / 1e6:.2f} MB, ACN {acn_bytes / 1e6:.2f} MB "
          f"(ratio {acn_bytes / ours_bytes:.2f}x); one base is {_held_bytes([base.model]) / 1e6:.2f} MB.")


if __name__ == "__main__":
    main()
