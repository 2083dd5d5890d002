"""What a CtrLoRA-XL condition is, for the UI: as ``info.describe_lora``, and for an adapter embedded in a base file
its name as the condition and its own size."""
from ..catalogue import how_to_make
from ..info import describe_lora


def describe_xl_condition(path, condition, adapter=None):
    """A JSON-ready description of a loaded XL ``condition`` from ``path`` (``adapter``: its embedded name)."""
    info = describe_lora(path, condition.adapter.rank, len(condition.adapter.names))
    if adapter:
        info.update(file=condition.name, condition=adapter,
                    size_bytes=sum(t.numel() * t.element_size() for t in condition.adapter.tensors))
        expects = how_to_make(adapter)
        if expects:
            info["expects"] = expects
    return info
