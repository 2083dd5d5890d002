"""The official CtrLoRA condition preprocessors that need no model, number for number.

Each function takes and returns an H x W x 3 uint8 RGB array, as the official annotators do (xyfJASON/ctrlora,
``annotator/*``, the app's ``detect`` and ``scripts/tool_make_cond_images.py``, which made the training data).
The official code runs OpenCV; the filters here rebuild OpenCV 4.9's integer and float32 arithmetic with numpy
and Pillow, so the outputs equal the official ones bit for bit (checked against the official golden outputs in
tests/test_preprocess.py) without OpenCV as a dependency.

Where the official code draws at random, the draw takes a ``numpy.random.RandomState``: the same calls in the same
order as the official code, so a state seeded as the official one gives the official result. ``preprocess_images``
runs a preprocessor over a ComfyUI IMAGE batch, frame by frame with the same parameters.
"""
import io
import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from .errors import CtrLoRAError

COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS: resize weights are integers out of 2048 for uint8 images
COEF_SCALE = 1 << COEF_BITS
SIMD_LANES_16 = 8  # int16 lanes of OpenCV's baseline SIMD (SSE2), which decides where its float paths run

# --- OpenCV's resize (cv2.resize) -----------------------------------------------------------------------------


def _f32(x):
    return np.float32(x)


def _cubic_weights(x):
    """OpenCV's interpolateCubic (Keys, A = -0.75) in float32."""
    a, one, x = _f32(-0.75), _f32(1), _f32(x)
    w0 = ((a * (x + one) - _f32(5) * a) * (x + one) + _f32(8) * a) * (x + one) - _f32(4) * a
    w1 = ((a + _f32(2)) * x - (a + _f32(3))) * x * x + one
    w2 = ((a + _f32(2)) * (one - x) - (a + _f32(3))) * (one - x) * (one - x) + one
    return [w0, w1, w2, one - w0 - w1 - w2]


_LANCZOS_CS = [(1, 0), (-math.sqrt(0.5), -math.sqrt(0.5)), (0, 1), (math.sqrt(0.5), -math.sqrt(0.5)),
               (-1, 0), (math.sqrt(0.5), math.sqrt(0.5)), (0, -1), (-math.sqrt(0.5), math.sqrt(0.5))]


def _lanczos4_weights(x):
    """OpenCV's interpolateLanczos4: 8 taps, float32, normalised to sum 1."""
    x = _f32(x)
    if x < np.finfo(np.float32).eps:
        return [_f32(0)] * 3 + [_f32(1)] + [_f32(0)] * 4
    y0 = -float(x + _f32(3)) * math.pi * 0.25
    s0, c0 = math.sin(y0), math.cos(y0)
    weights, total = [], _f32(0)
    for i, (cs, cc) in enumerate(_LANCZOS_CS):
        y = -float(x + _f32(3) - _f32(i)) * math.pi * 0.25
        weights.append(_f32((cs * s0 + cc * c0) / (y * y)))
        total = total + weights[-1]
    total = _f32(1) / total
    return [w * total for w in weights]


_TAPS = {"linear": 2, "area": 2, "cubic": 4, "lanczos4": 8}


def _axis_taps(src, dst, method):
    """Source indices [dst, taps] (clamped to the image, as OpenCV's border) and float32 weights [dst, taps]."""
    taps = _TAPS[method]
    inv_scale = dst / src
    scale = 1.0 / inv_scale
    starts, weights = [], []
    for d in range(dst):
        if method == "area":  # INTER_AREA when enlarging: linear with area-like weights
            s = math.floor(d * scale)
            f = _f32((d + 1) - (s + 1) * inv_scale)
            f = _f32(0) if f <= 0 else f - _f32(math.floor(f))
        else:
            f = _f32((d + 0.5) * scale - 0.5)
            s = math.floor(f)
            f = f - _f32(s)
        if taps == 2 and s < 0:
            f, s = _f32(0), 0
        if taps == 2 and s >= src - 1:
            f, s = _f32(0), src - 1
        if method == "cubic":
            w = _cubic_weights(f)
        elif method == "lanczos4":
            w = _lanczos4_weights(f)
        else:
            w = [_f32(1) - f, f]
        starts.append(s - taps // 2 + 1)
        weights.append(w)
    index = np.clip(np.asarray(starts)[:, None] + np.arange(taps), 0, src - 1)
    return index, np.asarray(weights, dtype=np.float32)


def _vertical_fixed(rows, beta, method):
    """OpenCV's vertical pass on the integer rows [dst_h, taps, W*C] with weights out of 2048 -> uint8."""
    rows = rows.astype(np.int64)
    beta = beta.astype(np.int64)
    exact = np.einsum("ykx,yk->yx", rows, beta)
    out = (exact + (1 << (2 * COEF_BITS - 1))) >> (2 * COEF_BITS)
    width = rows.shape[-1]
    if method == "cubic":
        # OpenCV's SIMD loop (VResizeCubicVec_32s8u) runs over whole blocks of 2 x 8 values in float32:
        # S0*b0 + (S1*b1 + (S2*b2 + S3*b3)), rounded half to even; the tail is the integer formula above.
        simd = width - width % (2 * SIMD_LANES_16) if width >= 2 * SIMD_LANES_16 else 0
        if simd:
            s = rows[..., :simd].astype(np.float32)
            b = (beta.astype(np.float32) * _f32(1.0 / (COEF_SCALE * COEF_SCALE)))[:, :, None]
            acc = s[:, 3] * b[:, 3]
            for k in (2, 1, 0):
                acc = s[:, k] * b[:, k] + acc
            out[:, :simd] = np.rint(acc).astype(np.int64)
    elif method in ("linear", "area"):
        # OpenCV's 8-bit linear rows (VResizeLinearVec_32s8u): ((S0 >> 4) * b0 >> 16) + ((S1 >> 4) * b1 >> 16),
        # then (+2) >> 2; matched on every column, tail included.
        s = np.clip(rows >> 4, -32768, 32767)
        out = ((s[:, 0] * beta[:, 0, None] >> 16) + (s[:, 1] * beta[:, 1, None] >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)


def _resize_separable(img, width, height, method):
    src_h, src_w, channels = img.shape
    x_index, x_weight = _axis_taps(src_w, width, method)
    y_index, y_weight = _axis_taps(src_h, height, method)
    if img.dtype == np.uint8:
        alpha = np.rint(x_weight * _f32(COEF_SCALE)).astype(np.int64)
        beta = np.rint(y_weight * _f32(COEF_SCALE)).astype(np.int64)
        horizontal = np.einsum("hwkc,wk->hwc", img[:, x_index].astype(np.int64), alpha)
        rows = horizontal[y_index].reshape(height, y_index.shape[1], width * channels)
        return _vertical_fixed(rows, beta, method).reshape(height, width, channels)
    # float64 (the shuffle noise): float weights, summed tap by tap left to right as OpenCV does.
    x_weight, y_weight = x_weight.astype(np.float64), y_weight.astype(np.float64)
    gathered = img[:, x_index]
    horizontal = gathered[:, :, 0] * x_weight[None, :, 0, None]
    for k in range(1, x_index.shape[1]):
        horizontal = horizontal + gathered[:, :, k] * x_weight[None, :, k, None]
    rows = horizontal[y_index]
    out = rows[:, 0] * y_weight[:, 0, None, None]
    for k in range(1, y_index.shape[1]):
        out = out + rows[:, k] * y_weight[:, k, None, None]
    return out


def _area_table(src, dst):
    """OpenCV's computeResizeAreaTab: for each output index, (source index, float32 coverage weight) pairs."""
    scale = 1.0 / (dst / src)
    table = []
    for d in range(dst):
        fs1 = d * scale
        fs2 = fs1 + scale
        cell = min(scale, src - fs1)
        s1, s2 = math.ceil(fs1), math.floor(fs2)
        s2 = min(s2, src - 1)
        s1 = min(s1, s2)
        entries = []
        if s1 - fs1 > 1e-3:
            entries.append((s1 - 1, _f32((s1 - fs1) / cell)))
        entries += [(s, _f32(1.0 / cell)) for s in range(s1, s2)]
        if fs2 - s2 > 1e-3:
            entries.append((s2, _f32(min(min(fs2 - s2, 1.0), cell) / cell)))
        table.append(entries)
    return table


def _resize_area_down(img, width, height):
    """OpenCV's INTER_AREA when shrinking both axes: float32 coverage sums, rounded half to even."""
    src_h, src_w, channels = img.shape
    scale_x, scale_y = 1.0 / (width / src_w), 1.0 / (height / src_h)
    if scale_x == int(scale_x) and scale_y == int(scale_y):  # resizeAreaFast: integer blocks
        sx, sy = int(scale_x), int(scale_y)
        blocks = img[:height * sy, :width * sx].astype(np.int64)
        sums = blocks.reshape(height, sy, width, sx, channels).sum(axis=(1, 3))
        if sx == 2 and sy == 2:
            return ((sums + 2) >> 2).astype(np.uint8)
        return np.clip(np.rint(sums.astype(np.float32) * _f32(1.0 / (sx * sy))), 0, 255).astype(np.uint8)
    x_table = _area_table(src_w, width)
    taps = max(len(e) for e in x_table)
    # Tap t of every output column at once; columns with fewer taps add nothing (weight 0 on a valid index).
    x_index = np.array([[e[min(t, len(e) - 1)][0] for t in range(taps)] for e in x_table])
    x_weight = np.array([[e[t][1] if t < len(e) else 0 for t in range(taps)] for e in x_table], dtype=np.float32)
    x_present = np.array([[t < len(e) for t in range(taps)] for e in x_table])
    source = img.astype(np.float32)
    out = np.empty((height, width, channels), dtype=np.uint8)
    for y, entries in enumerate(_area_table(src_h, height)):
        total = None
        for sy, beta in entries:
            row = source[sy]
            buf = row[x_index[:, 0]] * x_weight[:, 0, None]
            for t in range(1, taps):
                buf = np.where(x_present[:, t, None], buf + row[x_index[:, t]] * x_weight[:, t, None], buf)
            total = beta * buf if total is None else total + beta * buf
        out[y] = np.clip(np.rint(total), 0, 255).astype(np.uint8)
    return out


def _resize_nearest(img, width, height):
    """OpenCV's INTER_NEAREST: output pixel d takes source floor(d * src/dst) (not pixel-centre nearest)."""
    src_h, src_w = img.shape[:2]
    xs = np.minimum(np.floor(np.arange(width) * (1.0 / (width / src_w))).astype(np.int64), src_w - 1)
    ys = np.minimum(np.floor(np.arange(height) * (1.0 / (height / src_h))).astype(np.int64), src_h - 1)
    return img[ys][:, xs]


def cv_resize(img, width, height, method):
    """``cv2.resize(img, (width, height), interpolation)`` for uint8 images (float64 for cubic);
    ``method``: nearest, linear, cubic, area or lanczos4."""
    src_h, src_w = img.shape[:2]
    if (src_w, src_h) == (width, height) and img.dtype == np.uint8:
        return img.copy()
    if method == "nearest":
        return _resize_nearest(img, width, height)
    scale_x, scale_y = src_w / width, src_h / height
    if method == "linear" and scale_x == 2 and scale_y == 2:
        method = "area"  # OpenCV halves with the (equal, faster) area filter
    if method == "area" and scale_x >= 1 and scale_y >= 1:
        return _resize_area_down(img, width, height)
    return _resize_separable(img, width, height, method)


def resize_image(img, resolution):
    """The official resize before every preprocessor: short side to ``resolution``, both sides rounded to a
    multiple of 64 (halves to even), Lanczos4 when ``resolution`` is above the short side, area otherwise."""
    height, width = img.shape[:2]
    k = float(resolution) / min(height, width)
    new_h, new_w = int(np.round(height * k / 64.0)) * 64, int(np.round(width * k / 64.0)) * 64
    if new_h < 64 or new_w < 64:
        raise CtrLoRAError(f"resize to {resolution}: a {width}x{height} image would become {new_w}x{new_h}; "
                           "use a larger resolution.")
    return cv_resize(img, new_w, new_h, "lanczos4" if k > 1 else "area")


# --- Preprocessors -------------------------------------------------------------------------------------------


def _min_size(img, name, minimum):
    height, width = img.shape[:2]
    if height < minimum or width < minimum:
        raise CtrLoRAError(f"{name}: the image is {width}x{height}; it needs at least {minimum}x{minimum} pixels.")


def palette(img):
    """One colour per 64x64 block: bicubic shrink by 64 (no antialiasing), then nearest enlarge."""
    _min_size(img, "palette", 64)
    height, width = img.shape[:2]
    small = cv_resize(img, width // 64, height // 64, "cubic")
    return cv_resize(small, width, height, "nearest")


def nearest_palette_colours(pixels, colours):
    """Index of the nearest colour (Euclidean RGB) for each pixel; ties go to the lower index."""
    diff = pixels.reshape(-1, 1, 3).astype(np.int64) - colours.reshape(1, -1, 3).astype(np.int64)
    return np.argmin((diff * diff).sum(-1), axis=1)


def kmeans_palette(pixels, n_colors, rng, iterations=300, tol=1e-4):
    """A k-means (k-means++ start, one run, as scikit-learn's defaults) palette of ``n_colors`` uint8 colours.

    It is not scikit-learn's: the official palette depends on scikit-learn's random draws; this one on ``rng``.
    """
    points = pixels.reshape(-1, 3).astype(np.float64)
    n_colors = min(n_colors, len(points))
    centres = [points[rng.randint(len(points))]]
    for _ in range(1, n_colors):
        distance = ((points[:, None] - np.asarray(centres)[None]) ** 2).sum(-1).min(1)
        total = distance.sum()
        centres.append(points[rng.choice(len(points), p=distance / total)] if total > 0 else points[0])
    centres = np.asarray(centres)
    threshold = tol * points.var(axis=0).mean()
    for _ in range(iterations):
        labels = ((points[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        moved = np.array([points[labels == c].mean(0) if np.any(labels == c) else centres[c] for c in range(n_colors)])
        shift = ((moved - centres) ** 2).sum()
        centres = moved
        if shift <= threshold:
            break
    return np.clip(np.round(centres), 0, 255).astype(np.uint8)


def pixel(img, n_colors=16, scale=16, min_size=32, colours=None, rng=None):
    """Pixel art: Lanczos4 shrink by ``scale`` (each side at least ``min_size``), each pixel to the nearest of
    ``colours`` (k-means of the small image when None), nearest enlarge back."""
    height, width = img.shape[:2]
    small = cv_resize(img, max(width // scale, min_size), max(height // scale, min_size), "lanczos4")
    if colours is None:
        colours = kmeans_palette(small, n_colors, rng if rng is not None else np.random.RandomState(0))
    colours = np.asarray(colours, dtype=np.uint8).reshape(-1, 3)
    small = colours[nearest_palette_colours(small, colours)].reshape(small.shape)
    return cv_resize(small, width, height, "nearest")


def grayscale(img):
    """OpenCV 4.9's uint8 RGB-to-grey (15-bit fixed point), copied into three channels."""
    rgb = img.astype(np.int64)
    luma = (9798 * rgb[..., 0] + 19235 * rgb[..., 1] + 3735 * rgb[..., 2] + 16384) >> 15
    return np.repeat(luma[..., None], 3, axis=2).astype(np.uint8)


def jpeg(img, jpeg_quality):
    """JPEG compression at ``jpeg_quality`` (baseline, 4:2:0; 0 or less is 1), encoded and decoded again."""
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, "JPEG", quality=int(min(max(jpeg_quality, 1), 100)))
    return np.array(Image.open(buffer).convert("RGB"))


def _gaussian_taps(ksize):
    """OpenCV's bit-exact sigma-4 kernel for uint8 as integers out of 256."""
    c = (ksize - 1) / 2
    g = np.exp(-((np.arange(ksize) - c) ** 2) / 32.0)
    g = g / g.sum()
    q = np.zeros(ksize, dtype=np.int64)
    error = 0.0
    for i in range(ksize // 2):
        a = g[i] * 256 + error
        q[i] = q[ksize - 1 - i] = int(np.round(a))
        error = a - q[i]
    q[ksize // 2] = 256 - 2 * q[:ksize // 2].sum()
    return q


def _reflect101(n, pad):
    index = np.arange(-pad, n + pad)
    period = 2 * (n - 1) if n > 1 else 1
    index = np.abs(index) % period
    return np.where(index >= n, period - index, index)


def blur(img, ksize):
    """``cv2.GaussianBlur(img, (ksize, ksize), 4)`` as the official blur calls it: sigma 4 whatever ``ksize``
    (0 or less: 25, as OpenCV derives it from sigma), reflect-101 border."""
    if ksize <= 0:
        ksize = 25
    if ksize % 2 == 0:
        raise CtrLoRAError(f"blur: the kernel size must be odd, got {ksize}.")
    if ksize == 1:
        return img.copy()
    return _separable_blur(img, _gaussian_taps(ksize))


def _separable_blur(img, q):
    """Rows then columns with the integer kernel ``q`` (out of 256), reflect-101 border, as OpenCV's bit-exact
    uint8 Gaussian: (sum + 2^15) >> 16."""
    height, width = img.shape[:2]
    ksize, pad = len(q), len(q) // 2
    src = img.astype(np.int64)
    rows = src[:, _reflect101(width, pad)]
    acc = sum(q[i] * rows[:, i:i + width] for i in range(ksize))
    cols = acc[_reflect101(height, pad)]
    acc = sum(q[i] * cols[i:i + height] for i in range(ksize))
    return ((acc + 32768) >> 16).astype(np.uint8)


def hedsketch(edge, rng):
    """The official hedsketch from an HED map: a random threshold in 110-159, inverted (black lines on white),
    3x3 Gaussian; redrawn from the result (up to 5 times) until more than 0.5% of the values are dark."""
    height, width = edge.shape[:2]
    for _ in range(6):
        threshold = rng.randint(110, 160)
        inverted = np.where(edge > threshold, 0, 255).astype(np.uint8)
        edge = _separable_blur(inverted, np.array([64, 128, 64]))
        if np.sum(edge < 5) > 0.005 * height * width:
            break
    return edge


def _percent(n, r):
    return int(float(n) / 100.0 * float(r))


def inpainting(img, rand_h, rand_h_1, rand_w, rand_w_1):
    """Black rectangle: rows [(H - H*rand_h%)/2, (H + H*rand_h_1%)/2), columns likewise (percentages)."""
    height, width = img.shape[:2]
    out = img.copy()
    out[(height - _percent(height, rand_h)) // 2:(height + _percent(height, rand_h_1)) // 2,
        (width - _percent(width, rand_w)) // 2:(width + _percent(width, rand_w_1)) // 2] = 0
    return out


def outpainting(img, rand_h, rand_w):
    """Keeps a centred window of rand_h% x rand_w% of the image, black elsewhere."""
    height, width = img.shape[:2]
    hn, wn = _percent(height, rand_h), _percent(width, rand_w)
    out = np.zeros_like(img)
    rows = slice((height - hn) // 2, (height + hn) // 2)
    cols = slice((width - wn) // 2, (width + wn) // 2)
    out[rows, cols] = img[rows, cols]
    return out


def brush_mask(height, width, rng):
    """The official random brush strokes (BrushInpainter.sample_brushes): True where pixels are blanked.

    Draws from ``rng`` in the official order with the constructor defaults (5-9 strokes of 4-18 vertices,
    widths 2-10% of the short side), flipping the strokes drawn so far at random after each one.
    """
    mean_angle, angle_range = 2 * math.pi / 5, 2 * math.pi / 15
    strokes = rng.randint(5, 10)
    radius = math.sqrt(height * height + width * width) / 8
    width_min, width_max = int(0.02 * min(height, width)), int(0.1 * min(height, width))
    mask = Image.new("L", (width, height), 255)

    def flips(mask):
        if rng.rand() > 0.5:
            mask = mask.transpose(Image.FLIP_LEFT_RIGHT)
        if rng.rand() > 0.5:
            mask = mask.transpose(Image.FLIP_TOP_BOTTOM)
        return mask

    for _ in range(strokes):
        vertices_count = rng.randint(4, 19)
        stroke_width = rng.randint(width_min, width_max + 1)
        angle_min = mean_angle - rng.rand() * angle_range
        angle_max = mean_angle + rng.rand() * angle_range
        vertices = [(rng.randint(0, width), rng.randint(0, height))]
        for j in range(vertices_count):
            angle = rng.rand() * (angle_max - angle_min) + angle_min
            if j % 2 == 0:
                angle = 2 * math.pi - angle
            r = np.clip(rng.normal(loc=radius, scale=radius // 2), 0, 2 * radius)
            x, y = vertices[-1]
            vertices.append((min(max(x + r * math.cos(angle), 0), width), min(max(y + r * math.sin(angle), 0), height)))
        draw = ImageDraw.Draw(mask)
        draw.line(vertices, fill=0, width=stroke_width)
        half = stroke_width // 2
        for x, y in vertices:
            draw.ellipse((x - half, y - half, x + half, y + half), fill=0)
        mask = flips(mask)
    mask = flips(mask)
    return np.asarray(mask) < 128


def blank(img, mask):
    """``img`` with the pixels where ``mask`` is True set to 0 (inpainting_brush's condition)."""
    out = img.copy()
    out[mask] = 0
    return out


def pad(img, top_ratio=0.5, bottom_ratio=0.5, left_ratio=0.5, right_ratio=0.5):
    """Black borders of int(H*top_ratio) rows above, ... int(W*right_ratio) columns right."""
    height, width = img.shape[:2]
    return np.pad(img, ((int(height * top_ratio), int(height * bottom_ratio)),
                        (int(width * left_ratio), int(width * right_ratio)), (0, 0)))


def _ellipse_element(size):
    """OpenCV's getStructuringElement(MORPH_ELLIPSE, (size, size)) as (dy, dx) offsets."""
    r = size // 2
    offsets = []
    for i in range(size):
        dy = i - r
        dx = int(round(r * math.sqrt((r * r - dy * dy) / (r * r)))) if abs(dy) < r else 0
        offsets += [(dy, x) for x in range(-dx, dx + 1)]
    return offsets


def _morph(img, offsets, reduce, outside):
    height, width = img.shape
    r = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = np.pad(img, r, constant_values=outside)
    out = None
    for dy, dx in offsets:
        window = padded[r + dy:r + dy + height, r + dx:r + dx + width]
        out = window if out is None else reduce(out, window)
    return out


def illusion(img):
    """Three-level map of the third (blue) channel, closed with an 11x11 ellipse and opened with a 3x3 one."""
    v = img[:, :, 2]
    levels = np.where(v < 85, 0, np.where(v <= 170, 127, 255)).astype(np.uint8)
    large, small = _ellipse_element(11), _ellipse_element(3)
    closed = _morph(_morph(levels, large, np.maximum, 0), large, np.minimum, 255)
    opened = _morph(_morph(closed, small, np.minimum, 255), small, np.maximum, 0)
    return np.repeat(opened[..., None], 3, axis=2)


def _shuffle_noise(height, width, cell, rng):
    grid = rng.uniform(0, 1, size=(height // cell + 2, width // cell + 2, 1))
    noise = cv_resize(grid, width + 2 * cell, height + 2 * cell, "cubic")[cell:cell + height, cell:cell + width, 0]
    noise = noise - noise.min()
    return noise / noise.max()


def shuffle_flow(height, width, rng, cell=256):
    """The official content-shuffle flow: two smooth random fields (x first), in pixels of the image."""
    x = _shuffle_noise(height, width, cell, rng) * float(width - 1)
    y = _shuffle_noise(height, width, cell, rng) * float(height - 1)
    return x.astype(np.float32), y.astype(np.float32)


def remap(img, map_x, map_y):
    """``cv2.remap(img, map_x, map_y, INTER_LINEAR)`` with a black border: positions in 1/32 pixel,
    weights out of 32768."""
    height, width = img.shape[:2]
    fixed_x = np.rint(map_x * np.float32(32)).astype(np.int64)
    fixed_y = np.rint(map_y * np.float32(32)).astype(np.int64)
    sx, fx = fixed_x >> 5, fixed_x & 31
    sy, fy = fixed_y >> 5, fixed_y & 31
    src = img.astype(np.int64)
    acc = 0
    for dy, wy in ((0, 32 - fy), (1, fy)):
        for dx, wx in ((0, 32 - fx), (1, fx)):
            x, y = sx + dx, sy + dy
            inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
            sample = np.where(inside[..., None], src[np.clip(y, 0, height - 1), np.clip(x, 0, width - 1)], 0)
            acc = acc + sample * (wy * wx * 32)[..., None]
    return np.clip((acc + (1 << 14)) >> 15, 0, 255).astype(np.uint8)


def shuffle(img, rng):
    """Content shuffle: the image warped by a smooth random flow drawn from ``rng``."""
    map_x, map_y = shuffle_flow(img.shape[0], img.shape[1], rng)
    return remap(img, map_x, map_y)


def colour_hints(lineart, img, rng, stop_chance=0.10, min_hints=5, radius_range=(0.02, 0.04)):
    """lineart_anime_with_color_prompt from its anime lineart: discs of the image's mean colour under them, at
    random (at least ``min_hints``, then another while a draw beats ``stop_chance``), radius 2-4% of the short side.

    (The official tool skips nearly grey images; ``is_nearly_grey`` tells them.)"""
    height, width = img.shape[:2]
    radii = range(int(min(height, width) * radius_range[0]), int(min(height, width) * radius_range[1]) + 1)
    hints = lineart.copy()
    y, x = np.meshgrid(range(height), range(width), indexing="ij")
    count = 0
    while rng.rand() < 1 - stop_chance or count < min_hints:
        r = rng.choice(radii)
        cy, cx = rng.randint(height), rng.randint(width)
        disc = (y - cy) ** 2 + (x - cx) ** 2 <= r ** 2
        hints[disc] = np.mean(img[disc], axis=0).astype(np.uint8)
        count += 1
    return hints


def is_nearly_grey(img, threshold=5):
    """True for the images the official colour-hint tool leaves out: 95% of pixels with channels within 5."""
    return np.mean(np.std(img, axis=-1) < threshold) > 0.95


def canny(img, low_threshold=100, high_threshold=200):
    """``cv2.Canny`` on the RGB image (per pixel the channel with the strongest gradient), as the official canny.

    The one filter that needs OpenCV: it is imported here, so the rest of the pack never needs it."""
    try:
        import cv2
    except ImportError as error:
        raise CtrLoRAError("canny needs OpenCV (pip install opencv-python-headless, or the opencv-python variant "
                           "your other node packs use: only one may be installed). Or use ComfyUI's Canny node "
                           "with low 0.392 and high 0.784.") from error
    return np.repeat(cv2.Canny(np.ascontiguousarray(img), low_threshold, high_threshold)[..., None], 3, axis=2)


# --- The official random parameters (the training-data tool's draws) ------------------------------------------


def discrete_normal(rng, low, high):
    """The official tool's draw: int((0.5*randn() + 0.5) * (high - low)) + low, not clipped."""
    return int((rng.randn() * 0.5 + 0.5) * (high - low)) + low


def draw_blur_ksize(rng):
    return 2 * discrete_normal(rng, 5, 50) + 1


def draw_jpeg_quality(rng):
    return discrete_normal(rng, 10, 30)


def draw_pixel(rng):
    """(n_colors, scale) as the app and the tool draw them."""
    n_colors = rng.randint(8, 17)
    return n_colors, rng.randint(4, 9)


def draw_inpainting(rng):
    """(rand_h, rand_h_1, rand_w, rand_w_1) as the tool draws them (each pair ordered)."""
    h, h1, w, w1 = (discrete_normal(rng, 20, 80) for _ in range(4))
    return min(h, h1), max(h, h1), min(w, w1), max(w, w1)


def draw_outpainting(rng):
    rand_h = rng.randint(20, 80)
    return rand_h, rng.randint(20, 80)


# --- ComfyUI IMAGE batches ------------------------------------------------------------------------------------


def to_uint8(images):
    """IMAGE [B, H, W, C] floats in [0, 1] -> list of H x W x 3 uint8 RGB arrays (HWC3: grey repeated, alpha
    composited over white as the official code does)."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise CtrLoRAError(f"CtrLoRA Preprocess: expected an IMAGE [batch, height, width, 1/3/4 channels], "
                           f"got shape {tuple(images.shape)}.")
    frames = []
    for frame in images.detach().float().cpu().clamp(0, 1).numpy():
        if frame.shape[-1] == 4:
            alpha = frame[..., 3:]
            rgb = np.clip(np.round(frame[..., :3] * 255) * alpha + 255 * (1 - alpha), 0, 255).astype(np.uint8)
        else:
            rgb = np.round(frame * 255).astype(np.uint8)
            rgb = np.repeat(rgb, 3, axis=2) if rgb.shape[-1] == 1 else rgb
        frames.append(rgb)
    return frames


def to_image(frames):
    """List of H x W x 3 uint8 arrays -> IMAGE [B, H, W, 3] in [0, 1]."""
    return torch.from_numpy(np.stack(frames).astype(np.float32) / 255.0)


def preprocess_images(images, function, resolution=0):
    """Runs ``function`` (uint8 H x W x 3 -> uint8 H x W x 3) over every frame of an IMAGE batch, after the
    official resize to ``resolution`` when it is not 0. Every frame gets the same parameters."""
    frames = to_uint8(images)
    if resolution:
        frames = [resize_image(f, resolution) for f in frames]
    return to_image([function(f) for f in frames])


def mask_to_uint8(mask, size, resolution=0):
    """A ComfyUI MASK [B, H, W] (1 = masked) -> list of boolean H x W arrays, resized as the image is."""
    if mask.ndim == 2:
        mask = mask[None]
    frames = []
    for frame in mask.detach().float().cpu().clamp(0, 1).numpy():
        grey = np.repeat(np.round(frame * 255).astype(np.uint8)[..., None], 3, axis=2)
        if resolution:
            grey = resize_image(grey, resolution)
        if grey.shape[:2] != size:
            raise CtrLoRAError(f"CtrLoRA Preprocess: the mask is {grey.shape[1]}x{grey.shape[0]} but the image is "
                               f"{size[1]}x{size[0]}; use the mask of this image (e.g. from its mask editor).")
        frames.append(grey[..., 0] >= 128)
    return frames
