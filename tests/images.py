"""Real encoded image files for tests: every kind a camera or a pipeline produces, and broken ones."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from models import flat_palette


def encode(img: Image.Image | np.ndarray, fmt: str, **kw) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) % 256], axis=2)
    return np.clip(arr + rng.integers(-10, 10, size=arr.shape), 0, 255).astype(np.uint8)


def palette_mask(mask: np.ndarray) -> bytes:
    """A VOC-style palette PNG whose pixel values are class ids."""
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette(flat_palette())
    return encode(img, "PNG")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png16_rgb(arr16: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow cannot write one)."""
    h, w, _ = arr16.shape
    raw = b"".join(b"\x00" + arr16[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b"")


def huge_declared_png(w: int = 100_000, h: int = 100_000) -> bytes:
    """A tiny, well-formed PNG file whose header declares an enormous image (a decompression bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
            + _png_chunk(b"IEND", b""))


def exif_rotated_jpeg(arr: np.ndarray, orientation: int = 6) -> bytes:
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def broken_files(h: int = 24, w: int = 32) -> dict[str, bytes]:
    """name -> bytes of files that must be rejected with a reason."""
    jpeg = encode(gradient_rgb(h, w), "JPEG", quality=90)
    return {
        "truncated.jpg": truncated(jpeg),
        "zero.jpg": b"",
        "notes.jpg": b"this is not an image\n" * 4,
        "bomb.png": huge_declared_png(),
    }


def sample_pair(h: int, w: int, seed: int, num_classes: int = 4) -> tuple[bytes, bytes]:
    """A JPEG image with a coloured box and its palette-PNG mask (box class, void ring)."""
    rng = np.random.default_rng(seed)
    image = gradient_rgb(h, w, seed)
    mask = np.zeros((h, w), np.uint8)
    cls = int(rng.integers(1, num_classes))
    y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    y1, x1 = y0 + h // 3, x0 + w // 3
    mask[max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1] = 255
    mask[y0:y1, x0:x1] = cls
    image[y0:y1, x0:x1] = (cls * 60, 255 - cls * 60, 128)
    return encode(image, "JPEG", quality=90), palette_mask(mask)


def write_voc(root: str, splits: dict[str, list[str]], *, h: int = 24, w: int = 32, num_classes: int = 4) -> None:
    """A small VOC-layout dataset at a local path or s3:// URI (through the product's storage layer)."""
    from pipeline.storage import join
    from tests.storage_util import write_bytes

    for split, ids in splits.items():
        for n, i in enumerate(ids):
            image, mask = sample_pair(h + n % 3, w + n % 5, seed=hash(i) % 10_000, num_classes=num_classes)
            write_bytes(join(root, "JPEGImages", f"{i}.jpg"), image)
            write_bytes(join(root, "SegmentationClass", f"{i}.png"), mask)
        write_bytes(join(root, "ImageSets", "Segmentation", f"{split}.txt"), ("\n".join(ids) + "\n").encode())
