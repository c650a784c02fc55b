"""Preview pictures for a person: the image blended with the class palette, with a legend of the classes
present (colour, id, name, share of the image), written under previews/run_date=.../<run_id>/.

Class names come from the checkpoint and may be in any script. The legend draws each name in the first of its
fonts that has a glyph for every character of it: DejaVu Sans (shipped inside matplotlib: Latin, Greek, Cyrillic,
Arabic, Hebrew, some symbols), then Noto Sans CJK JP (the noto-cjk-sans-jp-regular package: Japanese, Chinese,
Korean). Right-to-left names need Pillow's raqm layout (with FriBiDi) to be drawn shaped and in order. A name that
no font can draw whole (an emoji, Thai, Devanagari, ...) is never drawn as blank boxes: its line says so and names
the characters missing ("3 (name not drawable in this font: U+1F697)"); class_stats.class_name holds the name.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import io
import logging
import math
import os
import re
import unicodedata
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont, features

from models import voc_palette

from ..decode import decode_image
from ..storage import Location
from .codec import decode_label_map

log = logging.getLogger(__name__)

ALPHA = 0.5
MIN_SIDE = 256      # small images are enlarged (nearest neighbour) to at least this long side
MAX_SIDE = 1024     # large ones shrunk to at most this
SWATCH = 14
LINE = 18
PAD = 6
FONT_SIZE = 12
NOT_DRAWABLE = "name not drawable in this font"
MAX_NAME_CHARACTERS = 48  # of a class name in the legend; class_stats.class_name keeps it whole


def palette_array() -> np.ndarray:
    return np.array(voc_palette(256), dtype=np.uint8)


def render_overlay(rgb: np.ndarray, label: np.ndarray, class_names: list[str], *, alpha: float = ALPHA) -> bytes:
    """PNG bytes: `rgb` (H, W, 3) blended with the palette colour of `label` (H, W), legend below."""
    if rgb.shape[:2] != label.shape:
        raise ValueError(f"image {rgb.shape[:2]} and label map {label.shape} differ in size")
    h, w = label.shape
    long_side = max(h, w)
    lines = legend_lines(label, class_names)  # of the whole label map, not the preview's
    if long_side > MAX_SIDE:
        # Shrunk before blending: a 100 MP image's float blend would be 1.2 GB; the preview is 1024 px a side.
        s = MAX_SIDE / long_side
        size = (max(1, round(w * s)), max(1, round(h * s)))
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR, reducing_gap=3.0))
        label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    colours = palette_array()[label]
    blend = (rgb.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).round().astype(np.uint8)
    img = Image.fromarray(blend)
    if long_side < MIN_SIDE:
        k = math.ceil(MIN_SIDE / long_side)
        img = img.resize((w * k, h * k), Image.NEAREST)
    draw_probe = ImageDraw.Draw(img)
    text_w = max((draw_probe.textlength(line.text, font=line.font.image, **line.font.options) for line in lines),
                 default=0)
    legend_w = int(PAD * 3 + SWATCH + text_w)
    out_w = max(img.width, legend_w)
    out = Image.new("RGB", (out_w, img.height + PAD * 2 + LINE * len(lines)), (255, 255, 255))
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    pal = voc_palette(256)
    y = img.height + PAD
    for line in lines:
        draw.rectangle([PAD, y + 2, PAD + SWATCH, y + 2 + SWATCH], fill=pal[line.class_id], outline=(0, 0, 0))
        draw.text((PAD * 2 + SWATCH, y + 2), line.text, fill=(0, 0, 0), font=line.font.image, **line.font.options)
        y += LINE
    buf = io.BytesIO()
    out.save(buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ the legend


@dataclass(frozen=True)
class LegendFont:
    """One font of the legend: its file, the code points it has glyphs for, and the font to draw with."""

    path: str
    codepoints: frozenset[int]
    image: ImageFont.FreeTypeFont
    options: dict  # draw.text / textlength options: a left-to-right base direction where raqm lays the text out


@dataclass(frozen=True)
class LegendLine:
    class_id: int
    text: str          # what the line says: "<id> <name>  <share>%", or the note instead of a name it cannot draw
    font: LegendFont   # the font that draws `text` whole
    drawn_name: bool   # False: the name is replaced by the note saying why


def _font_files() -> list[str]:
    """The legend's font files, in the order they are tried (a missing package's font is left out)."""
    found = []
    spec = importlib.util.find_spec("matplotlib")  # located, not imported: its import sets up a plotting backend
    if spec and spec.origin:
        found.append(os.path.join(os.path.dirname(spec.origin), "mpl-data", "fonts", "ttf", "DejaVuSans.ttf"))
    spec = importlib.util.find_spec("noto_cjk_sans_jp_regular")
    if spec and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            found += sorted(glob.glob(os.path.join(folder, "*.otf")))
    return [f for f in found if os.path.isfile(f)]


def complex_layout() -> bool:
    """Whether Pillow lays text out with raqm and FriBiDi: right-to-left scripts shaped and in reading order."""
    return bool(features.check_feature("raqm") and features.check_feature("fribidi"))


@functools.lru_cache(maxsize=None)
def _legend_font(index: int) -> LegendFont | None:
    """The index-th font of the legend, loaded on first use (a CJK font's character map takes ~0.5 s to read)."""
    files = _font_files()
    if index >= len(files):
        return None
    from fontTools.ttLib import TTFont

    path = files[index]
    with TTFont(path, lazy=True) as tt:
        codepoints = frozenset(tt.getBestCmap() or {})
    raqm = complex_layout()
    image = ImageFont.truetype(path, FONT_SIZE, layout_engine=ImageFont.Layout.RAQM if raqm else ImageFont.Layout.BASIC)
    return LegendFont(path, codepoints, image, {"direction": "ltr"} if raqm else {})


@functools.lru_cache(maxsize=1)
def _fallback_font() -> LegendFont:
    """Pillow's own font, where no font file of the legend is installed: printable ASCII only is taken as drawable."""
    return LegendFont("(Pillow's default)", frozenset(range(0x20, 0x7F)), ImageFont.load_default(), {})


def _right_to_left(ch: str) -> bool:
    return unicodedata.bidirectional(ch) in ("R", "AL", "AN")


def _font_for(name: str) -> tuple[LegendFont | None, str]:
    """The first legend font that draws `name` whole, or (None, why not)."""
    needed = {ord(c) for c in name if not c.isspace()}
    if not complex_layout() and any(_right_to_left(c) for c in name):
        return None, f"{NOT_DRAWABLE}: right-to-left, and Pillow has no raqm layout here"
    best: set[int] | None = None
    index = 0
    while (font := _legend_font(index)) is not None:
        missing = needed - font.codepoints
        if not missing:
            return font, ""
        best = missing if best is None or len(missing) < len(best) else best
        index += 1
    if index == 0:  # no font file at all
        fallback = _fallback_font()
        best = needed - fallback.codepoints
        if not best:
            return fallback, ""
    codes = " ".join(f"U+{c:04X}" for c in sorted(best)[:3]) + (" ..." if len(best) > 3 else "")
    return None, f"{NOT_DRAWABLE}: {codes}"


def _one_line(name: str) -> str:
    """A class name as a legend line shows it: whitespace (newlines included) as single spaces, at most
    MAX_NAME_CHARACTERS characters (an ellipsis for the rest)."""
    name = " ".join(str(name).split())
    return name if len(name) <= MAX_NAME_CHARACTERS else name[:MAX_NAME_CHARACTERS - 1] + "\u2026"


def legend_lines(label: np.ndarray, class_names: list[str]) -> list[LegendLine]:
    """The legend of a label map: one line per class present, most pixels first."""
    counts = np.bincount(label.reshape(-1), minlength=256)  # uint8 ids: one pass, no sort of 100 MP
    ids = np.flatnonzero(counts)
    counts = counts[ids]
    lines = []
    for i in np.argsort(-counts, kind="stable"):
        cid = int(ids[i])
        name = _one_line(class_names[cid]) if cid < len(class_names) else f"class {cid}"
        share = f"{100.0 * counts[i] / label.size:.1f}%"
        font, why = _font_for(name)
        if font is not None:
            # A left-to-right mark after a right-to-left name keeps the share after it, where it is on every line.
            mark = "\u200e" if any(_right_to_left(c) for c in name) else ""
            lines.append(LegendLine(cid, f"{cid} {name}{mark}  {share}", font, True))
        else:
            note = f"{cid} ({why})  {share}"
            lines.append(LegendLine(cid, note, _font_for(note)[0] or _fallback_font(), False))
    return lines


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
            source = Location.of_listed(p.uri, listed_by)
            rgb = decode_image(source.read_listed(source.path, max_bytes), max_pixels=max_pixels)
            png = render_overlay(rgb, decode_label_map(p.label_map, p.encoding, p.height, p.width), class_names)
        except Exception as e:  # noqa: BLE001
            log.warning("no preview for %s: %s", p.uri, e)
            continue
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", p.uri.rsplit("/", 1)[-1].rsplit(".", 1)[0])[:80]
        folder.child(f"{stem}-{hashlib.sha1(p.uri.encode()).hexdigest()[:8]}.png").write_bytes(png)
        written += 1
    return written
