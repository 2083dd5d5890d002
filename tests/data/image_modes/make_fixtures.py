"""Makes the image-mode fixtures and what the official loader reads from them (not run by the tests).

The official CtrLoRA dataset reads images with ``cv2.imread(path)`` (IMREAD_COLOR) and converts BGR to RGB. This
script writes tiny images in the modes training data comes in and stores that result for each in expected.npz
(uint8 RGB arrays; None -> absent: cv2.imread cannot read the file). Run it in a scratch venv with the official
requirement's OpenCV (opencv-python 4.9.0.80; the headless wheel has the same codecs), numpy, Pillow and
tifffile:

    python make_fixtures.py
"""
import os
import struct
import zlib

import cv2
import numpy as np
import tifffile
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(2026)


def png(path, array, color_type, bit_depth=16):
    """A PNG written by hand: Pillow cannot write 16-bit gray+alpha or 16-bit RGB(A)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    height, width = array.shape[:2]
    rows = array.astype(">u2" if bit_depth == 16 else "u1").reshape(height, -1)
    raw = b"".join(b"\0" + row.tobytes() for row in rows)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def ramp16(shape):
    """Every 8-bit level once per 256 pixels, with random low bytes (shows truncation vs rounding vs clipping)."""
    count = int(np.prod(shape))
    high = np.arange(count) % 256
    return (high * 256 + rng.integers(0, 256, count)).astype(np.uint16).reshape(shape)


def orientation_test_image():
    image = np.zeros((12, 20, 3), np.uint8)
    image[:4, :4] = (255, 0, 0)
    image[-4:, -8:] = (0, 0, 255)
    image[4:8, 8:12] = (0, 255, 0)
    return Image.fromarray(image)


def make(folder):
    path = lambda name: os.path.join(folder, name)  # noqa: E731
    u8 = lambda *shape: rng.integers(0, 256, shape, dtype=np.uint8)  # noqa: E731
    Image.fromarray(u8(16, 16), "L").save(path("gray8.png"))
    png(path("gray16.png"), ramp16((16, 16)), color_type=0)
    png(path("gray_alpha16.png"), ramp16((16, 16, 2)), color_type=4)
    png(path("rgb16.png"), ramp16((16, 16, 3)), color_type=2)
    png(path("rgba16.png"), ramp16((16, 16, 4)), color_type=6)
    Image.fromarray(u8(8, 8, 3), "RGB").save(path("rgb8.png"))
    Image.fromarray(u8(8, 8, 4), "RGBA").save(path("rgba8.png"))
    Image.fromarray(u8(8, 8, 2), "LA").save(path("gray_alpha8.png"))
    Image.fromarray(u8(8, 8) > 127).save(path("bilevel.png"))
    palette = Image.fromarray(rng.integers(0, 4, (8, 8), dtype=np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30])
    palette.save(path("palette_transparent.png"), transparency=bytes([255, 0, 128, 255]))
    Image.fromarray(ramp16((16, 16))).save(path("gray16.tif"))
    cv2.imwrite(path("rgb16.tif"), ramp16((16, 16, 3))[..., ::-1])
    Image.fromarray(u8(8, 8, 4), "CMYK").save(path("cmyk.jpg"), quality=95)
    Image.fromarray(u8(8, 8, 3), "RGB").save(path("rgb.jpg"), quality=90)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        orientation_test_image().save(path(f"exif{orientation}.jpg"), exif=exif, quality=100, subsampling=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    orientation_test_image().save(path("exif6.png"), exif=exif)
    # 32-bit samples: cv2.imread (IMREAD_COLOR) returns None for all of these (the official loader cannot read them).
    levels = np.arange(256, dtype=np.float64).reshape(16, 16)
    tifffile.imwrite(path("gray_float32.tif"), (levels / 255).astype(np.float32))
    tifffile.imwrite(path("gray_float32_outside_0_1.tif"), (levels * 4 - 100).astype(np.float32))
    tifffile.imwrite(path("gray_uint32.tif"), (levels * 16843009).astype(np.uint32))
    tifffile.imwrite(path("gray_int32.tif"), (levels * 16843009 - 2 ** 31).astype(np.int32))


def main():
    make(HERE)
    expected = {}
    for name in sorted(os.listdir(HERE)):
        if name.endswith((".png", ".tif", ".jpg")):
            bgr = cv2.imread(os.path.join(HERE, name))
            if bgr is not None:
                expected[name] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    np.savez_compressed(os.path.join(HERE, "expected.npz"), **expected)
    print(f"cv2 {cv2.__version__}: {len(expected)} images read; not read: "
          f"{sorted(n for n in os.listdir(HERE) if n.endswith(('.png', '.tif', '.jpg')) and n not in expected)}")


if __name__ == "__main__":
    main()
