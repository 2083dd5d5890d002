"""The 'Train CtrLoRA' node: a schema over ``training`` (datasets, the loop, resumable state)."""
import torch

import comfy.samplers
import folder_paths
import nodes as comfy_nodes

from ..training import ComfyReporter, TrainConfig, Trainer, clip_prompt_encoder, paths
from ..training.dataset import PROMPT_FILE
from ..training.loop import RANK_RANGE, RESOLUTION_RANGE
from ..training.precision import PRECISIONS
from ..training.previews import PreviewSettings
from ..training.schedule import SCHEDULES
from ..training.validation import MAX_PAIRS as MAX_HELD_OUT
from . import model_folders
from .inference import BASE_TYPE, CONDITION_TYPE

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
                "base": (BASE_TYPE, {"tooltip": "From Load Base ControlNet (frozen)."}),
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
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 256,
                                       "tooltip": "Pairs per micro-batch (official: 1)."}),
                "grad_accumulation": ("INT", {"default": 1, "min": 1, "max": 1024,
                                              "tooltip": "Micro-batches per optimizer step."}),
                "learning_rate": ("FLOAT", {"default": 1e-5, "min": 1e-8, "max": 1.0, "step": 1e-6, "round": False,
                                            "tooltip": "AdamW learning rate (official: 1e-5)."}),
                "prompt_dropout": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.01,
                                             "tooltip": "Probability that a prompt is replaced by '' (official: 0.3)."}),
                "resolution": ("INT", {"default": 512, "min": RESOLUTION_RANGE[0], "max": RESOLUTION_RANGE[1],
                                       "step": 8, "tooltip": "Images are resized and centre-cropped to this size."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": False,
                                 "tooltip": "Seed of the run's draws (pair order, empty prompts, noise, timesteps)."}),
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
                "precision": (["auto", *PRECISIONS], {"default": "auto", "tooltip": (
                    "auto: compute in the dtype ComfyUI loaded the models in (fp16 on most GPUs and Macs, with loss "
                    "scaling; fp32 on CPU), bf16 on GPUs when they are fp32. The trained weights always stay fp32.")}),
                "validation_fraction": ("FLOAT", {"default": TrainConfig.validation_fraction, "min": 0.0, "max": 0.5,
                                                  "step": 0.01, "tooltip": (
                    f"Pairs held out of training (at least 1, at most {MAX_HELD_OUT}); their loss at fixed noise is "
                    "the second curve on the chart. 0: none.")}),
                "validate_every": ("INT", {"default": TrainConfig.validate_every, "min": 0, "max": 1_000_000,
                                           "tooltip": "Steps between held-out losses (0: never)."}),
                "preview_every": ("INT", {"default": 250, "min": 0, "max": 1_000_000, "tooltip": (
                    "Steps between preview images sampled with the current LoRA (shown on the node, saved in the run "
                    "folder; a grid of all of them at the end). 0: none.")}),
                "preview_image": ("IMAGE", {"tooltip": (
                    "Optional condition image(s) for the previews (empty prompt); default: held-out pairs.")}),
                "preview_sampler": (comfy.samplers.KSampler.SAMPLERS, {"default": "ddim",
                                                                       "tooltip": "Sampler of the preview images."}),
                "preview_scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "normal",
                                                                           "tooltip": "Scheduler of the previews."}),
                "preview_steps": ("INT", {"default": 10, "min": 1, "max": 100,
                                          "tooltip": "Sampling steps per preview."}),
                "preview_cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.5,
                                          "tooltip": "CFG scale of the previews."}),
                "keep_snapshots": ("INT", {"default": TrainConfig.keep_snapshots, "min": 0, "max": 1000, "tooltip": (
                    "Intermediate LoRA files kept in the run folder (the newest); the resumable state is always "
                    "kept until the run finishes.")}),
                "lr_schedule": (list(SCHEDULES), {"default": "constant", "tooltip": (
                    "constant: the official recipe. cosine: decays to 0 at the last step.")}),
                "warmup_steps": ("INT", {"default": 0, "min": 0, "max": 1_000_000,
                                         "tooltip": "Linear learning-rate warm-up (official: 0)."}),
                "file_name_pattern": ("STRING", {"default": "", "tooltip": (
                    "Optional: names the file-name parts for the template, e.g. {jaw}_{view}_{index}.")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = (CONDITION_TYPE, "STRING", "IMAGE")
    RETURN_NAMES = ("condition", "report", "preview_grid")
    OUTPUT_TOOLTIPS = ("The trained condition (its LoRA on the base): connect it to Apply CtrLoRA.",
                       "The run's report: data, steps, losses and where the file went.",
                       "The preview images of the run in a condition | target | previews grid.")
    OUTPUT_NODE = True
    FUNCTION = "train"
    CATEGORY = CATEGORY

    def train(self, model, clip, vae, base, dataset_folder, prompt_template, output_name, rank, steps, batch_size,
              grad_accumulation, learning_rate, prompt_dropout, resolution, seed, save_every, resume, start_from,
              gradient_checkpointing, file_name_pattern="", precision="auto",
              validation_fraction=TrainConfig.validation_fraction, validate_every=TrainConfig.validate_every,
              preview_every=250, preview_image=None, preview_sampler="ddim", preview_scheduler="normal",
              preview_steps=10, preview_cfg=7.5, keep_snapshots=TrainConfig.keep_snapshots, lr_schedule="constant",
              warmup_steps=0, unique_id=None):
        config = TrainConfig(
            rank=rank, steps=steps, batch_size=batch_size, grad_accum=grad_accumulation, lr=learning_rate,
            prompt_dropout=prompt_dropout, resolution=resolution, seed=seed, save_every=save_every,
            gradient_checkpointing=gradient_checkpointing, precision=precision,
            validation_fraction=validation_fraction, validate_every=validate_every, keep_snapshots=keep_snapshots,
            lr_schedule=lr_schedule, warmup_steps=warmup_steps,
        )
        previews = PreviewSettings(every=preview_every, sampler=preview_sampler, scheduler=preview_scheduler,
                                   steps=preview_steps, cfg=preview_cfg, seed=seed)
        start = None if start_from == NO_START else \
            model_folders.resolve(start_from, [model_folders.FOLDER], "Train CtrLoRA")
        trainer = Trainer(
            model, base, vae, clip_prompt_encoder(clip), paths.dataset_folder(dataset_folder),
            folder_paths.get_folder_paths(model_folders.FOLDER)[0], output_name, config,
            template=prompt_template, name_pattern=file_name_pattern, start_from=start, resume=resume,
            reporter=ComfyReporter(node_id=unique_id, output=output_name), previews=previews,
            preview_image=preview_image,
        )
        result = trainer.run()
        ui = {"text": [result.report]}
        grid = result.preview_grid
        if grid is not None:
            ui.update(comfy_nodes.PreviewImage().save_images(grid, filename_prefix=f"ctrlora_{output_name}_previews")["ui"])
        else:
            grid = torch.zeros(1, 64, 64, 3)  # an IMAGE output must be an image
        return {"ui": ui, "result": (result.condition, result.report, grid)}


NODE_CLASS_MAPPINGS = {"CtrLoRATrain": TrainCtrLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"CtrLoRATrain": "Train CtrLoRA"}
