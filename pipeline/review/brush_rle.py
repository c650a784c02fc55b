"""Label Studio's brush RLE (`value.format = "rle"` of a `brushlabels` region), in numpy.

The format run-length codes the bytes of an RGBA image (width x height x 4) in a bit stream: a 32-bit value count,
a 5-bit word size minus one, four 4-bit run-length field sizes minus one, then codes of
`flag(1) size_index(2) length-1(rle_sizes[size_index]) value(word_size)` (flag 1: one value repeated; flag 0: that
many literal values), zero-padded to whole bytes. label-studio-sdk's `converter.brush` reads and writes it in pure
Python, one character per bit; the encoder here writes the very same bytes (tests/test_review_formats.py compares
them) at numpy speed, and the decoder reads any valid stream, the tool's own literal runs included.
"""
from __future__ import annotations

import numpy as np

WORD_SIZE = 8
RLE_SIZES = (3, 4, 8, 16)
_LONGEST = 2 ** RLE_SIZES[-1]


class BrushRLEError(ValueError):
    """A brush RLE stream that cannot be decoded, or decodes to another size than its region says."""


def encode_mask(mask: np.ndarray) -> list[int]:
    """A (height, width) bool or 0/1 mask -> Label Studio brush RLE (its RGBA is 255 in all four channels where the
    mask is set), as the list of byte values that label-studio-sdk's `mask2rle(mask * 255)` returns."""
    values = np.repeat(np.where(np.asarray(mask).ravel() != 0, 255, 0).astype(np.uint8), 4)
    return encode(values)


def encode(values: np.ndarray) -> list[int]:
    """A flat uint8 array -> brush RLE byte values (label-studio-sdk `encode_rle`'s exact output)."""
    n = len(values)
    if n == 0:
        raise BrushRLEError("an empty mask has no brush RLE")
    ends = np.append(np.flatnonzero(values[1:] != values[:-1]), n - 1)
    lengths = np.diff(np.append(-1, ends)).astype(np.int64)
    run_values = values[ends].astype(np.int64)
    # A run longer than 2**16 is written as full 2**16 chunks, then its rest with the 16-bit field (as the SDK does).
    long_run = lengths > _LONGEST
    if long_run.any():
        full = np.where(long_run, (lengths - 1) // _LONGEST, 0)
        repeat = full + 1
        run_values = np.repeat(run_values, repeat)
        first = np.cumsum(repeat) - repeat
        chunk = np.arange(int(repeat.sum())) - np.repeat(first, repeat)
        total = np.repeat(lengths, repeat)
        lengths = np.where(chunk < np.repeat(full, repeat), _LONGEST, total - np.repeat(full, repeat) * _LONGEST)
        forced16 = np.repeat(long_run, repeat)
    else:
        forced16 = np.zeros(len(lengths), bool)
    size_index = np.select([lengths <= 8, lengths <= 16, lengths <= 256], [0, 1, 2], 3)
    size_index[forced16] = 3
    field = np.asarray(RLE_SIZES, np.int64)[size_index]
    flag = (lengths > 1).astype(np.int64)
    codes = (flag << (2 + field + WORD_SIZE)) | (size_index << (field + WORD_SIZE)) | ((lengths - 1) << WORD_SIZE) | run_values
    widths = 1 + 2 + field + WORD_SIZE
    header = (n << 21) | ((WORD_SIZE - 1) << 16) | sum((s - 1) << (12 - 4 * i) for i, s in enumerate(RLE_SIZES))
    codes = np.concatenate([[header], codes]).astype(np.uint64)
    widths = np.concatenate([[32 + 5 + 16], widths])
    bits = _bits(codes, widths)
    pad = 8 - len(bits) % 8  # the SDK pads a whole zero byte when the stream already ends on a byte
    bits = np.concatenate([bits, np.zeros(pad, np.uint8)])
    return np.packbits(bits).tolist()


def _bits(codes: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Each code's low `width` bits, most significant first, concatenated."""
    owner = np.repeat(np.arange(len(codes)), widths)
    start = np.cumsum(widths) - widths
    shift = (widths[owner] - 1 - (np.arange(int(widths.sum())) - start[owner])).astype(np.uint64)
    return ((codes[owner] >> shift) & np.uint64(1)).astype(np.uint8)


def decode(rle, expected: int | None = None) -> np.ndarray:
    """Brush RLE byte values -> the flat uint8 array it codes (RGBA bytes for an image). With `expected`, a
    stream whose header codes another count is refused before anything is allocated."""
    try:
        data = bytes(rle)
    except (TypeError, ValueError):
        raise BrushRLEError("brush RLE must be a list of byte values (0-255)") from None
    nbits = len(data) * 8
    bits = bin(int.from_bytes(data, "big"))[2:].zfill(nbits) if data else ""
    pos = 0

    def read(size: int) -> int:
        nonlocal pos
        if pos + size > nbits:
            raise BrushRLEError(f"brush RLE ends early (bit {pos} of {nbits})")
        pos += size
        return int(bits[pos - size:pos], 2) if size else 0

    num = read(32)
    if expected is not None and num != expected:
        raise BrushRLEError(f"brush RLE codes {num} values, but the region's size has {expected}")
    word = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(num, np.uint8)
    i = 0
    while i < num:
        repeated = read(1)
        j = i + 1 + read(sizes[read(2)])
        if j > num:
            raise BrushRLEError(f"brush RLE codes more than its {num} values")
        if repeated:
            out[i:j] = read(word)
        else:
            for k in range(i, j):
                out[k] = read(word)
        i = j
    return out


def decode_mask(rle, width: int, height: int) -> np.ndarray:
    """A brushlabels region's RLE -> its (height, width) bool mask (the alpha channel); BrushRLEError when the
    stream codes another number of values than width x height x 4."""
    try:
        flat = decode(rle, width * height * 4)
    except BrushRLEError as e:
        raise BrushRLEError(str(e).replace("the region's size has", f"{width}x{height} RGBA has")) from None
    return flat.reshape(height, width, 4)[:, :, 3] > 127
