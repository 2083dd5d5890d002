"""Condition images made exactly as the official CtrLoRA preprocessors made the training data: thin schemas over
``ctrlora_core.preprocess``. Every node takes a ComfyUI IMAGE (a batch is processed frame by frame with the same
parameters) and can first apply the official resize."""
import numpy as np

from ..ctrlora_core import preprocess as core
from ..ctrlora_core.errors import CtrLoRAError

CATEGORY = "conditioning/ctrlora/preprocess"
RANDOM = -1  # a parameter at -1 is drawn from the seed as the official training-data tool draws it

RESOLUTION = ("INT", {"default": 512, "min": 0, "max": 2048, "step": 64, "tooltip":
                      "The official resize first: short side to this (sides rounded to multiples of 64), Lanczos "
                      "when enlarging, area when shrinking. The official LoRAs were trained at 512. 0 keeps the size."})
SEED = ("INT", {"default": 0, "min": 0, "max": 2**32 - 1, "control_after_generate": True, "tooltip":
                "Seeds the official random draws (and any parameter set to -1): the same seed gives the same image."})


def _percent(default, what):
    return ("INT", {"default": default, "min": RANDOM, "max": 100, "tooltip":
                    f"{what}, in percent. -1: drawn from the seed as the official tool draws it."})


class _Preprocessor:
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("condition_image",)
    OUTPUT_TOOLTIPS = ("The condition image: encode it with VAE Condition Encode.",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE", {"tooltip": "The picture to make the condition image of."}),
                             **cls.parameters(), "resolution": RESOLUTION}}

    @classmethod
    def parameters(cls):
        return {}


class Preprocess(_Preprocessor):
    DESCRIPTION = ("The official CtrLoRA preprocessors without parameters: palette (one colour per 64x64 block), "
                   "grayscale, illusion (3-level blue-channel map), shuffle (random smooth warp), hedsketch (from an "
                   "HED map: random threshold, black lines on white), canny (OpenCV's, thresholds 100/200; needs "
                   "opencv-python).")
    # Each method gets a generator seeded afresh for every frame: a batch is processed with the same draws.
    METHODS = {
        "palette": lambda img, rng: core.palette(img),
        "grayscale": lambda img, rng: core.grayscale(img),
        "illusion": lambda img, rng: core.illusion(img),
        "shuffle": core.shuffle,
        "hedsketch": core.hedsketch,
        "canny": lambda img, rng: core.canny(img),
    }

    @classmethod
    def parameters(cls):
        return {"method": (list(cls.METHODS), {"tooltip": "The official preprocessor of the LoRA you apply."}),
                "seed": SEED}

    def run(self, image, method, seed, resolution):
        function = self.METHODS[method]
        return (core.preprocess_images(image, lambda img: function(img, np.random.RandomState(seed)), resolution),)


class PixelArt(_Preprocessor):
    DESCRIPTION = ("The official pixel preprocessor: Lanczos shrink by `scale`, each pixel to the nearest of `colors` "
                   "k-means colours, nearest enlarge. The palette is this node's own k-means (seeded).")

    @classmethod
    def parameters(cls):
        return {"colors": ("INT", {"default": 12, "min": RANDOM, "max": 64, "tooltip":
                                   "Palette size (official draws 8-16). -1: drawn from the seed."}),
                "scale": ("INT", {"default": 6, "min": RANDOM, "max": 64, "tooltip":
                                  "Pixel size (official draws 4-8). -1: drawn from the seed."}),
                "seed": SEED}

    def run(self, image, colors, scale, seed, resolution):
        rng = np.random.RandomState(seed)
        drawn_colors, drawn_scale = core.draw_pixel(rng) if RANDOM in (colors, scale) else (colors, scale)
        colors = drawn_colors if colors == RANDOM else colors
        scale = drawn_scale if scale == RANDOM else scale
        if colors < 1 or scale < 1:
            raise CtrLoRAError(f"CtrLoRA Pixel Art: colors ({colors}) and scale ({scale}) must be at least 1, or -1.")
        frames = core.to_uint8(image)
        if resolution:
            frames = [core.resize_image(f, resolution) for f in frames]
        # One palette for the whole batch (from the first frame), so that video frames keep their colours.
        first = frames[0]
        small = core.cv_resize(first, max(first.shape[1] // scale, 32), max(first.shape[0] // scale, 32), "lanczos4")
        palette = core.kmeans_palette(small, colors, rng)
        return (core.to_image([core.pixel(f, colors, scale, colours=palette) for f in frames]),)


class _OneDrawnParameter(_Preprocessor):
    """A preprocessor with one parameter that the official tool draws at random (-1: drawn from the seed)."""
    PARAMETER = None  # (input name, default, maximum, tooltip)

    @classmethod
    def parameters(cls):
        name, default, maximum, tooltip = cls.PARAMETER
        return {name: ("INT", {"default": default, "min": RANDOM, "max": maximum,
                               "tooltip": f"{tooltip} -1: drawn from the seed."}),
                "seed": SEED}

    def run(self, image, seed, resolution, **parameter):
        value = parameter[self.PARAMETER[0]]
        if value == RANDOM:
            value = self.draw(np.random.RandomState(seed))
        return (core.preprocess_images(image, lambda img: self.apply(img, value), resolution),)


class Blur(_OneDrawnParameter):
    DESCRIPTION = "The official blur: Gaussian with sigma 4 whatever the kernel size (the released LoRA's quirk)."
    PARAMETER = ("kernel_size", 55, 201, "Odd. Official draws: median 55; 33 and above give the same image (sigma 4).")
    draw, apply = staticmethod(core.draw_blur_ksize), staticmethod(core.blur)


class Jpeg(_OneDrawnParameter):
    DESCRIPTION = "The official jpeg preprocessor: JPEG compression at `quality` (4:2:0), decoded again."
    PARAMETER = ("quality", 20, 100, "Official draws: around 10-30 (mean 20).")
    draw, apply = staticmethod(core.draw_jpeg_quality), staticmethod(core.jpeg)


class Inpainting(_Preprocessor):
    DESCRIPTION = ("Black holes to fill, as the official inpainting preprocessors: `mask` (e.g. painted in the mask "
                   "editor: masked pixels become black, for the inpainting_brush LoRA), else random brush strokes "
                   "(inpainting_brush), or a centred rectangle (inpainting).")

    @classmethod
    def parameters(cls):
        return {"method": (["brush strokes", "rectangle"], {"tooltip":
                           "Without a mask: random strokes as inpainting_brush was trained, or the rectangle of "
                           "the inpainting preprocessor."}),
                "seed": SEED,
                "top": _percent(50, "rectangle: hole above the centre, as a share of the height"),
                "bottom": _percent(50, "rectangle: hole below the centre"),
                "left": _percent(50, "rectangle: hole left of the centre, as a share of the width"),
                "right": _percent(50, "rectangle: hole right of the centre")}

    @classmethod
    def INPUT_TYPES(cls):
        types = super().INPUT_TYPES()
        types["optional"] = {"mask": ("MASK", {"tooltip": "Masked pixels (1) become black; overrides the method. "
                                                         "An empty mask (nothing painted) is ignored."})}
        return types

    def run(self, image, method, seed, top, bottom, left, right, resolution, mask=None):
        rng = np.random.RandomState(seed)
        frames = core.to_uint8(image)
        if resolution:
            frames = [core.resize_image(f, resolution) for f in frames]
        if mask is not None and float(mask.max()) >= 0.5:  # an empty mask (nothing painted) is ignored
            masks = core.mask_to_uint8(mask, frames[0].shape[:2], resolution)
            if len(masks) not in (1, len(frames)):
                raise CtrLoRAError(f"CtrLoRA Inpainting: {len(masks)} masks for {len(frames)} images; give 1 or "
                                   f"{len(frames)}.")
            return (core.to_image([core.blank(f, masks[i % len(masks)]) for i, f in enumerate(frames)]),)
        if method == "brush strokes":
            strokes = core.brush_mask(frames[0].shape[0], frames[0].shape[1], rng)
            return (core.to_image([core.blank(f, strokes) for f in frames]),)
        if RANDOM in (top, bottom, left, right):
            drawn = core.draw_inpainting(rng)
            top, bottom, left, right = (d if v == RANDOM else v for v, d in zip((top, bottom, left, right), drawn))
        return (core.to_image([core.inpainting(f, top, bottom, left, right) for f in frames]),)


class ColourHints(_Preprocessor):
    DESCRIPTION = ("The official lineart_anime_with_color_prompt: an anime lineart map (comfyui_controlnet_aux 'Anime "
                   "Lineart' + Invert Image) with random discs of the picture's own colours, for the "
                   "lineart_anime_color LoRA.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lineart": ("IMAGE", {"tooltip": "The picture's anime lineart, black lines on white."}),
            "image": ("IMAGE", {"tooltip": "The picture whose colours the discs take (same size as the lineart)."}),
            "seed": SEED, "resolution": RESOLUTION}}

    def run(self, lineart, image, seed, resolution):
        lines, pictures = core.to_uint8(lineart), core.to_uint8(image)
        if resolution:
            lines, pictures = ([core.resize_image(f, resolution) for f in frames] for frames in (lines, pictures))
        if len(lines) != len(pictures) or lines[0].shape != pictures[0].shape:
            raise CtrLoRAError(f"CtrLoRA Colour Hints: the lineart ({len(lines)} x {lines[0].shape[1]}x"
                               f"{lines[0].shape[0]}) and the image ({len(pictures)} x {pictures[0].shape[1]}x"
                               f"{pictures[0].shape[0]}) must be the same frames at the same size.")
        return (core.to_image([core.colour_hints(line, picture, np.random.RandomState(seed))
                               for line, picture in zip(lines, pictures)]),)


class Outpainting(_Preprocessor):
    DESCRIPTION = "The official outpainting preprocessor: keeps a centred window of the image, black around it."

    @classmethod
    def parameters(cls):
        return {"keep_height": _percent(50, "Height of the kept window (official draws 20-79)"),
                "keep_width": _percent(50, "Width of the kept window (official draws 20-79)"),
                "seed": SEED}

    def run(self, image, keep_height, keep_width, seed, resolution):
        drawn = core.draw_outpainting(np.random.RandomState(seed))
        keep_height = drawn[0] if keep_height == RANDOM else keep_height
        keep_width = drawn[1] if keep_width == RANDOM else keep_width
        return (core.preprocess_images(image, lambda img: core.outpainting(img, keep_height, keep_width), resolution),)


class Pad(_Preprocessor):
    DESCRIPTION = "The official pad preprocessor: black borders, each a share of the image's height or width."

    @classmethod
    def parameters(cls):
        ratio = ("FLOAT", {"default": 0.5, "min": 0.0, "max": 4.0, "step": 0.05,
                           "tooltip": "The official app uses 0.5."})
        return {"top": ratio, "bottom": ratio, "left": ratio, "right": ratio}

    def run(self, image, top, bottom, left, right, resolution):
        return (core.preprocess_images(image, lambda img: core.pad(img, top, bottom, left, right), resolution),)


NODE_CLASS_MAPPINGS = {
    "CtrLoRAPreprocess": Preprocess,
    "CtrLoRAPixelArt": PixelArt,
    "CtrLoRABlur": Blur,
    "CtrLoRAJpeg": Jpeg,
    "CtrLoRAInpainting": Inpainting,
    "CtrLoRAColourHints": ColourHints,
    "CtrLoRAOutpainting": Outpainting,
    "CtrLoRAPad": Pad,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "CtrLoRAPreprocess": "CtrLoRA Preprocess",
    "CtrLoRAPixelArt": "CtrLoRA Pixel Art",
    "CtrLoRABlur": "CtrLoRA Blur",
    "CtrLoRAJpeg": "CtrLoRA JPEG",
    "CtrLoRAInpainting": "CtrLoRA Inpainting",
    "CtrLoRAColourHints": "CtrLoRA Colour Hints",
    "CtrLoRAOutpainting": "CtrLoRA Outpainting",
    "CtrLoRAPad": "CtrLoRA Pad",
}
