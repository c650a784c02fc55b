"""Decoding every image kind to RGB uint8, masks to class ids, and rejecting broken files with a reason."""
import time

import numpy as np
import pytest
from PIL import Image

from pipeline.decode import DecodeError, decode_image, decode_mask
from tests.images import broken_files, encode, exif_rotated_jpeg, gradient_rgb, huge_declared_png, palette_mask, png16_rgb, truncated

H, W = 24, 32


def _close(a, b, tol):
    return np.abs(a.astype(int) - b.astype(int)).mean() <= tol


def test_rgb_formats_round_trip():
    rgb = gradient_rgb(H, W)
    for fmt, kw, tol in [("PNG", {}, 0), ("BMP", {}, 0), ("TIFF", {}, 0), ("WEBP", {"lossless": True}, 0),
                         ("JPEG", {"quality": 95}, 6)]:
        out = decode_image(encode(rgb, fmt, **kw))
        assert out.shape == (H, W, 3) and out.dtype == np.uint8, fmt
        assert _close(out, rgb, tol), fmt


def test_grayscale_palette_rgba_cmyk():
    gray = gradient_rgb(H, W)[:, :, 0]
    out = decode_image(encode(gray, "PNG"))
    assert out.shape == (H, W, 3) and np.array_equal(out[:, :, 0], gray) and np.array_equal(out[:, :, 2], gray)
    out = decode_image(encode(Image.fromarray(gray).convert("L"), "JPEG", quality=95))
    assert out.shape == (H, W, 3)

    pal = Image.fromarray(gradient_rgb(H, W)).convert("P", palette=Image.ADAPTIVE, colors=16)
    out = decode_image(encode(pal, "PNG"))
    assert np.array_equal(out, np.asarray(pal.convert("RGB")))

    rgba = np.dstack([gradient_rgb(H, W), np.full((H, W), 128, np.uint8)])
    out = decode_image(encode(rgba, "PNG"))
    assert np.array_equal(out, rgba[:, :, :3])

    cmyk = Image.fromarray(gradient_rgb(H, W)).convert("CMYK")
    for fmt in ("JPEG", "TIFF"):
        out = decode_image(encode(cmyk, fmt))
        assert out.shape == (H, W, 3) and _close(out, np.asarray(cmyk.convert("RGB")), 8), fmt


def test_16_bit_inputs():
    gray16 = (np.arange(H * W).reshape(H, W) * 80).astype(np.uint16)
    out = decode_image(encode(gray16, "PNG"))
    assert out.shape == (H, W, 3) and np.array_equal(out[:, :, 1], (gray16 >> 8).astype(np.uint8))
    rgb16 = (gradient_rgb(H, W).astype(np.uint16) * 257)
    out = decode_image(png16_rgb(rgb16))
    assert out.shape == (H, W, 3) and _close(out, gradient_rgb(H, W), 1)


def test_exif_orientation_is_applied():
    arr = gradient_rgb(H, W)
    arr[:4, :4] = 255  # a marker in the stored top-left corner
    data = exif_rotated_jpeg(arr, orientation=6)  # "rotate 90 CW to display"
    out = decode_image(data)
    assert out.shape == (W, H, 3)
    # Stored top-left ends up top-right after a 90-degree clockwise rotation.
    assert out[:4, -4:].mean() > 200 and out[-4:, :4].mean() < 200


def test_pixel_limit_rejects_before_decoding():
    data = encode(gradient_rgb(H, W), "PNG")
    assert decode_image(data, max_pixels=H * W).shape == (H, W, 3)
    with pytest.raises(DecodeError, match="over the"):
        decode_image(data, max_pixels=H * W - 1)
    start = time.perf_counter()
    with pytest.raises(DecodeError, match=r"100000x100000 \(10000.0 MP\)"):
        decode_image(huge_declared_png())
    assert time.perf_counter() - start < 2  # never decoded: a real 10 GP decode would take minutes


@pytest.mark.parametrize("name,reason", [("truncated.jpg", "truncated or corrupt"), ("zero.jpg", "empty file"),
                                         ("notes.jpg", "not a recognised image"), ("bomb.png", "over the")])
def test_broken_files_have_a_reason(name, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_image(broken_files(H, W)[name])


def test_truncated_png_and_wrong_extension():
    with pytest.raises(DecodeError, match="truncated or corrupt"):
        decode_image(truncated(encode(gradient_rgb(64, 64), "PNG")))
    # A PNG saved under a .jpg name decodes by content: the extension is not trusted.
    assert decode_image(encode(gradient_rgb(H, W), "PNG")).shape == (H, W, 3)


def test_masks_stay_class_ids():
    mask = np.zeros((H, W), np.uint8)
    mask[5:10, 5:20] = 3
    mask[10:12, 5:20] = 255
    assert np.array_equal(decode_mask(palette_mask(mask)), mask)
    assert np.array_equal(decode_mask(encode(mask, "PNG")), mask)  # grayscale mask
    with pytest.raises(DecodeError, match="single-channel"):
        decode_mask(encode(gradient_rgb(H, W), "PNG"))
    with pytest.raises(DecodeError, match="fit 0..255"):
        decode_mask(encode(np.full((H, W), 300, np.uint16), "PNG"))
