"""Arrow columns to and from numpy without a Python object per row: canvases and label maps are hundreds of KB
each, and at GPU rates every copy and every `to_pylist` shows in the actor's host time (docs/labeling.md "Inference").

numpy and pyarrow only (the decode tasks use it and must not import torch).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# One chunk of a binary column holds at most this many bytes (int32 offsets).
_MAX_CHUNK_BYTES = 2**31 - 1


def binary_views(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray | None]:
    """Each cell of a binary column as a read-only uint8 view of Arrow's buffer (None for a null), no copy."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out: list[np.ndarray | None] = []
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        _, offsets_buf, data_buf = chunk.buffers()
        offset_type = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        offsets = np.frombuffer(offsets_buf, offset_type)[chunk.offset:chunk.offset + len(chunk) + 1]
        data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        out.extend(data[offsets[i]:offsets[i + 1]] if valid[i] else None for i in range(len(chunk)))
    return out


def binary_column(cells: list[np.ndarray | None]) -> pa.ChunkedArray:
    """A binary column from numpy arrays (their bytes, C order) or None for nulls: one copy of each cell into
    the column's buffer, in chunks of at most 2 GiB (int32 offsets)."""
    chunks, start, size = [], 0, 0
    for i, cell in enumerate(cells):
        nbytes = 0 if cell is None else cell.nbytes
        if i > start and size + nbytes > _MAX_CHUNK_BYTES:
            chunks.append(_binary_chunk(cells[start:i]))
            start, size = i, 0
        size += nbytes
    chunks.append(_binary_chunk(cells[start:]))
    return pa.chunked_array(chunks, pa.binary())


def _binary_chunk(cells: list[np.ndarray | None]) -> pa.Array:
    n = len(cells)
    lengths = np.array([0 if c is None else c.nbytes for c in cells], np.int64)
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    parts = [np.ascontiguousarray(c).reshape(-1).view(np.uint8) for c in cells if c is not None and c.nbytes]
    # One cell (a large image's canvas or label map): its own buffer, not a copy (Arrow keeps the array alive).
    data = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    valid = np.array([c is not None for c in cells], bool)
    bitmap = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(pa.binary(), n, [bitmap, pa.py_buffer(offsets), pa.py_buffer(data)],
                                 null_count=int(n - valid.sum()))


def list_column(arrays: list[np.ndarray], type_: pa.DataType) -> pa.Array:
    """A list column from per-row numpy arrays, without going through Python objects."""
    value_type = type_.value_type
    lengths = np.array([len(a) for a in arrays], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                    pa.array(values.astype(value_type.to_pandas_dtype()), value_type))


def list_values(column: pa.ChunkedArray | pa.Array, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(every row's values concatenated as one numpy array, per-row lengths); a null row counts as empty."""
    lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return values, lengths


def list_from_values(values: np.ndarray, lengths: np.ndarray, type_: pa.DataType) -> pa.Array:
    """The inverse of `list_values`: a list column whose row i holds the next lengths[i] values."""
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, type_.value_type))
