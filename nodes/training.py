"""The 'Train CtrLoRA' node: a schema over ``training`` (datasets, the loop, resumable state)."""
import folder_paths

from ..training import ComfyReporter, TrainConfig, Trainer, clip_prompt_encoder, paths
from ..training.dataset import PROMPT_FILE
from ..training.loop import RANK_RANGE, RESOLUTION_RANGE
from . import model_folders

CATEGORY = "conditioning/ctrlora"
NO_START = "none (new condition)"


class TrainCtrLoRA:
    DESCRIPTION = (
        "Trains a new CtrLoRA condition on a folder of condition/target pairs (about 1,000 pairs is enough) with the "
        "official recipe, and saves it to models/ctrlora/<output_name>.safetensors. Shows step/total and the loss; "
        "Cancel saves the run, and queueing again with resume on continues it."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SD1.5 checkpoint's model (frozen; the control is trained for it)."}),
                "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP: each distinct prompt is encoded once."}),
                "vae": ("VAE", {"tooltip": "The checkpoint's VAE: hints and targets are encoded once, as at inference."}),
                "base": ("CTRLORA_BASE", {"tooltip": "From Load Base ControlNet (frozen)."}),
                "dataset_folder": ("STRING", {"default": "", "tooltip": (
                    f"A folder with {PROMPT_FILE} (one JSON object per line: source, target, prompt) or with source/ "
                    "and target/ holding images of the same names (optional <name>.txt captions), inside ComfyUI's "
                    "input folder (give its name) or a folder the server allows (CTRLORA_ALLOWED_ROOTS).")}),
                "prompt_template": ("STRING", {"default": "", "multiline": True, "tooltip": (
                    "Empty: each pair's caption. Otherwise filled from the file name: named fields take the "
                    "name's _-separated parts in order, e.g. 'a 3D dental model of {jaw} teeth, {view} view' with "
                    "upper_front_0012.png. {name} is the whole name, {caption} the caption.")}),
                "output_name": ("STRING", {"default": "my_condition", "tooltip": (
                    "File name in models/ctrlora/ (.safetensors added). Never overwritten; the run's state lives in "
                    "models/ctrlora/<name>.train/.")}),
                "rank": ("INT", {"default": 128, "min": RANK_RANGE[0], "max": RANK_RANGE[1],
                                 "tooltip": "LoRA rank (official: 128)."}),
                "steps": ("INT", {"default": 1000, "min": 1, "max": 1_000_000, "tooltip": "Optimizer steps in total."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 256}),
                "grad_accumulation": ("INT", {"default": 1, "min": 1, "max": 1024,
                                              "tooltip": "Micro-batches per optimizer step."}),
                "learning_rate": ("FLOAT", {"default": 1e-5, "min": 1e-8, "max": 1.0, "step": 1e-6, "round": False,
                                            "tooltip": "AdamW learning rate (official: 1e-5)."}),
                "prompt_dropout": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.01,
                                             "tooltip": "Probability that a prompt is replaced by '' (official: 0.3)."}),
                "resolution": ("INT", {"default": 512, "min": RESOLUTION_RANGE[0], "max": RESOLUTION_RANGE[1],
                                       "step": 8, "tooltip": "Images are resized and centre-cropped to this size."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": False}),
                "save_every": ("INT", {"default": 250, "min": 0, "max": 1_000_000, "tooltip": (
                    "Save the resumable state and an intermediate LoRA every N steps (0: only when the run stops).")}),
                "resume": ("BOOLEAN", {"default": True, "tooltip": (
                    "Continue a saved (cancelled or interrupted) run of this output name: same step count, "
                    "optimizer and random state.")}),
                "start_from": ([NO_START] + model_folders.list_files([model_folders.FOLDER]), {"tooltip": (
                    "Fine-tune an existing CtrLoRA condition from models/ctrlora/ instead of starting a new one.")}),
                "gradient_checkpointing": ("BOOLEAN", {"default": False,
                                                       "tooltip": "Less GPU memory, about a third slower."}),
            },
            "optional": {
                "file_name_pattern": ("STRING", {"default": "", "tooltip": (
                    "Optional: names the file-name parts for the template, e.g. {jaw}_{view}_{index}.")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("CTRLORA", "STRING")
    RETURN_NAMES = ("condition", "report")
    OUTPUT_NODE = True
    FUNCTION = "train"
    CATEGORY = CATEGORY

    def train(self, model, clip, vae, base, dataset_folder, prompt_template, output_name, rank, steps, batch_size,
              grad_accumulation, learning_rate, prompt_dropout, resolution, seed, save_every, resume, start_from,
              gradient_checkpointing, file_name_pattern="", unique_id=None):
        config = TrainConfig(
            rank=rank, steps=steps, batch_size=batch_size, grad_accum=grad_accumulation, lr=learning_rate,
            prompt_dropout=prompt_dropout, resolution=resolution, seed=seed, save_every=save_every,
            gradient_checkpointing=gradient_checkpointing,
        )
        start = None if start_from == NO_START else \
            model_folders.resolve(start_from, [model_folders.FOLDER], "Train CtrLoRA")
        trainer = Trainer(
            model, base, vae, clip_prompt_encoder(clip), paths.dataset_folder(dataset_folder),
            folder_paths.get_folder_paths(model_folders.FOLDER)[0], output_name, config,
            template=prompt_template, name_pattern=file_name_pattern, start_from=start, resume=resume,
            reporter=ComfyReporter(node_id=unique_id, output=output_name),
        )
        result = trainer.run()
        return {"ui": {"text": [result.report]}, "result": (result.condition, result.report)}


NODE_CLASS_MAPPINGS = {"CtrLoRATrain": TrainCtrLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"CtrLoRATrain": "Train CtrLoRA"}
