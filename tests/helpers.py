"""Drives the nodes the way a workflow does, and runs a control's get_control as the sampler does."""
import torch

from conftest import pack

nodes = pack.nodes.inference


def load_lora(base, lora_name):
    """Load CtrLoRA's condition output (the node also returns a UI description of the file)."""
    return nodes.LoadCtrLoRA().load(base, lora_name)["result"][0]


def load_condition(base_name, lora_name):
    (base,) = nodes.LoadBaseControlNet().load(base_name)
    return load_lora(base, lora_name)


def apply(positive, negative, condition, latent, strength=1.0, start=0.0, end=1.0):
    return nodes.ApplyCtrLoRA().apply(positive, negative, condition, {"samples": latent}, strength, start, end)


def control_outputs(conditioning, model, sigmas, context, x=None, batched_number=1):
    """The control list the UNet receives for ``conditioning`` at ``sigmas`` (None when no control runs)."""
    control = conditioning[0][1].get("control")
    if control is None:
        return None
    base_model = model.model
    control.pre_run(base_model, lambda p: base_model.model_sampling.percent_to_sigma(p))
    if x is None:
        x = torch.zeros(context.shape[0], 4, 16, 16)
    try:
        with torch.no_grad():
            out = control.get_control(x, sigmas, {"c_crossattn": context}, batched_number, {})
    finally:
        control.cleanup()
    return None if out is None else out["output"] + out["middle"]


def sigmas_for(model, timesteps):
    return model.model.model_sampling.sigma(timesteps.float())


def write_lora(base, path, seed, rank=4, metadata=None):
    """A condition LoRA file with random nonzero weights for ``base``, in the official layout (``metadata``: the
    safetensors metadata, as the trainer writes)."""
    generator = torch.Generator().manual_seed(seed)
    adapter = pack.ctrlora_core.ConditionAdapter.fresh(base.model, rank, generator)
    with torch.no_grad():
        for t in adapter.tensors:
            t.add_(0.1 * torch.randn(t.shape, generator=generator))
    pack.ctrlora_core.checkpoint.save_lora_file(adapter.file_tensors(), str(path), metadata)
    return path
