"""Device memory a training step needs beyond the model weights, for ``load_models_gpu(memory_required=...)``.

ComfyUI's ``memory_required`` of a model is an inference estimate. A training step also keeps every activation
backward needs (through the ControlNet and, for the control it adds, through the frozen UNet's middle and output
blocks), the trained tensors' gradients and AdamW moments, and transients.

The activations are counted, not guessed: ``NoisePrediction.loss`` through the condition runs once at the requested
latent shape on the ``meta`` device (shapes and dtypes, no memory, no compute), with meta stand-ins bound in place
of every weight (``torch.func.functional_call``: the device weights are neither read nor moved), and a
``saved_tensors_hooks`` counts each storage autograd keeps for backward once, weights excluded. A
``TorchFunctionMode`` does what meta tensors cannot: it applies autocast's casts (matmuls and convolutions in the
compute dtype; on CUDA and MPS norms and softmax in fp32), whose copies are saved as the real ones are, and it
replaces the few ops whose meta kernels are slow Python decompositions (linear, addmm, add, mul, group/layer norm,
gelu) by stand-ins that save exactly what those ops save, so the probe costs about 0.15 s of CPU at SD1.5 size.
ComfyUI's per-op weight patches (LoRAs on a partly loaded model) change values, not shapes: set aside meanwhile.

Attention is counted as ComfyUI computes it (``comfy.ldm.modules.attention.optimized_attention``): its chunked
implementations (``sub_quad``, ``split``, ``basic``: ComfyUI's choice on the CPU and on Apple MPS) save the
softmax probabilities, heads x tokens x tokens, so their share grows with the square of the latent area; they are
probed as ``attention_basic``, which saves the same tensors. The fused kernels (PyTorch SDPA, ComfyUI's choice on
NVIDIA, and xformers, flash, sage) save only q, k, v, the output and an fp32 log-sum-exp per row.

Gradient checkpointing (``checkpointing.checkpoint_targets``, non-reentrant) keeps the inputs of each checkpointed
block that recorded anything for backward, and what is saved outside those blocks; backward then recomputes one
block at a time, so the largest block's own saved tensors come back once (counted in the margin).
"""
import contextlib
import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import comfy.ldm.modules.attention as comfy_attention

from .checkpointing import checkpoint_targets

CONTEXT_TOKENS = 77  # CLIP's context length: prompts are truncated to it, as the official training does
_FUSED_ATTENTION = ("attention_pytorch", "attention_xformers", "attention_flash", "attention_sage")
# What autocast computes in the lower precision, and (on CUDA and MPS) in fp32, among the ops the models use.
_LOWER_PRECISION_OPS = {F.linear, F.conv1d, F.conv2d, F.conv3d, torch.matmul, torch.Tensor.matmul,
                        torch.Tensor.__matmul__, torch.mm, torch.bmm, torch.baddbmm, torch.addmm, torch.einsum}
_FP32_OPS = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax}


class _Saving(torch.autograd.Function):
    """A stand-in op on meta tensors: returns an empty ``shape``/``dtype`` result and saves for backward the inputs
    at ``saved`` plus new tensors of the ``extra`` (shape, dtype): what the real op saves."""

    @staticmethod
    def forward(ctx, shape, dtype, saved, extra, *inputs):
        first = inputs[0]
        ctx.save_for_backward(*(inputs[i] for i in saved), *(first.new_empty(s, dtype=d) for s, d in extra))
        return first.new_empty(shape, dtype=dtype)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("a memory probe is never run backward")


def _needed(a, b):
    """Indices 0 (a) and 1 (b) of the factors of a product that backward needs: each for the other's gradient."""
    return tuple(i for i, other in ((0, b), (1, a)) if other.requires_grad)


def _linear(x, weight, bias=None):
    inputs = (x, weight) if bias is None else (x, weight, bias)
    return _Saving.apply((*x.shape[:-1], weight.shape[0]), x.dtype, _needed(x, weight), (), *inputs)


def _addmm(bias, m1, m2, **kwargs):
    saved = tuple(i + 1 for i in _needed(m1, m2))
    return _Saving.apply((m1.shape[0], m2.shape[1]), m1.dtype, saved, (), bias, m1, m2)


def _group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    stats = ((x.shape[0], num_groups), x.dtype)
    inputs = [t for t in (x, weight, bias) if t is not None]
    return _Saving.apply(x.shape, x.dtype, (0,), (stats, stats), *inputs)


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    stats = ((*x.shape[:x.dim() - len(normalized_shape)], 1), x.dtype)
    inputs = [t for t in (x, weight, bias) if t is not None]
    return _Saving.apply(x.shape, x.dtype, (0,), (stats, stats), *inputs)


def _gelu(x, approximate="none"):
    return _Saving.apply(x.shape, x.dtype, (0,), (), x)


def _elementwise(saves_other):
    """``a op b`` with broadcasting; a product saves each factor that the other's gradient needs."""
    def op(a, b, **kwargs):
        if not isinstance(a, torch.Tensor):
            a, b = b, a
        if not isinstance(b, torch.Tensor):
            return _Saving.apply(a.shape, torch.result_type(a, b), (), (), a)
        shape = torch.broadcast_shapes(a.shape, b.shape)
        return _Saving.apply(shape, torch.result_type(a, b), _needed(a, b) if saves_other else (), (), a, b)
    return op


# Ops whose meta implementations are Python decompositions (milliseconds each): stand-ins saving the same tensors.
_STAND_INS = {F.linear: _linear, torch.addmm: _addmm, F.group_norm: _group_norm, F.layer_norm: _layer_norm,
              F.gelu: _gelu}
_STAND_INS.update(dict.fromkeys([torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__],
                                _elementwise(False)))
_STAND_INS.update(dict.fromkeys([torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__],
                                _elementwise(True)))


class _MetaMode(TorchFunctionMode):
    """Runs the probe fast on meta tensors, with ``torch.autocast``'s casts (meta tensors know no autocast)."""

    def __init__(self, compute_dtype, device_type):
        super().__init__()
        half = compute_dtype != torch.float32
        self.lower_ops = _LOWER_PRECISION_OPS if half else set()
        self.fp32_ops = _FP32_OPS if half and device_type in ("cuda", "mps") else set()
        self.dtype = compute_dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = self.dtype if func in self.lower_ops else torch.float32 if func in self.fp32_ops else None
        if target is not None:
            def cast(value):
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != target \
                        and value.dtype != torch.float64:
                    return value.to(target)
                return value
            args, kwargs = [cast(a) for a in args], {k: cast(v) for k, v in kwargs.items()}
        return _STAND_INS.get(func, func)(*args, **kwargs)


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel keeps for backward: q, k, v, its output and an fp32 log-sum-exp per row."""

    @staticmethod
    def forward(ctx, q, k, v, heads):
        batch, tokens, inner = q.shape
        out = q.new_empty(batch, heads, tokens, inner // heads)
        ctx.save_for_backward(q, k, v, out, q.new_empty(batch, heads, tokens, dtype=torch.float32))
        return out.transpose(1, 2).reshape(batch, tokens, inner)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("a memory probe is never run backward")


def _fused_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                     **kwargs):
    if skip_reshape or skip_output_reshape:
        raise NotImplementedError("the memory probe takes attention inputs as [batch, tokens, channels]")
    return _FusedAttention.apply(q, k, v, heads)


@contextlib.contextmanager
def _probe_attention():
    """ComfyUI's attention, in a form with the same saved tensors that runs on meta tensors."""
    chosen = comfy_attention.optimized_attention, comfy_attention.optimized_attention_masked
    fused = getattr(chosen[0], "__name__", "") in _FUSED_ATTENTION
    stand_in = _fused_attention if fused else comfy_attention.attention_basic
    comfy_attention.optimized_attention = comfy_attention.optimized_attention_masked = stand_in
    try:
        yield
    finally:
        comfy_attention.optimized_attention, comfy_attention.optimized_attention_masked = chosen


class _SavedTensors:
    """Storages autograd saves during a forward, attributed to the checkpointed block running at the time."""

    def __init__(self, weights):
        self.weights = weights  # storages of weights and trained tensors: on the device anyway
        self.outside = {}  # storage -> bytes, saved outside every checkpointed block
        self.blocks = []  # per block call: (its inputs {storage: bytes}, what it saved {storage: bytes})
        self.active = []
        self.control = 0  # bytes of the control outputs: their gradients wait for the UNet's whole backward
        self.alive = []

    def _entry(self, tensor):
        # Held until the probe ends: a freed storage's address could be reused by a later one, merging two entries.
        self.alive.append(tensor)
        storage = tensor.untyped_storage()
        return storage._cdata, storage.nbytes()

    def pack(self, tensor):
        key, size = self._entry(tensor)
        if key not in self.weights:
            (self.active[-1][1] if self.active else self.outside)[key] = size
        return tensor

    def enter(self, module, args, kwargs):
        inputs = dict(self._entry(t) for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
        self.active.append(({k: n for k, n in inputs.items() if k not in self.weights}, {}))

    def leave(self, module, args, kwargs, output):
        self.blocks.append(self.active.pop())

    def kept(self, checkpointed):
        """Bytes held from the forward until backward."""
        kept = dict(self.outside)
        for inputs, saved in self.blocks:
            if not checkpointed:
                kept.update(saved)
            elif saved:  # a block that recorded nothing for backward leaves no checkpoint behind
                kept.update(inputs)
        return sum(kept.values())

    def largest_block(self):
        return max((sum(saved.values()) for _, saved in self.blocks), default=0)

    def largest_tensor(self):
        return max([*self.outside.values(), *(n for _, saved in self.blocks for n in saved.values())], default=0)


@contextlib.contextmanager
def _without_weight_functions(models):
    """ComfyUI's per-op weight patches (``weight_function``/``bias_function``: LoRAs applied at each op when a model
    is partly loaded) change values, not shapes, and cannot run on meta weights: set aside during the probe."""
    patched = []
    try:
        for model in models:
            for module in model.modules():
                for attr in ("weight_function", "bias_function"):
                    functions = getattr(module, attr, None)
                    if functions:
                        patched.append((module, attr, functions))
                        setattr(module, attr, [])
        yield
    finally:
        for module, attr, functions in patched:
            setattr(module, attr, functions)


@contextlib.contextmanager
def _block_hooks(modules, recorder):
    handles = []
    try:
        for module in modules:
            handles.append(module.register_forward_pre_hook(recorder.enter, with_kwargs=True))
            handles.append(module.register_forward_hook(recorder.leave, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _meta(named_tensors, dtype=None):
    return {name: torch.empty(t.shape, dtype=dtype or t.dtype, device="meta") for name, t in named_tensors}


def _weights(module):
    return _meta([*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)])


def _context_width(unet):
    for name, module in unet.named_modules():
        if name.endswith("attn2") and isinstance(module, comfy_attention.CrossAttention):
            return module.to_k.in_features
    return 1


def _meta_objective(objective, unet_weights):
    """A shallow copy of the objective whose UNet runs on meta weights (its ``loss`` is the real one)."""
    unet = objective.unet
    probe = copy.copy(objective)
    probe.unet = lambda *args, **kwargs: torch.func.functional_call(unet, unet_weights, args, kwargs)
    return probe


def _probe(objective, base, adapter, latent_shape, compute_dtype):
    """Runs the training forward on meta tensors; returns the ``_SavedTensors`` it recorded."""
    unet, control_model = objective.unet, base.model
    unet_weights, control_weights = _weights(unet), _weights(control_model)
    trained = _meta(zip(adapter.names, adapter.tensors), torch.float32)  # fp32 masters, cast per op
    for tensor in trained.values():
        tensor.requires_grad_(True)
    control_weights.update(trained)
    recorder = _SavedTensors({t.untyped_storage()._cdata for t in (*unet_weights.values(), *control_weights.values())})
    batch = latent_shape[0]
    inputs = {name: torch.empty(list(latent_shape), device="meta") for name in ("hint", "x0", "noise")}
    inputs["context"] = torch.empty(batch, CONTEXT_TOKENS, _context_width(unet), device="meta")
    inputs["timesteps"] = torch.zeros(batch, dtype=torch.long, device="meta")

    def condition(hint, timesteps, context):
        control = torch.func.functional_call(control_model, control_weights, (hint, timesteps, context), strict=False)
        recorder.control = sum(t.untyped_storage().nbytes() for t in (*control["middle"], *control["output"]))
        return control

    with torch.inference_mode(False), torch.enable_grad(), _probe_attention(), \
            _without_weight_functions((unet, control_model)), \
            _block_hooks(checkpoint_targets(control_model, unet), recorder), \
            torch.autograd.graph.saved_tensors_hooks(recorder.pack, lambda t: t), \
            _MetaMode(compute_dtype, base.load_device.type):
        _meta_objective(objective, unet_weights).loss(condition, **inputs)
    return recorder


@dataclasses.dataclass(frozen=True)
class TrainingMemory:
    activations: int  # saved for backward, held from the forward until backward
    trained_state: int  # fp32 gradients and two AdamW moments of the trained tensors
    margin: int  # transients: the controls' gradients, one recomputed block, the largest op's gradient and
    # temporaries, AdamW's temporaries

    @property
    def total(self):
        return self.activations + self.trained_state + self.margin


def estimate_training_memory(objective, base, latent_shape, compute_dtype, gradient_checkpointing, adapter):
    """``TrainingMemory`` of one training step; see ``training_memory_required``."""
    saved = _probe(objective, base, adapter, list(latent_shape), compute_dtype)
    trained = sum(t.numel() for t in adapter.tensors) * 4
    recomputed = saved.largest_block() if gradient_checkpointing else 0
    return TrainingMemory(activations=saved.kept(gradient_checkpointing), trained_state=3 * trained,
                          margin=saved.control + recomputed + 2 * saved.largest_tensor() + trained)


def training_memory_required(objective, base, latent_shape, compute_dtype, gradient_checkpointing, adapter):
    """Bytes a training step needs on the device beyond the model weights ComfyUI loads and the trained fp32
    tensors (``adapter``, already on the device): for ``load_models_gpu(memory_required=...)``.

    ``objective``: the ``NoisePrediction``; ``base``: the ``BaseControlNet``; ``latent_shape``: [batch, C, h, w]
    of one micro-batch; ``compute_dtype``: the dtype the step computes in (autocast when not fp32);
    ``gradient_checkpointing``: whether ``checkpointing.gradient_checkpointing`` wraps the step; ``adapter``: the
    ``ConditionAdapter`` being trained. Touches no weight.
    """
    return estimate_training_memory(objective, base, latent_shape, compute_dtype, gradient_checkpointing,
                                    adapter).total
