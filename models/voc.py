"""PASCAL VOC class names and colour palette, and the bounds of a uint8 class id: the one place they are defined."""
from __future__ import annotations

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
VOID_LABEL = 255
# Label maps and masks hold class ids as uint8 (255 = void in masks): at most 256 classes, for training and labeling.
MAX_CLASSES = 256


def voc_palette(n: int = MAX_CLASSES) -> list[tuple[int, int, int]]:
    """The VOC colour map (bit-interleaved class id), as used by VOC's SegmentationClass PNGs.

    Entry 255 (void) is (224, 224, 192), as in the dataset.
    """
    palette = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append((r, g, b))
    return palette


def flat_palette() -> list[int]:
    """Palette as the flat 768-int list Pillow's `Image.putpalette` takes."""
    return [v for rgb in voc_palette(MAX_CLASSES) for v in rgb]
