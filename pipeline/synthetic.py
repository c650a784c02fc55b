"""A deterministic, learnable synthetic segmentation dataset in PASCAL VOC layout.

`synthesize_voc(output, count)` writes, under a local directory or an s3:// prefix:

    JPEGImages/syn_000000.jpg            RGB JPEG (quality 90)
    SegmentationClass/syn_000000.png     mode "P" PNG, VOC palette, pixel = class id, 255 = void
    ImageSets/Segmentation/train.txt     one id per line
    ImageSets/Segmentation/val.txt
    classes.txt                          one class name per line; line index = class id

Each image holds 1-4 objects on a textured, low-saturation background (smooth gradient, low-frequency blobs,
pixel noise). Every object class has a characteristic shape *and* a characteristic hue band (strongly
saturated), so classes are separable mostly by colour with shape as a secondary cue; size, position, shade,
aspect and rotation vary per instance. Later objects are drawn over earlier ones, in the image and the mask.
As in VOC, a void band (255, 2 px wide) runs along every object boundary in the mask, never in the image.

The same arguments give byte-identical files: image `i` is drawn from `numpy.random.default_rng([seed, i])`,
the train/val split from `default_rng(seed)`, and Pillow's encoders run with fixed options.
"""
from __future__ import annotations

import colorsys
import io
import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from models.voc import VOID_LABEL, flat_palette

from .errors import UsageError
from .storage import Location

SYNTHETIC_CLASSES: tuple[str, ...] = ("background", "disc", "square", "triangle", "ring", "bar")

# Hue band centre (degrees) of each object class; instances vary by +-HUE_JITTER. Bands are >= 60 degrees apart.
CLASS_HUES: dict[str, float] = {"disc": 0.0, "square": 55.0, "triangle": 120.0, "ring": 210.0, "bar": 285.0}
HUE_JITTER = 10.0
OBJECT_SATURATION = (0.65, 1.0)
OBJECT_VALUE = (0.55, 1.0)
BACKGROUND_SATURATION = (0.0, 0.15)   # far below the objects' saturation, whatever the hue
BACKGROUND_VALUE = (0.25, 0.85)

OBJECTS_PER_IMAGE = (1, 4)
OBJECT_SIZE = (0.2, 0.45)             # characteristic size as a fraction of the image's short side
JPEG_QUALITY = 90
PNG_COMPRESS_LEVEL = 6
NOISE_SIGMA = 3.0                     # final per-pixel Gaussian noise (grey levels)
SUPERSAMPLE = 4                       # shapes are rasterised at 4x and averaged down: anti-aliased edges
ID_FORMAT = "syn_{:06d}"


# ----------------------------------------------------------------------------------------------- helpers


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, s, v), dtype=np.float32) * 255.0


def _rotated(points: np.ndarray, angle: float, cx: float, cy: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]], dtype=np.float64)
    return points @ rot.T + np.array([cx, cy])


def _ellipse(rx: float, ry: float, n: int = 48) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([rx * np.cos(t), ry * np.sin(t)], axis=1)


def _shape_polygons(cls: str, rng: np.random.Generator, short: int, w: int, h: int) -> list[tuple[np.ndarray, int]]:
    """Polygons (in pixel coordinates) and fills (255 = in, 0 = cut out) for one instance of `cls`."""
    size = rng.uniform(*OBJECT_SIZE) * short
    angle = rng.uniform(0.0, 2.0 * math.pi)
    # Centre: the object may touch the border, but most of it stays inside the frame.
    margin = 0.3 * size
    cx = rng.uniform(margin, max(margin, w - margin))
    cy = rng.uniform(margin, max(margin, h - margin))
    if cls == "disc":
        r = size / 2
        aspect = rng.uniform(0.85, 1.15)
        return [(_rotated(_ellipse(r * aspect, r / aspect), angle, cx, cy), 255)]
    if cls == "square":
        half = size / 2 * 0.9
        pts = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
        return [(_rotated(pts, angle, cx, cy), 255)]
    if cls == "triangle":
        r = size / 2 * 1.4  # circumradius: a triangle covers less than its circle; keep areas comparable
        t = np.array([0.0, 2 * math.pi / 3, 4 * math.pi / 3]) + rng.uniform(-0.15, 0.15, size=3)
        pts = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
        return [(_rotated(pts, angle, cx, cy), 255)]
    if cls == "ring":
        r = max(size * 1.2, 0.3 * short) / 2
        inner = rng.uniform(0.4, 0.55)
        aspect = rng.uniform(0.9, 1.1)
        return [(_rotated(_ellipse(r * aspect, r / aspect), angle, cx, cy), 255),
                (_rotated(_ellipse(r * aspect * inner, r / aspect * inner), angle, cx, cy), 0)]
    if cls == "bar":
        length = rng.uniform(1.2, 1.5) * size
        thick = rng.uniform(0.16, 0.22) * short
        pts = np.array([[-length / 2, -thick / 2], [length / 2, -thick / 2], [length / 2, thick / 2],
                        [-length / 2, thick / 2]])
        return [(_rotated(pts, angle, cx, cy), 255)]
    raise AssertionError(cls)


def _coverage(polygons: list[tuple[np.ndarray, int]], w: int, h: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape (float32 in [0, 1]), from a supersampled rasterisation."""
    k = SUPERSAMPLE
    canvas = Image.new("L", (w * k, h * k), 0)
    draw = ImageDraw.Draw(canvas)
    for pts, fill in polygons:
        draw.polygon([(float(x), float(y)) for x, y in (pts * k + (k - 1) / 2.0)], fill=fill)
    return np.asarray(canvas.reduce(k), dtype=np.float32) / 255.0


def _smooth_noise(rng: np.random.Generator, w: int, h: int, cells: tuple[int, int], channels: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bicubically to (h, w, channels)."""
    grid = rng.uniform(0.0, 255.0, size=(cells[1], cells[0], channels)).astype(np.uint8)
    mode = "RGB" if channels == 3 else "L"
    img = Image.fromarray(grid if channels == 3 else grid[..., 0], mode).resize((w, h), Image.Resampling.BICUBIC)
    out = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return out.reshape(h, w, channels)


def _ramp(w: int, h: int, angle: float) -> np.ndarray:
    """A linear ramp in [0, 1] across the image along direction `angle`."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    proj = xs * math.cos(angle) + ys * math.sin(angle)
    lo, hi = float(proj.min()), float(proj.max())
    return (proj - lo) / (hi - lo) if hi > lo else np.zeros_like(proj)


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Smooth two-colour gradient + low-frequency blobs, all weakly saturated. (h, w, 3) float32."""
    c0 = _hsv(rng.uniform(0, 360), rng.uniform(*BACKGROUND_SATURATION), rng.uniform(*BACKGROUND_VALUE))
    c1 = _hsv(rng.uniform(0, 360), rng.uniform(*BACKGROUND_SATURATION), rng.uniform(*BACKGROUND_VALUE))
    t = _ramp(w, h, rng.uniform(0, 2 * math.pi))[..., None]
    bg = c0 * (1 - t) + c1 * t
    # Blobs: mostly brightness, a little chroma (keeps the background far from the objects' saturation).
    cells = (int(rng.integers(3, 7)), int(rng.integers(3, 6)))
    bg += _smooth_noise(rng, w, h, cells, 1) * rng.uniform(15.0, 35.0)
    bg += _smooth_noise(rng, w, h, cells, 3) * 6.0
    # Fine texture: a second, higher-frequency layer.
    fine = (int(rng.integers(10, 20)), int(rng.integers(8, 15)))
    bg += _smooth_noise(rng, w, h, fine, 1) * rng.uniform(4.0, 12.0)
    return bg


def _boundary(instances: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood holds more than one instance id: a 2-px band along every boundary."""
    img = Image.fromarray(instances, "L")
    hi = np.asarray(img.filter(ImageFilter.MaxFilter(3)))
    lo = np.asarray(img.filter(ImageFilter.MinFilter(3)))
    return hi != lo


def render_sample(seed: int, index: int, size: tuple[int, int] = (160, 120)) -> tuple[np.ndarray, np.ndarray]:
    """Image `index` of the dataset for `seed`: (RGB uint8 (h, w, 3), mask uint8 (h, w)) before encoding."""
    w, h = size
    rng = np.random.default_rng([seed, index])
    short = min(w, h)
    image = _background(rng, w, h)
    instances = np.zeros((h, w), dtype=np.uint8)   # 0 = background, k = k-th object drawn
    labels = np.zeros((h, w), dtype=np.uint8)
    n = int(rng.integers(OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] + 1))
    for k in range(1, n + 1):
        cls_id = int(rng.integers(1, len(SYNTHETIC_CLASSES)))
        cls = SYNTHETIC_CLASSES[cls_id]
        alpha = _coverage(_shape_polygons(cls, rng, short, w, h), w, h)
        base = _hsv(CLASS_HUES[cls] + rng.uniform(-HUE_JITTER, HUE_JITTER), rng.uniform(*OBJECT_SATURATION),
                    rng.uniform(*OBJECT_VALUE))
        # Shading: a brightness ramp across the object, plus a little surface texture.
        light = 0.8 + 0.35 * _ramp(w, h, rng.uniform(0, 2 * math.pi))[..., None]
        texture = _smooth_noise(rng, w, h, (int(rng.integers(8, 16)), int(rng.integers(6, 12))), 1) * 8.0
        colour = base * light + texture
        image = image * (1 - alpha[..., None]) + colour * alpha[..., None]
        inside = alpha >= 0.5
        instances[inside] = k
        labels[inside] = cls_id
    labels[_boundary(instances)] = VOID_LABEL
    image += rng.normal(0.0, NOISE_SIGMA, size=image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), labels


def render_mosaic(side: int, *, cell: int = 64, distinct: int = 256, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """A large side x side image and its mask, a grid of `distinct` cell x cell samples repeated: objects at the
    scale a model trained on small samples knows, on an image big enough to tile (pipeline.label.tiling)."""
    samples = [render_sample(seed, i, (cell, cell)) for i in range(distinct)]
    n = math.ceil(side / cell)
    image, mask = np.zeros((n * cell, n * cell, 3), np.uint8), np.zeros((n * cell, n * cell), np.uint8)
    for k in range(n * n):
        r, c = divmod(k, n)
        image[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell], mask[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = (
            samples[k % distinct])
    return np.ascontiguousarray(image[:side, :side]), np.ascontiguousarray(mask[:side, :side])


def encode_jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False,
                                      progressive=False, subsampling="4:2:0")
    return buf.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    img = Image.frombytes("P", (mask.shape[1], mask.shape[0]), np.ascontiguousarray(mask).tobytes())
    img.putpalette(flat_palette())
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- entry point


def _validate(count, size, seed, val_fraction) -> tuple[int, tuple[int, int], int, float]:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise UsageError(f"count must be an integer >= 1, got {count!r}")
    try:
        w, h = size
    except (TypeError, ValueError):
        raise UsageError(f"size must be (width, height), got {size!r}") from None
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in (w, h)):
        raise UsageError(f"size must be two positive integers (width, height), got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed!r}")
    try:
        vf = float(val_fraction)
    except (TypeError, ValueError):
        raise UsageError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}") from None
    if not (0.0 <= vf < 1.0):
        raise UsageError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    return int(count), (int(w), int(h)), int(seed), vf


def split_ids(ids: list[str], seed: int, val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic train/val partition. With >= 2 ids and val_fraction > 0, both sides are non-empty."""
    n = len(ids)
    n_val = int(round(n * val_fraction))
    if n >= 2 and val_fraction > 0:
        n_val = min(max(n_val, 1), n - 1)
    elif n < 2:
        n_val = 0
    order = np.random.default_rng(seed).permutation(n)
    val_idx = set(int(i) for i in order[:n_val])
    train = [ids[i] for i in range(n) if i not in val_idx]
    val = [ids[i] for i in range(n) if i in val_idx]
    return train, val


def _lines(items: list[str]) -> str:
    return "".join(f"{x}\n" for x in items)


def synthesize_voc(output: str | Location, count: int, *, size: tuple[int, int] = (160, 120), seed: int = 0,
                   val_fraction: float = 0.2, workers: int = 8) -> dict:
    """Write `count` synthetic images and masks in VOC layout under `output` (local path or s3:// URI).

    Returns a summary: output URI, counts, size, seed, classes, per-class pixel counts (void separately).
    """
    count, (w, h), seed, val_fraction = _validate(count, size, seed, val_fraction)
    out = Location.of(output)
    started = time.perf_counter()
    ids = [ID_FORMAT.format(i) for i in range(count)]

    def one(i: int) -> np.ndarray:
        image, mask = render_sample(seed, i, (w, h))
        out.child("JPEGImages", f"{ids[i]}.jpg").write_bytes(encode_jpeg(image))
        out.child("SegmentationClass", f"{ids[i]}.png").write_bytes(encode_mask(mask))
        return np.bincount(mask.ravel(), minlength=256).astype(np.int64)

    totals = np.zeros(256, dtype=np.int64)
    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        for hist in pool.map(one, range(count)):
            totals += hist

    train, val = split_ids(ids, seed, val_fraction)
    out.child("ImageSets", "Segmentation", "train.txt").write_text(_lines(train))
    out.child("ImageSets", "Segmentation", "val.txt").write_text(_lines(val))
    out.child("classes.txt").write_text(_lines(list(SYNTHETIC_CLASSES)))
    return {
        "output": out.uri,
        "count": count,
        "train": len(train),
        "val": len(val),
        "size": [w, h],
        "seed": seed,
        "val_fraction": val_fraction,
        "classes": list(SYNTHETIC_CLASSES),
        "class_pixels": {name: int(totals[i]) for i, name in enumerate(SYNTHETIC_CLASSES)},
        "void_pixels": int(totals[VOID_LABEL]),
        "seconds": round(time.perf_counter() - started, 3),
    }
