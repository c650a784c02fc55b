"""Preview pictures for a person: the image blended with the class palette, with a legend of the classes
present (colour, id, name, share of the image), written under previews/run_date=.../<run_id>/."""
from __future__ import annotations

import hashlib
import io
import logging
import math
import re
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from models import voc_palette

from ..decode import decode_image
from ..storage import Location, read_listed_uri
from .codec import decode_label_map

log = logging.getLogger(__name__)

ALPHA = 0.5
MIN_SIDE = 256      # small images are enlarged (nearest neighbour) to at least this long side
MAX_SIDE = 1024     # large ones shrunk to at most this
SWATCH = 14
LINE = 18
PAD = 6


def palette_array() -> np.ndarray:
    return np.array(voc_palette(256), dtype=np.uint8)


def render_overlay(rgb: np.ndarray, label: np.ndarray, class_names: list[str], *, alpha: float = ALPHA) -> bytes:
    """PNG bytes: `rgb` (H, W, 3) blended with the palette colour of `label` (H, W), legend below."""
    if rgb.shape[:2] != label.shape:
        raise ValueError(f"image {rgb.shape[:2]} and label map {label.shape} differ in size")
    colours = palette_array()[label]
    blend = (rgb.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).round().astype(np.uint8)
    img = Image.fromarray(blend)
    h, w = label.shape
    long_side = max(h, w)
    if long_side < MIN_SIDE:
        k = math.ceil(MIN_SIDE / long_side)
        img = img.resize((w * k, h * k), Image.NEAREST)
    elif long_side > MAX_SIDE:
        s = MAX_SIDE / long_side
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.NEAREST)
    ids, counts = np.unique(label, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    font = ImageFont.load_default()
    lines = []
    for i in order:
        cid = int(ids[i])
        name = class_names[cid] if cid < len(class_names) else f"class {cid}"
        lines.append((cid, f"{cid} {name}  {100.0 * counts[i] / label.size:.1f}%"))
    draw_probe = ImageDraw.Draw(img)
    text_w = max((draw_probe.textlength(t, font=font) for _, t in lines), default=0)
    legend_w = int(PAD * 3 + SWATCH + text_w)
    out_w = max(img.width, legend_w)
    out = Image.new("RGB", (out_w, img.height + PAD * 2 + LINE * len(lines)), (255, 255, 255))
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    pal = voc_palette(256)
    y = img.height + PAD
    for cid, text in lines:
        draw.rectangle([PAD, y + 2, PAD + SWATCH, y + 2 + SWATCH], fill=pal[cid], outline=(0, 0, 0))
        draw.text((PAD * 2 + SWATCH, y + 2), text, fill=(0, 0, 0), font=font)
        y += LINE
    buf = io.BytesIO()
    out.save(buf, "PNG")
    return buf.getvalue()


@dataclass
class PreviewSource:
    """A labeled image kept for a preview: its URI and its label_map cell."""

    uri: str
    label_map: bytes
    encoding: str
    height: int
    width: int


def preview_sources(output: Location, labels_files: list[str], wanted: int) -> list[PreviewSource]:
    """The first `wanted` rows of these published labels files (paths relative to the output root)."""
    sources: list[PreviewSource] = []
    for name in labels_files:
        if len(sources) >= wanted:
            break
        with output.fs.open(output.child(name).path, "rb") as f:
            rows = pq.read_table(f, columns=["image_uri", "label_map", "label_encoding", "height", "width"])
        for row in rows.slice(0, wanted - len(sources)).to_pylist():
            sources.append(PreviewSource(row["image_uri"], row["label_map"], row["label_encoding"], row["height"],
                                         row["width"]))
    return sources


def write_previews(sources: list[PreviewSource], *, listed_by: Location | None, folder: Location,
                   class_names: list[str], max_pixels: int, max_bytes: int) -> int:
    """Render each source (re-read through the images' filesystem, with the pipeline's read limits) into
    `folder`; returns how many were written.

    A preview is never worth failing the run: a source that cannot be rendered is logged and skipped.
    """
    written = 0
    for p in sources:
        try:
            rgb = decode_image(read_listed_uri(p.uri, max_bytes, listed_by), max_pixels=max_pixels)
            png = render_overlay(rgb, decode_label_map(p.label_map, p.encoding, p.height, p.width), class_names)
        except Exception as e:  # noqa: BLE001
            log.warning("no preview for %s: %s", p.uri, e)
            continue
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", p.uri.rsplit("/", 1)[-1].rsplit(".", 1)[0])[:80]
        folder.child(f"{stem}-{hashlib.sha1(p.uri.encode()).hexdigest()[:8]}.png").write_bytes(png)
        written += 1
    return written
