"""The previews' legend for class names in any script (issue 30): Japanese and Arabic names are drawn with glyphs,
not blank boxes (tofu), and a name no legend font can draw (an emoji, Thai) is replaced by a line that says so.

No Ray: previews are written by the driver, through write_previews, from published label maps and the images."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from pipeline.label import previews
from pipeline.label.codec import encode_label_map
from pipeline.storage import Location
from tests.images import encode, gradient_rgb

MISSING = "\U0010fffd"  # a private-use code point that no font has a glyph for: its glyph is .notdef, the tofu box


def _label() -> np.ndarray:
    """Four classes in four bands: 0 background, 1, 2, 3."""
    label = np.zeros((40, 48), np.uint8)
    for k in range(1, 4):
        label[:, k * 12:(k + 1) * 12] = k
    return label


def _preview(tmp_path, names: list[str], tag: str) -> np.ndarray:
    """A preview as the labeling job writes it (write_previews, from the image file and its label_map cell)."""
    image = tmp_path / f"photo-{tag}.png"
    image.write_bytes(encode(gradient_rgb(40, 48, 3), "PNG"))
    label = _label()
    folder = Location.of(str(tmp_path / f"previews-{tag}"))
    source = previews.PreviewSource(str(image), encode_label_map(label, "png"), "png", *label.shape)
    assert previews.write_previews([source], listed_by=None, folder=folder, class_names=names, max_pixels=10**7,
                                   max_bytes=10**7) == 1
    (png,) = [os.path.join(folder.path, f) for f in os.listdir(folder.path)]
    with Image.open(png) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("script, one, other", [
    ("Japanese", ["背景", "歩行者", "自転車", "道路"], ["背景", "自動車", "信号機", "建物"]),
    ("Arabic", ["خلفية", "سيارة", "شجرة", "طريق"], ["مدينة", "شاحنة", "مبنى", "جسور"]),
])
def test_names_in_other_scripts_are_drawn_not_tofu(tmp_path, script, one, other):
    """Tofu is the same box for every character a font lacks: two legends whose names differ only in which
    characters (same scripts, same lengths) are pixel-identical when drawn as tofu, and differ when drawn."""
    a, b = _preview(tmp_path, one, "a"), _preview(tmp_path, other, "b")  # the same image and label map
    assert not np.array_equal(a, b), f"{script} names render as identical boxes (tofu)"
    for line in previews.legend_lines(_label(), one):  # and each is drawn as the name, not replaced by the note
        assert line.drawn_name, line.text


def _notdef(font: previews.LegendFont) -> tuple:
    mask = font.image.getmask(MISSING)
    return mask.size, bytes(mask)


def test_each_drawn_character_is_a_glyph_of_its_font_not_notdef():
    """The coverage decision, per glyph: every character of a drawn line has a glyph in the font that draws it
    (the font's character map), and its rendering is not that font's .notdef box."""
    names = ["background", "歩行者", "سيارة", "道路 (road)"]
    for line in previews.legend_lines(_label(), names):
        assert line.drawn_name, line.text
        tofu = _notdef(line.font)
        for ch in line.text:
            if ch.isspace() or ch == "\u200e":  # the left-to-right mark after an Arabic name draws nothing
                continue
            assert ord(ch) in line.font.codepoints, (line.text, ch, line.font.path)
            mask = line.font.image.getmask(ch)
            assert (mask.size, bytes(mask)) != tofu, (line.text, ch, line.font.path)


def test_the_legend_says_what_it_cannot_draw(tmp_path):
    """An emoji (🚗) and Thai are in no legend font: the line gives the class id and says its name cannot be drawn,
    naming the characters, instead of drawing boxes; the other names are drawn."""
    names = ["background", "歩行者", "🚗", "ไทย"]
    lines = {line.class_id: line for line in previews.legend_lines(_label(), names)}
    assert lines[1].drawn_name and lines[1].text == "1 歩行者  25.0%"
    assert not lines[2].drawn_name and lines[2].text == "2 (name not drawable in this font: U+1F697)  25.0%"
    assert not lines[3].drawn_name and lines[3].text == "3 (name not drawable in this font: U+0E17 U+0E22 U+0E44)  25.0%"
    for line in lines.values():  # the notes themselves are drawable
        assert all(ord(c) in line.font.codepoints for c in line.text if not c.isspace())
    # The picture: the emoji's line is the note, not a box; two different emoji give two different notes.
    assert not np.array_equal(_preview(tmp_path, names, "car"), _preview(tmp_path, ["background", "歩行者", "🚲", "ไทย"], "bike"))


@pytest.fixture
def no_raqm(monkeypatch):
    """Pillow without raqm/FriBiDi (FriBiDi is loaded from the system at run time): basic layout only."""
    previews._legend_font.cache_clear()
    monkeypatch.setattr(previews, "complex_layout", lambda: False)
    yield
    previews._legend_font.cache_clear()


def test_without_raqm_a_right_to_left_name_is_said_not_drawable(no_raqm):
    """Basic layout draws Arabic unshaped and in the wrong order: such a name is replaced by the note; Japanese,
    which needs no shaping, is drawn."""
    lines = {line.class_id: line for line in previews.legend_lines(_label(), ["background", "歩行者", "سيارة", "道路"])}
    assert lines[1].drawn_name and lines[3].drawn_name
    assert not lines[2].drawn_name
    assert lines[2].text == "2 (name not drawable in this font: right-to-left, and Pillow has no raqm layout here)  25.0%"
    png = previews.render_overlay(np.zeros((40, 48, 3), np.uint8), _label(), ["background", "歩行者", "سيارة", "道路"])
    assert Image.open(io.BytesIO(png)).size[1] > 40


def test_latin_names_keep_one_font_and_unknown_ids_are_named():
    """Latin names (and an id beyond the checkpoint's names) are drawn by the first font, DejaVu Sans."""
    lines = previews.legend_lines(_label(), ["background", "car", "Straße"])
    assert [line.text for line in lines] == ["0 background  25.0%", "1 car  25.0%", "2 Straße  25.0%",
                                             "3 class 3  25.0%"]
    assert {os.path.basename(line.font.path) for line in lines} == {"DejaVuSans.ttf"}


def test_a_name_with_newlines_or_of_any_length_is_one_short_legend_line(tmp_path):
    """A class name with a newline made Pillow refuse the whole preview ("can't measure length of multiline text"),
    and a 200,000-character name drew a legend 1.4 million pixels wide: names are one line of at most 48 characters."""
    lines = previews.legend_lines(_label(), ["background", "a\nb\tc", "x" * 200_000, "  "])
    assert [line.text for line in lines[:2]] == ["0 background  25.0%", "1 a b c  25.0%"]
    assert lines[2].text == f"2 {'x' * 47}\u2026  25.0%"
    shown = _preview(tmp_path, ["background", "a\nb\nc", "x" * 200_000, "road"], "odd")
    assert shown.shape[1] < 2_000, shown.shape
