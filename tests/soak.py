"""The soak run of tests/test_soak.py (tiny models) and bench/bench_soak.py (full size): many prompts through one real
ComfyUI server, three condition LoRAs alternating on two bases, one to three chained conditions, three sizes; what
the server holds is measured after prompt FIRST_CHECK and after the last one.

What ComfyUI holds loaded is read inside the server by the last node of every prompt, the test fixture pack's
``CtrLoRATestLoadedModels`` (``comfy.model_management.current_loaded_models`` and the ModelPatchers alive): the
server has no route that tells, and the pack adds none. Memory is the server process's resident set from /proc
(peak: ``VmHWM``), and on a GPU the device memory in use from ComfyUI's ``/system_stats``.
"""
import dataclasses
import time

FIRST_CHECK = 10


def tiny_models():
    """The models part of a soak prompt: the tests' tiny MODEL, conditionings and VAE (test fixture pack)."""
    return {"nodes": {"models": {"class_type": "CtrLoRATestTinyModels", "inputs": {"seed": 0}}},
            "model": ["models", 0], "positive": ["models", 1], "negative": ["models", 2], "vae": ["models", 3]}


def checkpoint_models(checkpoint):
    """The models part at full size: a checkpoint through Load Checkpoint, prompts through its CLIP."""
    clip = ["checkpoint", 1]
    return {"nodes": {
        "checkpoint": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "positive": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "a house by a lake, photo"}},
        "negative": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "blurry"}},
    }, "model": ["checkpoint", 0], "positive": ["positive", 0], "negative": ["negative", 0], "vae": ["checkpoint", 2]}


def process_memory(pid):
    """Peak and current resident memory of process ``pid`` in bytes (Linux /proc)."""
    found = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                found[key] = int(value.split()[0]) * 1024
    return {"peak_rss": found["VmHWM"], "rss": found["VmRSS"]}


def device_memory(server):
    """Bytes in use on the server's GPU (None on the CPU), as ComfyUI's /system_stats reports it."""
    device = server.get("/system_stats")["devices"][0]
    return device["vram_total"] - device["vram_free"] if device["type"] == "cuda" else None



@dataclasses.dataclass
class Soak:
    models: dict  # tiny_models() or checkpoint_models(...)
    bases: tuple  # 2 base file names in models/ctrlora/
    loras: tuple  # 3 LoRA file names in models/ctrlora/
    sizes: tuple  # 3 sizes in px
    steps: int  # sampling steps

    def prompt(self, index):
        """Prompt ``index``: ``index % 3 + 1`` chained conditions; condition j uses LoRA ``(index + j) % 3`` on base
        ``(index + j) % 2`` with a condition image of ``sizes[(index + j) % 3]`` px; the sample is
        ``sizes[index // 3 % 3]`` px with seed ``index``."""
        models, sizes = self.models, self.sizes
        prompt = dict(models["nodes"])
        positive, negative = models["positive"], models["negative"]
        for j in range(index % 3 + 1):
            base, size = self.bases[(index + j) % len(self.bases)], sizes[(index + j) % len(sizes)]
            prompt[base] = {"class_type": "CtrLoRALoadBase", "inputs": {"base_name": base}}
            prompt[f"lora{j}"] = {"class_type": "CtrLoRALoad",
                                  "inputs": {"base": [base, 0], "lora_name": self.loras[(index + j) % len(self.loras)]}}
            prompt[f"image{j}"] = {"class_type": "EmptyImage", "inputs": {
                "width": size, "height": size, "batch_size": 1, "color": (0x3366CC + 0x102030 * j + index) & 0xFFFFFF}}
            prompt[f"encode{j}"] = {"class_type": "CtrLoRAVAEConditionEncode",
                                    "inputs": {"image": [f"image{j}", 0], "vae": models["vae"]}}
            prompt[f"apply{j}"] = {"class_type": "CtrLoRAApply", "inputs": {
                "positive": positive, "negative": negative, "condition": [f"lora{j}", 0],
                "condition_latent": [f"encode{j}", 0], "strength": 1.0 / (j + 1), "start_percent": 0.0,
                "end_percent": 1.0}}
            positive, negative = [f"apply{j}", 0], [f"apply{j}", 1]
        size = sizes[index // 3 % len(sizes)]
        prompt["latent"] = {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}}
        prompt["sampler"] = {"class_type": "KSampler", "inputs": {
            "model": models["model"], "positive": positive, "negative": negative, "latent_image": ["latent", 0],
            "seed": index, "steps": self.steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}}
        prompt["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": models["vae"]}}
        prompt["loaded"] = {"class_type": "CtrLoRATestLoadedModels", "inputs": {"images": ["decode", 0]}}
        return prompt

    def run(self, server, prompts, timeout):
        """Queues ``prompts`` prompts to ``server`` (a tests/ui_host.UIServer): the first FIRST_CHECK, then the rest,
        each batch at once. Returns a measurement after each batch: {"after": prompts done, "peak_rss", "rss",
        "device_used", "seconds" since the start} and, over the batch's prompts, the most models ComfyUI held loaded
        ("most_loaded"), their kinds ("loaded_kinds": class names) and the most ModelPatchers alive
        ("most_patchers"), and the peak RSS after each prompt so far ("peaks")."""
        checks, peaks = [], []
        started = time.monotonic()
        for first, stop in ((0, FIRST_CHECK), (FIRST_CHECK, prompts)):
            ids = [server.queue(self.prompt(i)) for i in range(first, stop)]
            entries = []
            for prompt_id in ids:
                entries.append(_wait(server, prompt_id, timeout))
                peaks.append(process_memory(server.proc.pid)["peak_rss"])
            failed = [entry["status"] for entry in entries if entry["status"]["status_str"] != "success"]
            if failed:
                raise AssertionError(server.explain(f"{len(failed)} soak prompts failed, the first: {failed[0]}"))
            reports = [entry["outputs"]["loaded"] for entry in entries]
            checks.append({
                "after": stop, **process_memory(server.proc.pid), "device_used": device_memory(server),
                "seconds": time.monotonic() - started,
                "most_loaded": max(len(report["loaded_models"]) for report in reports),
                "loaded_kinds": sorted({kind for report in reports for kind in report["loaded_models"]}),
                "most_patchers": max(report["model_patchers"][0] for report in reports), "peaks": list(peaks)})
        return checks


def _wait(server, prompt_id, timeout):
    """``server.wait``, also through stalls of the server's HTTP loop (over 30 s while full-size files load on a busy
    CPU)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return server.wait(prompt_id, max(deadline - time.monotonic(), 1))
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
