"""Decoding a training image to 8-bit RGB the way the official loader does: ``cv2.imread(path)`` (IMREAD_COLOR),
then BGR -> RGB. Done with Pillow and numpy; measured against OpenCV 4.9.0 (the official requirement) and 5.0.0 on
the fixtures in tests/data/image_modes/.

What IMREAD_COLOR does, per mode (and so what this does):

* EXIF orientation is applied (JPEG, PNG, WebP).
* Alpha is dropped, not composited (RGBA, gray+alpha, palette with transparency: the palette colour is kept).
* Grayscale is repeated into the three channels.
* 16-bit PNG and 16-bit grayscale TIFF keep the high byte (``v >> 8``); 16-bit RGB(A) TIFF is rounded
  (``(v + 128) // 257``, libtiff's RGBA reader). Pillow only gives the high byte of 16-bit RGB TIFF, so that mode
  can be 1 level off.
* CMYK JPEG (Adobe, inverted): ``k - (255 - c) * k >> 8`` per channel on the stored values.

OpenCV's IMREAD_COLOR cannot read 32-bit samples (it returns None; the official training crashes on them). Here
single-channel 32-bit TIFFs are read with the same rule as 16-bit data, scaled, never clipped: integers from their
type's full range, floats from [0, 1] (rounded to nearest). A float image with values outside [0, 1] has no
defined scaling and is refused (``UnsupportedImage``) rather than guessed at.
"""
import numpy as np
from PIL import Image, ImageOps

# TIFF SampleFormat tag values
_TIFF_SAMPLE_FORMAT = 339
_SIGNED = 2


class UnsupportedImage(ValueError):
    """A file that decodes but has no defined 8-bit conversion."""


def _scale(values, low, high):
    """Linear map of [low, high] to 0..255, rounded to nearest (as OpenCV's saturate_cast)."""
    return np.rint((values.astype(np.float64) - low) * (255.0 / (high - low))).astype(np.uint8)


def _high_byte(image):
    return (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)


def _gray_32bit(image, signed):
    values = np.asarray(image)
    if image.mode == "F":
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise UnsupportedImage(
                f"float image with values in [{values.min():g}, {values.max():g}], not in [0, 1]; save it scaled to "
                "0..1, or as an 8 or 16-bit PNG")
        return _scale(values, 0.0, 1.0)
    if signed:
        return _scale(values.astype(np.int64), -2 ** 31, 2 ** 31 - 1)
    return _scale(values.view(np.uint32), 0, 2 ** 32 - 1)  # Pillow reads unsigned 32-bit samples as signed


def _cmyk(image, stored_inverted):
    stored = np.asarray(image).astype(np.int32)
    if stored_inverted:  # Pillow undoes Adobe's inversion; OpenCV's formula works on the stored values
        stored = 255 - stored
    k = stored[..., 3:]
    return (k - (((255 - stored[..., :3]) * k) >> 8)).astype(np.uint8)


def decode(path):
    """The image at ``path`` as ``uint8 [height, width, 3]`` RGB, as ``cv2.imread`` + BGR->RGB gives it.

    Raises ``OSError``/``ValueError`` (``UnsupportedImage`` for modes without an 8-bit conversion) for files it
    cannot use."""
    with Image.open(path) as image:
        # Read from the file's own headers before exif_transpose makes a plain copy.
        cmyk_inverted = image.mode == "CMYK" and any(t.args and t.args[0] == "CMYK;I" for t in image.tile)
        signed = getattr(image, "tag_v2", {}).get(_TIFF_SAMPLE_FORMAT) in (_SIGNED, (_SIGNED,))
        tiff = image.format == "TIFF"
        image = ImageOps.exif_transpose(image)
        mode = image.mode
        if mode == "CMYK":
            rgb = _cmyk(image, cmyk_inverted)
        elif mode.startswith("I;16") or (mode == "I" and not tiff):  # 16-bit samples (older Pillow: PNG as "I")
            rgb = _high_byte(image)
        elif mode in ("I", "F"):
            rgb = _gray_32bit(image, signed)
        else:  # palette transparency as alpha first (then dropped): Pillow warns on a direct P -> RGB
            rgb = np.asarray((image.convert("RGBA") if mode == "P" else image).convert("RGB"))
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    return np.array(rgb)  # a writable copy (Pillow's arrays are read-only)


def decode_alpha(path):
    """The alpha channel (``uint8 [height, width]``, oriented as ``decode``) of an image with transparency, else
    None. 16-bit alpha keeps its high byte."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if "A" not in image.getbands() and not (image.mode == "P" and "transparency" in image.info):
            return None
        return np.asarray(image.convert("RGBA").getchannel("A"))
