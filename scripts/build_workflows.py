"""Writes workflows/*.json and their .jpg thumbnails by building each graph in the real ComfyUI page.

    .venv/bin/python scripts/build_workflows.py [NAME ...]

Each workflow below is a list of nodes (type, widget values by name, a layout column) and links (by slot name).
The script starts ComfyUI with the pack (tests/ui_host.py), creates the nodes in the page with the frontend's own
LiteGraph, connects them, lays the columns out and saves what the frontend serialises, i.e. the exact format
ComfyUI writes when a user saves a workflow. The thumbnail is a screenshot of the loaded graph's CtrLoRA nodes, in
the 4:3 of the template browser's cards.
The JSON files are the source of truth once written: edit them in ComfyUI and save, or change this script and run it
again. tests/test_workflows.py proves that every file runs.
"""
import io
import json
import os
import pathlib
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import conftest  # noqa: E402,F401  (puts ComfyUI on sys.path, as in the tests)
from ui_host import WORKFLOWS, ComfyPage, chromium_page, running_server  # noqa: E402

SD15 = "v1-5-pruned-emaonly.safetensors"
COMMUNITY = "realisticVisionV60B1_v51VAE.safetensors"
BASE = "ctrlora_sd15_basecn700k.ckpt"
CANNY = "ctrlora_sd15_basecn700k_canny_rank128.ckpt"
# The official ComfyUI style-transfer workflow's pair (its strengths 0.85 + 0.35 were chosen for these files).
LINEART = "ctrlora_sd15_basecn700k_lineart_rank128_100kimgs_100ksteps.ckpt"
PALETTE = "ctrlora_sd15_basecn700k_palette_rank128_520kimgs_800ksteps.ckpt"
INPAINTING_BRUSH = "ctrlora_sd15_basecn700k_inpainting_brush_rank128_1kimgs_1ksteps.ckpt"
SD15_MODEL = {"name": SD15, "directory": "checkpoints",
              "url": "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/" + SD15}
CTRLORA_URL = "https://huggingface.co/xyfJASON/ctrlora"
# CtrLoRA-XL (the SDXL port): its README names the base; the canny condition is built into the base file.
SDXL = "sd_xl_base_1.0.safetensors"
SDXL_MODEL = {"name": SDXL, "directory": "checkpoints",
              "url": "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/" + SDXL}
XL_BASE = "ctrlora-xl-base.safetensors"
XL_CANNY = f"{XL_BASE}:canny"
XL_URL = "https://huggingface.co/Savlim/CtrLoRA-XL"
PLACEHOLDERS = {"checkpoints": [SD15, COMMUNITY, SDXL],
                "ctrlora": [BASE, CANNY, LINEART, PALETTE, INPAINTING_BRUSH, XL_BASE]}
# A real XL base file in place of the empty placeholder, so that Load CtrLoRA lists its built-in ':canny'.
XL_BASE_PLACEHOLDER = os.path.join(ROOT, "tests", "data", "golden_xl_tiny", "base.safetensors")
with open(os.path.join(ROOT, "ctrlora_core", "catalogue.json"), encoding="utf-8") as catalogue_file:
    CATALOGUE = json.load(catalogue_file)


def released(name):
    """The frontend's model list for a released CtrLoRA file: it offers the download when the file is missing."""
    entry = next(f for f in CATALOGUE["files"] if f["file"] == name)
    return [{"name": name, "url": CATALOGUE["download"].format(path=entry["path"]), "directory": "ctrlora"}]


POSITIVE_GENERAL = "masterpiece, best quality"
NEGATIVE_GENERAL = "worst quality, low quality, NSFW"
SUBJECT = "a girl with blonde hair in a pink dress standing on a green hill, blue sky with white clouds"
NOTE_WIDTH = 420
FIXED_SEED = {"seed": 0, "control_after_generate": "fixed"}
CANNY_THRESHOLDS = {"low_threshold": 0.392, "high_threshold": 0.784}  # the official 100/200 of 255


# Heights the frontend cannot know when it creates the node (text boxes, image previews, and the room the pack's
# loaders need for what they show: the file's description, or where a missing file goes).
HEIGHTS = {"Note": 620, "CLIPTextEncode": 140, "LoadImage": 400, "PreviewImage": 300, "CtrLoRALoadBase": 140,
           "CtrLoRALoad": 170}


def node(key, type_, col, widgets=None, title=None, width=None, models=None):
    """One node: ``widgets`` by name, laid out in column ``col`` (top to bottom in list order), ``width`` px at least."""
    return {"key": key, "type": type_, "col": col, "title": title, "width": width, "height": HEIGHTS.get(type_),
            "models": models, "widgets": widgets or {}}


def note(key, col, text):
    return node(key, "Note", col, {"text": text}, title="Read me", width=NOTE_WIDTH)


def scale(key, col, title, method, size, crop):
    return node(key, "ImageScale", col, {"upscale_method": method, "width": size, "height": size, "crop": crop},
                title=title, width=300)


def apply_widgets(strength):
    return {"strength": strength, "start_percent": 0.0, "end_percent": 1.0}


def models_section(*lines):
    return "Model files (download links in the pack's README):\n" + "\n".join(f"- {line}" for line in lines)


def layout(nodes, links):
    """Previews go below Save Image, in its column."""
    previews = [n for n in nodes if n["type"] == "PreviewImage"]
    return {"nodes": [n for n in nodes if n["type"] != "PreviewImage"] + previews, "links": links}


def sampling_nodes(col, prefix, positive_link, negative_link, model_link, vae_link, size=512,
                   sampler=("ddim", "ddim_uniform")):
    """KSampler with the official settings (DDIM, 20 steps, cfg 7.5), 512x512 latent, decode, save (CtrLoRA-XL:
    ``size`` 1024 and ``sampler`` UniPC, as the port's app)."""
    nodes = [
        node("latent", "EmptyLatentImage", col, {"width": size, "height": size, "batch_size": 1}, width=260),
        node("sampler", "KSampler", col, {"seed": 0, "control_after_generate": "fixed", "steps": 20, "cfg": 7.5,
                                          "sampler_name": sampler[0], "scheduler": sampler[1], "denoise": 1.0},
             width=300),
        node("decode", "VAEDecode", col + 1),
        node("save", "SaveImage", col + 1, {"filename_prefix": prefix}, width=400),
    ]
    links = [
        (*model_link, "sampler", "model"), (*positive_link, "sampler", "positive"),
        (*negative_link, "sampler", "negative"), ("latent", "LATENT", "sampler", "latent_image"),
        ("sampler", "LATENT", "decode", "samples"), (*vae_link, "decode", "vae"), ("decode", "IMAGE", "save", "images"),
    ]
    return nodes, links


def single_condition(checkpoint, prefix, positive, negative, read_me, checkpoint_models=None, lora=CANNY, xl=False):
    """Image -> 512x512 (XL: 1024) -> Canny -> VAE Condition Encode; base + canny LoRA; Apply CtrLoRA; sample."""
    size = 1024 if xl else 512
    make_nodes = [
        node("image", "LoadImage", 2, {"image": "example.png"}, title="Load Image (your picture)", width=330),
        scale("scale", 2, f"Resize to {size}x{size}", "lanczos", size, "center"),
        node("canny", "Canny", 2, CANNY_THRESHOLDS, title="Canny edge map", width=300),
    ]
    make_links = [("image", "IMAGE", "scale", "image"), ("scale", "IMAGE", "canny", "image")]
    return one_condition(read_me, prefix, positive, negative, lora, make_nodes, make_links, ("canny", "IMAGE"),
                         checkpoint=checkpoint, checkpoint_models=checkpoint_models, xl=xl)


def canny_sd15():
    read_me = (
        "CtrLoRA: one condition (canny) with Stable Diffusion 1.5\n\n"
        "1. Pick your picture in Load Image (any size; it is resized to 512x512).\n"
        "2. ComfyUI's Canny node turns it into an edge map (shown on the right), with the official thresholds "
        "100/200 (0.392/0.784 on its 0-1 scale).\n"
        "3. VAE Condition Encode encodes that map with the checkpoint's own VAE; Apply CtrLoRA adds it to both "
        "prompts through the shared Base ControlNet and the canny LoRA (strength 1.0).\n"
        "4. Run. Official settings: DDIM, 20 steps, cfg 7.5, 512 px.\n\n"
        + models_section(f"models/checkpoints/{SD15}", f"models/ctrlora/{BASE}", f"models/ctrlora/{CANNY}")
        + f"\nCtrLoRA files: {CTRLORA_URL}"
    )
    return single_condition(SD15, "ctrlora/canny_sd15", f"{SUBJECT}, {POSITIVE_GENERAL}", NEGATIVE_GENERAL,
                            read_me, checkpoint_models=[SD15_MODEL])


def community_checkpoint():
    read_me = (
        "CtrLoRA with a community checkpoint (same graph as the canny workflow)\n\n"
        "Only the checkpoint differs: Realistic Vision V6.0 B1 (the V5.1 VAE is baked in) instead of SD1.5. "
        "CtrLoRA works with any SD1.5-based checkpoint: the base ControlNet and LoRA stay the same, the "
        "checkpoint's UNet is controlled and its own VAE encodes the condition image (VAE Condition Encode takes "
        "the VAE from Load Checkpoint).\n"
        "Swap in any other SD1.5 model the same way (Dreamshaper, anime or painting models, ...), and adapt the "
        "prompt to its style.\n\n"
        + models_section(f"models/checkpoints/{COMMUNITY} (civitai.com/models/4201)",
                         f"models/ctrlora/{BASE}", f"models/ctrlora/{CANNY}")
        + f"\nCtrLoRA files: {CTRLORA_URL}"
    )
    positive = ("RAW photo, a young woman with blonde hair in a pink dress standing on a green meadow, blue sky with "
                "white clouds, 8K UHD, DSLR, film grain, soft lighting, high detail")
    negative = ("semi-realistic, CGI, 3D, render, sketch, drawing, comic, cartoon, anime, worst quality, low quality, "
                "blurry, watermark, NSFW")
    return single_condition(COMMUNITY, "ctrlora/canny_community", positive, negative, read_me)


def style_transfer():
    read_me = (
        "CtrLoRA style transfer: lineart 0.85 + palette 0.35 (the official recipe)\n\n"
        "One source picture gives two conditions, each with its own LoRA on the one shared Base ControlNet:\n"
        "- lineart (strength 0.85) keeps the shapes. The official lineart map is black lines on white from the "
        "'Realistic Lineart' annotator: with comfyui_controlnet_aux installed, replace the Canny node by "
        "'Realistic Lineart' (LineArtPreprocessor, coarse disable, resolution 512) and keep Invert Image after it. "
        "Here ComfyUI's Canny (official thresholds) stands in.\n"
        "- palette (strength 0.35) keeps the colours: CtrLoRA Preprocess -> palette makes the official palette map "
        "(one colour per 64x64 block, bit-exact).\n"
        "The two Apply CtrLoRA nodes are chained; their controls add up. These LoRA files and strengths are the "
        "official ComfyUI workflow's.\n"
        "The style comes from the checkpoint and the prompt: load a stylised SD1.5 checkpoint (oil painting, pixel "
        "art, ink, ...) for the strongest effect.\n\n"
        + models_section(f"models/checkpoints/{SD15} (or a stylised SD1.5 model)", f"models/ctrlora/{BASE}",
                         f"models/ctrlora/{LINEART}", f"models/ctrlora/{PALETTE}")
        + f"\nCtrLoRA files: {CTRLORA_URL}"
    )
    nodes = [
        note("note", 0, read_me),
        node("checkpoint", "CheckpointLoaderSimple", 1, {"ckpt_name": SD15}, width=330, models=[SD15_MODEL]),
        node("positive", "CLIPTextEncode", 1, {"text": f"{SUBJECT}, oil painting, thick brush strokes, "
                                                       f"{POSITIVE_GENERAL}"}, title="Positive prompt", width=400),
        node("negative", "CLIPTextEncode", 1, {"text": f"photorealistic, CGI, 3D, render, {NEGATIVE_GENERAL}"},
             title="Negative prompt", width=400),
        node("image", "LoadImage", 2, {"image": "example.png"}, title="Load Image (source picture)", width=330),
        scale("scale", 2, "Resize to 512x512", "lanczos", 512, "center"),
        node("lineart", "Canny", 2, CANNY_THRESHOLDS, title="Lineart (Canny stands in)", width=300),
        node("invert", "ImageInvert", 2, title="Invert Image (black lines on white)", width=300),
        node("palette", "CtrLoRAPreprocess", 2, {"method": "palette", **FIXED_SEED, "resolution": 512},
             title="CtrLoRA Preprocess (palette)", width=300),
        node("base", "CtrLoRALoadBase", 3, {"base_name": BASE}, width=380, models=released(BASE)),
        node("lora_lineart", "CtrLoRALoad", 3, {"lora_name": LINEART}, title="Load CtrLoRA (lineart)", width=380,
             models=released(LINEART)),
        node("lora_palette", "CtrLoRALoad", 3, {"lora_name": PALETTE}, title="Load CtrLoRA (palette)", width=380,
             models=released(PALETTE)),
        node("encode_lineart", "CtrLoRAVAEConditionEncode", 3, title="VAE Condition Encode (lineart)", width=380),
        node("encode_palette", "CtrLoRAVAEConditionEncode", 3, title="VAE Condition Encode (palette)", width=380),
        node("apply_lineart", "CtrLoRAApply", 4, apply_widgets(0.85), title="Apply CtrLoRA (lineart 0.85)",
             width=330),
        node("apply_palette", "CtrLoRAApply", 4, apply_widgets(0.35), title="Apply CtrLoRA (palette 0.35)",
             width=330),
        node("preview_lineart", "PreviewImage", 6, title="Condition image (lineart)", width=400),
        node("preview_palette", "PreviewImage", 6, title="Condition image (palette)", width=400),
    ]
    links = [
        ("checkpoint", "CLIP", "positive", "clip"), ("checkpoint", "CLIP", "negative", "clip"),
        ("image", "IMAGE", "scale", "image"), ("scale", "IMAGE", "lineart", "image"),
        ("lineart", "IMAGE", "invert", "image"), ("scale", "IMAGE", "palette", "image"),
        ("invert", "IMAGE", "encode_lineart", "image"), ("checkpoint", "VAE", "encode_lineart", "vae"),
        ("palette", "condition_image", "encode_palette", "image"), ("checkpoint", "VAE", "encode_palette", "vae"),
        ("invert", "IMAGE", "preview_lineart", "images"), ("palette", "condition_image", "preview_palette", "images"),
        ("base", "base", "lora_lineart", "base"), ("base", "base", "lora_palette", "base"),
        ("positive", "CONDITIONING", "apply_lineart", "positive"),
        ("negative", "CONDITIONING", "apply_lineart", "negative"),
        ("lora_lineart", "condition", "apply_lineart", "condition"),
        ("encode_lineart", "condition_latent", "apply_lineart", "condition_latent"),
        ("apply_lineart", "positive", "apply_palette", "positive"),
        ("apply_lineart", "negative", "apply_palette", "negative"),
        ("lora_palette", "condition", "apply_palette", "condition"),
        ("encode_palette", "condition_latent", "apply_palette", "condition_latent"),
    ]
    sample_nodes, sample_links = sampling_nodes(5, "ctrlora/style_transfer", ("apply_palette", "positive"),
                                                ("apply_palette", "negative"), ("checkpoint", "MODEL"),
                                                ("checkpoint", "VAE"))
    return layout(nodes + sample_nodes, links + sample_links)


def one_condition(read_me, prefix, positive, negative, lora, make_nodes, make_links, condition_output,
                  checkpoint=SD15, checkpoint_models=(SD15_MODEL,), xl=False):
    """Checkpoint, prompts, base + ``lora``, the condition image made by ``make_nodes`` (column 2, its output
    ``condition_output`` = (key, slot)), VAE Condition Encode, Apply CtrLoRA (1.0), sample; a preview of the map.
    ``xl``: CtrLoRA-XL's base, SDXL encoding and the port's sampling; no download locations (its model page's
    listing could not be checked)."""
    nodes = [
        note("note", 0, read_me),
        node("checkpoint", "CheckpointLoaderSimple", 1, {"ckpt_name": checkpoint}, width=330,
             models=list(checkpoint_models) if checkpoint_models else None),
        node("positive", "CLIPTextEncode", 1, {"text": positive}, title="Positive prompt", width=400),
        node("negative", "CLIPTextEncode", 1, {"text": negative}, title="Negative prompt", width=400),
        *make_nodes,
        node("base", "CtrLoRALoadBase", 3, {"base_name": XL_BASE if xl else BASE}, width=380,
             models=None if xl else released(BASE)),
        node("lora", "CtrLoRALoad", 3, {"lora_name": lora}, width=380, models=None if xl else released(lora)),
        node("encode", "CtrLoRAVAEConditionEncode", 3, {"model_family": "SDXL"} if xl else {}, width=380),
        node("apply", "CtrLoRAApply", 3, apply_widgets(1.0), width=380),
        node("preview", "PreviewImage", 5, title="Condition image", width=400),
    ]
    links = [
        *make_links,
        ("checkpoint", "CLIP", "positive", "clip"), ("checkpoint", "CLIP", "negative", "clip"),
        (*condition_output, "encode", "image"), ("checkpoint", "VAE", "encode", "vae"),
        (*condition_output, "preview", "images"), ("base", "base", "lora", "base"),
        ("positive", "CONDITIONING", "apply", "positive"), ("negative", "CONDITIONING", "apply", "negative"),
        ("lora", "condition", "apply", "condition"), ("encode", "condition_latent", "apply", "condition_latent"),
    ]
    sampling = {"size": 1024, "sampler": ("uni_pc", "normal")} if xl else {}
    sample_nodes, sample_links = sampling_nodes(4, prefix, ("apply", "positive"), ("apply", "negative"),
                                                ("checkpoint", "MODEL"), ("checkpoint", "VAE"), **sampling)
    return layout(nodes + sample_nodes, links + sample_links)


def canny_sdxl():
    read_me = (
        "CtrLoRA-XL: one condition (canny) with SDXL\n\n"
        "CtrLoRA-XL is the community port of CtrLoRA to SDXL (github.com/limerenceaid/CtrLoRA-XL): the same nodes, "
        "an SDXL checkpoint and the port's base file.\n"
        "1. Pick your picture in Load Image (any size; it is resized to 1024x1024).\n"
        "2. ComfyUI's Canny node turns it into an edge map (shown on the right), with the port's thresholds 100/200 "
        "(0.392/0.784 on its 0-1 scale).\n"
        "3. VAE Condition Encode, with model_family SDXL, encodes that map with the SDXL checkpoint's VAE (the image "
        "in [-1, 1], as the port does). Load CtrLoRA takes the canny condition built into the base file "
        f"({XL_CANNY}); Apply CtrLoRA adds it to both prompts (strength 1.0).\n"
        "4. Run. The port's settings: UniPC, 20 steps, cfg 7.5, 1024 px.\n\n"
        "The conditions built into the base file are inferred from the port's code (canny, depth, openpose, ...): if "
        "Load CtrLoRA does not list ':canny' for your file, pick a condition it lists, or a CtrLoRA-XL LoRA file "
        "(with the matching condition image).\n\n"
        + models_section(f"models/checkpoints/{SDXL} (or any SDXL model)", f"models/ctrlora/{XL_BASE}")
        + f"\nCtrLoRA-XL files: {XL_URL}"
    )
    return single_condition(SDXL, "ctrlora/canny_sdxl", f"{SUBJECT}, {POSITIVE_GENERAL}", NEGATIVE_GENERAL,
                            read_me, checkpoint_models=[SDXL_MODEL], lora=XL_CANNY, xl=True)


def inpainting():
    read_me = (
        "CtrLoRA inpainting with the mask editor (inpainting_brush LoRA)\n\n"
        "1. Pick your picture in Load Image (512x512 works best: the sampled latent is 512x512), right-click it, "
        "'Open in MaskEditor' and paint over what should be redrawn; save.\n"
        "2. CtrLoRA Inpainting blacks out the painted pixels, as the inpainting_brush LoRA was trained (its "
        "training holes were random brush strokes: with nothing painted, the node draws such strokes from its "
        "seed).\n"
        "3. Describe the whole picture, including what should fill the hole, in the positive prompt. Run.\n\n"
        + models_section(f"models/checkpoints/{SD15}", f"models/ctrlora/{BASE}", f"models/ctrlora/{INPAINTING_BRUSH}")
        + f"\nCtrLoRA files: {CTRLORA_URL}"
    )
    make_nodes = [
        node("image", "LoadImage", 2, {"image": "example.png"}, title="Load Image (paint the mask on it)", width=330),
        node("holes", "CtrLoRAInpainting", 2, {"method": "brush strokes", **FIXED_SEED, "resolution": 512},
             width=330),
    ]
    make_links = [("image", "IMAGE", "holes", "image"), ("image", "MASK", "holes", "mask")]
    return one_condition(read_me, "ctrlora/inpainting", f"{SUBJECT}, {POSITIVE_GENERAL}", NEGATIVE_GENERAL,
                         INPAINTING_BRUSH, make_nodes, make_links, ("holes", "condition_image"))


def palette_recolour():
    read_me = (
        "CtrLoRA palette: a new picture in the colours of a reference\n\n"
        "CtrLoRA Preprocess -> palette turns the reference (Load Image) into the official palette map, one colour "
        "per 64x64 block (bit-exact with the official preprocessor); the palette LoRA (strength 1.0) makes the "
        "prompt's picture in those colours and their layout. Lower the strength to loosen it, or chain it after "
        "another condition (see the style-transfer workflow) to recolour a picture's shapes.\n\n"
        + models_section(f"models/checkpoints/{SD15}", f"models/ctrlora/{BASE}", f"models/ctrlora/{PALETTE}")
        + f"\nCtrLoRA files: {CTRLORA_URL}"
    )
    make_nodes = [
        node("image", "LoadImage", 2, {"image": "example.png"}, title="Load Image (colour reference)", width=330),
        scale("scale", 2, "Resize to 512x512", "lanczos", 512, "center"),
        node("palette", "CtrLoRAPreprocess", 2, {"method": "palette", **FIXED_SEED, "resolution": 512}, width=330),
    ]
    make_links = [("image", "IMAGE", "scale", "image"), ("scale", "IMAGE", "palette", "image")]
    positive = f"a cosy village street at dusk, houses and lanterns, {POSITIVE_GENERAL}"
    return one_condition(read_me, "ctrlora/palette", positive, NEGATIVE_GENERAL, PALETTE, make_nodes, make_links,
                         ("palette", "condition_image"))


DENTAL_TEMPLATE = ("a 3D dental model of {jaw} teeth, {view} view, with professional lighting, high quality, "
                   "detailed, dental photography, clinical lighting setup")
DENTAL_PATTERN = "{jaw}_{view}_{index}"
TRAIN_READ_ME = (
    "Put your pairs in a folder inside ComfyUI/input (here 'dental_pairs'):\n"
    "  dental_pairs/source/upper_front_0001.png  (condition: lighting map blended with the segmentation)\n"
    "  dental_pairs/target/upper_front_0001.png  (what the model should draw)\n"
    "or the official layout (prompt.json + source/ + target/). An absolute path works too.\n"
    "The prompt comes from each file name: file_name_pattern {jaw}_{view}_{index} reads 'upper_front_0001' as "
    "jaw=upper, view=front, and prompt_template turns that into 'a 3D dental model of upper teeth, front view, "
    "with professional lighting, ...'.\n"
    "Official recipe (the defaults): rank 128, AdamW lr 1e-5, batch 1, 30% empty prompts, 512 px; about 1,000 "
    "pairs and 1,000 steps take under an hour on one 24 GB GPU. The base ControlNet and the checkpoint stay frozen.\n"
    "The node draws the loss curve and step counter while it runs; Cancel saves the run, and queueing again with "
    "resume on continues it. The LoRA is written to models/ctrlora/<output_name>.safetensors (never overwritten: "
    "change output_name for a new run), with a state snapshot every save_every steps."
)


def train_widgets(output_name):
    return {"dataset_folder": "dental_pairs", "prompt_template": DENTAL_TEMPLATE, "output_name": output_name,
            "rank": 128, "steps": 1000, "batch_size": 1, "grad_accumulation": 1, "learning_rate": 1e-5,
            "prompt_dropout": 0.3, "resolution": 512, "seed": 0, "save_every": 250, "resume": True,
            "gradient_checkpointing": False, "file_name_pattern": DENTAL_PATTERN}


def training_nodes(output_name, train_col):
    nodes = [
        node("checkpoint", "CheckpointLoaderSimple", 1, {"ckpt_name": SD15}, width=330, models=[SD15_MODEL]),
        node("base", "CtrLoRALoadBase", 1, {"base_name": BASE}, width=330, models=released(BASE)),
        node("train", "CtrLoRATrain", train_col, train_widgets(output_name), title="Train CtrLoRA (dental)",
             width=460),
    ]
    links = [("checkpoint", "MODEL", "train", "model"), ("checkpoint", "CLIP", "train", "clip"),
             ("checkpoint", "VAE", "train", "vae"), ("base", "base", "train", "base")]
    return nodes, links


def train_dental():
    read_me = (
        "CtrLoRA: train a new condition from a folder of pairs (the dental case)\n\n"
        + TRAIN_READ_ME + "\n\n"
        + models_section(f"models/checkpoints/{SD15}", f"models/ctrlora/{BASE}")
        + f"\nCtrLoRA files: {CTRLORA_URL}\n"
        "Then use the new file like any other: Load CtrLoRA lists it (press R to refresh), or see the "
        "train-then-apply workflow."
    )
    nodes, links = training_nodes("dental_lighting_seg", 2)
    return layout([note("note", 0, read_me)] + nodes, links)


def train_then_apply():
    read_me = (
        "CtrLoRA: train a condition, then sample with it in the same graph\n\n"
        "Train CtrLoRA's 'condition' output is the freshly trained LoRA on the shared base: it goes straight into "
        "Apply CtrLoRA, so one Run trains and then draws with it. Put a new condition image (a lighting map "
        "blended with a segmentation map, not seen in training) into ComfyUI/input as dental_condition.png, or "
        "pick yours in Load Image.\n\n"
        + TRAIN_READ_ME + "\n\n"
        + models_section(f"models/checkpoints/{SD15}", f"models/ctrlora/{BASE}")
        + f"\nCtrLoRA files: {CTRLORA_URL}"
    )
    nodes, links = training_nodes("dental_lighting_seg_applied", 2)
    subject = DENTAL_TEMPLATE.format(jaw="upper", view="front")
    nodes = [note("note", 0, read_me)] + nodes + [
        node("positive", "CLIPTextEncode", 1, {"text": subject}, title="Positive prompt", width=330),
        node("negative", "CLIPTextEncode", 1, {"text": NEGATIVE_GENERAL}, title="Negative prompt", width=330),
        node("image", "LoadImage", 3, {"image": "dental_condition.png"}, title="Load Image (new condition)",
             width=330),
        node("encode", "CtrLoRAVAEConditionEncode", 3, width=330),
        node("apply", "CtrLoRAApply", 3, apply_widgets(1.0), width=330),
    ]
    links += [
        ("checkpoint", "CLIP", "positive", "clip"), ("checkpoint", "CLIP", "negative", "clip"),
        ("image", "IMAGE", "encode", "image"), ("checkpoint", "VAE", "encode", "vae"),
        ("positive", "CONDITIONING", "apply", "positive"), ("negative", "CONDITIONING", "apply", "negative"),
        ("train", "condition", "apply", "condition"), ("encode", "condition_latent", "apply", "condition_latent"),
    ]
    sample_nodes, sample_links = sampling_nodes(4, "ctrlora/dental", ("apply", "positive"), ("apply", "negative"),
                                                ("checkpoint", "MODEL"), ("checkpoint", "VAE"))
    return layout(nodes + sample_nodes, links + sample_links)


WORKFLOWS_TO_BUILD = {
    "ctrlora-1-canny-sd15": canny_sd15,
    "ctrlora-2-style-transfer-lineart-palette": style_transfer,
    "ctrlora-3-community-checkpoint": community_checkpoint,
    "ctrlora-4-train-dental-condition": train_dental,
    "ctrlora-5-train-then-apply": train_then_apply,
    "ctrlora-6-inpainting-mask-editor": inpainting,
    "ctrlora-7-palette-recolour": palette_recolour,
    "ctrlora-8-canny-sdxl": canny_sdxl,
}

BUILD_JS = """async (spec) => {
    const app = window.app;
    app.graph.clear();
    const made = {};
    for (const s of spec.nodes) {
        const node = LiteGraph.createNode(s.type);
        if (!node) throw new Error(`unknown node type ${s.type}`);
        app.graph.add(node);
        if (s.title) node.title = s.title;
        for (const [name, value] of Object.entries(s.widgets)) {
            const widget = node.widgets?.find((w) => w.name === name);
            if (!widget) throw new Error(`${s.type} has no widget ${name}`);
            widget.value = value;
        }
        if (s.models) node.properties.models = s.models;
        made[s.key] = node;
    }
    for (const [from, output, to, input] of spec.links) {
        const a = made[from], b = made[to];
        const o = a.outputs.findIndex((slot) => slot.name === output);
        const i = b.inputs.findIndex((slot) => slot.name === input);
        if (o < 0 || i < 0) throw new Error(`no link ${from}.${output} -> ${to}.${input}`);
        a.connect(o, b, i);
    }
    for (const s of spec.nodes) {
        const node = made[s.key];
        const size = node.computeSize();
        node.setSize([Math.max(size[0], s.width ?? 0), Math.max(size[1], s.height ?? 0)]);
    }
    const columns = new Map();
    for (const s of spec.nodes) {
        if (!columns.has(s.col)) columns.set(s.col, []);
        columns.get(s.col).push(made[s.key]);
    }
    const title = LiteGraph.NODE_TITLE_HEIGHT;
    let x = 0;
    for (const col of [...columns.keys()].sort((a, b) => a - b)) {
        let y = title, width = 0;
        for (const node of columns.get(col)) {
            node.pos = [x, y];
            y += node.size[1] + title + 24;
            width = Math.max(width, node.size[0]);
        }
        x += width + 40;
    }
    app.graph.setDirtyCanvas(true, true);
    // What the frontend writes when it saves: JSON, so undefined fields are left out.
    return JSON.parse(JSON.stringify(app.graph.serialize()));
}"""


THUMBNAIL_VIEWPORT = (2400, 1300)
THUMBNAIL_WIDTH = 800


def thumbnail(comfy, workflow, path):
    from PIL import Image

    comfy.load_workflow(workflow)
    # The CtrLoRA part of the graph, in the 4:3 of the template browser's cards.
    box = comfy.fit_view(padding=60, type_prefix="CtrLoRA", aspect=4 / 3)
    png = comfy.page.screenshot(clip=box)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.thumbnail((THUMBNAIL_WIDTH, THUMBNAIL_WIDTH))
    image.save(path, quality=88)


def main(names):
    names = names or list(WORKFLOWS_TO_BUILD)
    models = {folder: {name: None for name in files} for folder, files in PLACEHOLDERS.items()}
    models["ctrlora"][XL_BASE] = XL_BASE_PLACEHOLDER
    with tempfile.TemporaryDirectory(prefix="ctrlora-build-") as tmp, \
            running_server(pathlib.Path(tmp), models=models) as server, \
            chromium_page(viewport=THUMBNAIL_VIEWPORT) as page:
        page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
        comfy = ComfyPage(page, server).open()
        for name in names:
            workflow = comfy.evaluate(BUILD_JS, WORKFLOWS_TO_BUILD[name]())
            workflow.pop("id", None)
            path = os.path.join(WORKFLOWS, f"{name}.json")
            with open(path, "w") as f:
                json.dump(workflow, f, indent=2)
                f.write("\n")
            thumbnail(comfy, workflow, os.path.join(WORKFLOWS, f"{name}.jpg"))
            print(f"wrote {path} and its .jpg")


if __name__ == "__main__":
    main(sys.argv[1:])
