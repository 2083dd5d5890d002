"""Training new CtrLoRA conditions: datasets, the encode-once cache, the training loop and its resumable state.

Knows nothing of node schemas (``nodes/training.py`` is the node); uses ComfyUI's progress bar, cancel and events.
"""
from .dataset import DatasetReport, Pair, PromptTemplate, load_image, scan
from .encode import EncodedDataset, clip_prompt_encoder, encode_dataset, encode_images
from .loop import TrainConfig, Trainer, TrainResult
from .objective import NoisePrediction
from .progress import EVENT, ComfyReporter

__all__ = [
    "EVENT", "ComfyReporter", "DatasetReport", "EncodedDataset", "NoisePrediction", "Pair", "PromptTemplate",
    "TrainConfig", "TrainResult", "Trainer", "clip_prompt_encoder", "encode_dataset", "encode_images", "load_image",
    "scan",
]
