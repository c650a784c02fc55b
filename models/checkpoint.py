"""Checkpoint format: weights plus everything inference needs, loadable without unpickling objects.

A checkpoint is a `torch.save`d dict of plain types and tensors only, so `torch.load(weights_only=True)`
reads it. Keys: format, version, config (ModelConfig), class_names, input (InputConvention), metadata
(JSON text: epoch, metrics, ...), state_dict.

A loaded checkpoint travels between processes as `shippable` makes it (plain types and numpy arrays, which
Ray's object store holds zero-copy) and is rebuilt by `from_shippable`.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .build import ModelConfig, build_model
from .convention import InputConvention
from .layers import ModelConfigError
from .storage_io import read_bytes, write_bytes_atomic

FORMAT = "fcn-segmentation-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, foreign or does not match what was asked for."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model in eval mode and what it needs at inference time."""

    model: nn.Module
    config: ModelConfig
    class_names: list[str]
    convention: InputConvention
    metadata: dict = field(default_factory=dict)
    model_id: str = ""
    uri: str = ""


def _payload(model: nn.Module, class_names: list[str], convention: InputConvention, metadata: dict | None) -> dict:
    config = ModelConfig.of(model)
    if len(class_names) != config.num_classes:
        raise ModelConfigError(f"{len(class_names)} class names for a model with {config.num_classes} classes")
    # DDP wraps the model as `module.`; store the plain names so any loader finds them.
    state = {k.removeprefix("module."): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": config.to_dict(),
        "class_names": [str(c) for c in class_names],
        "input": convention.to_dict(),
        "metadata": json.dumps(metadata or {}, sort_keys=True),
        "state_dict": state,
    }


def checkpoint_bytes(model: nn.Module, *, class_names: list[str], convention: InputConvention,
                     metadata: dict | None = None) -> bytes:
    """Serialise a checkpoint to bytes (for callers that hand the bytes to another writer)."""
    buf = io.BytesIO()
    torch.save(_payload(model, list(class_names), convention, metadata), buf)
    return buf.getvalue()


def save_checkpoint(uri: str, model: nn.Module, *, class_names: list[str], convention: InputConvention,
                    metadata: dict | None = None) -> str:
    """Write a checkpoint to a local path or URI (atomically) and return its model id."""
    data = checkpoint_bytes(model, class_names=class_names, convention=convention, metadata=metadata)
    write_bytes_atomic(uri, data)
    return model_id_of(data)


def model_id_of(data: bytes) -> str:
    """Stable id of a checkpoint's content: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(data).hexdigest()[:16]


def read_checkpoint_payload(uri: str) -> tuple[dict, str]:
    """Read and validate a checkpoint's dict without building the model. Returns (payload, model_id)."""
    return parse_checkpoint(read_model_file(uri), uri)


def read_model_file(uri: str, what: str = "checkpoint") -> bytes:
    """The bytes of a model file; CheckpointError names `what` and the problem when it cannot be read."""
    try:
        data = read_bytes(uri)
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {uri}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{what} {uri} is a directory, not a file") from None
    except PermissionError:
        raise CheckpointError(f"{what} {uri} cannot be read: permission denied") from None
    return data


def parse_checkpoint(data: bytes, uri: str) -> tuple[dict, str]:
    """Validate checkpoint bytes (errors name `uri`). Returns (payload, model_id)."""
    if not data:
        raise CheckpointError(f"checkpoint {uri} is empty (0 bytes)")
    if not data.startswith(b"PK"):  # torch.save writes a zip archive
        raise CheckpointError(f"checkpoint {uri} is not a torch file (no zip archive header)")
    # SHA-256 of a full-width model (~540 MB) takes as long as unpickling it; hashlib releases the GIL.
    with ThreadPoolExecutor(max_workers=1) as pool:
        model_id = pool.submit(model_id_of, data)
        payload = _unpickle(data, uri)
    _check_payload(payload, uri)
    return payload, model_id.result()


def _unpickle(data: bytes, uri: str):
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"checkpoint {uri} holds Python objects other than tensors and plain types; "
                              "refusing to unpickle it (not a checkpoint written by this project)") from None
    except Exception as e:  # noqa: BLE001 - torch reports a damaged archive as one of many types; named in the message
        raise CheckpointError(f"checkpoint {uri} is truncated or corrupt ({type(e).__name__})") from None


def _check_payload(payload, uri: str) -> None:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        keys = sorted(payload)[:5] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"checkpoint {uri} is not an FCN checkpoint of this project (found {keys}); "
                              "use models.save_checkpoint, or init_backbone for VGG16 weights")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {uri} has format version {payload.get('version')}, this code reads {VERSION}")


def load_checkpoint(uri: str, *, map_location: str | torch.device = "cpu", num_classes: int | None = None) -> Checkpoint:
    """Load a checkpoint from a local path or URI into a ready model (eval mode).

    Raises CheckpointError with the file and the problem for a missing, empty, truncated, foreign or
    mismatched file, or when `num_classes` is given and differs from the checkpoint's.
    """
    return load_checkpoint_bytes(read_model_file(uri), uri, map_location=map_location, num_classes=num_classes)


def load_checkpoint_bytes(data: bytes, uri: str, *, map_location: str | torch.device = "cpu",
                          num_classes: int | None = None) -> Checkpoint:
    """`load_checkpoint` on bytes already in memory (errors name `uri`)."""
    payload, model_id = parse_checkpoint(data, uri)
    try:
        config = ModelConfig(**payload["config"])
        convention = InputConvention.from_dict(payload["input"])
        class_names = list(payload["class_names"])
        metadata = json.loads(payload["metadata"])
        state = payload["state_dict"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {uri} has a malformed header ({type(e).__name__}: {e})") from None
    if len(class_names) != config.num_classes:
        raise CheckpointError(f"checkpoint {uri} names {len(class_names)} classes but its model predicts "
                              f"{config.num_classes}; the class names do not belong to these weights")
    if num_classes is not None and num_classes != config.num_classes:
        raise CheckpointError(f"checkpoint {uri} predicts {config.num_classes} classes, but {num_classes} were asked for")
    model = build_from_state(config, state, uri)
    model.to(map_location).eval()
    return Checkpoint(model, config, class_names, convention, metadata, model_id, uri)


def build_from_state(config: ModelConfig, state: dict[str, torch.Tensor], uri: str = "<state dict>") -> nn.Module:
    """The architecture of `config` holding `state` as its weights.

    Built on the meta device and assigned (no random initialisation to throw away: ~1 s saved for the
    full-width FCN-8s). Raises CheckpointError naming `uri` when the weights do not fit the architecture.
    """
    with torch.device("meta"):
        model = build_model(config.arch, config.num_classes, width_mult=config.width_mult, padding=config.padding)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"missing {', '.join(missing[:3])}" if missing else "",
                 f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
                 f"shape mismatch in {', '.join(wrong[:3])}" if wrong else ""]
        raise CheckpointError(f"checkpoint {uri}: weights do not match {config.arch} (num_classes={config.num_classes}, "
                              f"width_mult={config.width_mult}): {'; '.join(p for p in parts if p)}")
    model.load_state_dict(state, assign=True)
    return model


def init_from_checkpoint(model: nn.Module, uri: str) -> list[str]:
    """Staged training: initialise `model` (e.g. FCN-16s) from a previous stage's checkpoint (FCN-32s).

    The checkpoint must have the same num_classes, width and padding. Returns the copied tensor names.
    """
    from .surgery import init_from_stage

    payload, _ = read_checkpoint_payload(uri)
    src = ModelConfig(**payload["config"])
    dst = ModelConfig.of(model)
    for attr in ("num_classes", "width_mult", "padding"):
        if getattr(src, attr) != getattr(dst, attr):
            raise CheckpointError(f"checkpoint {uri} has {attr}={getattr(src, attr)}, "
                                  f"but the {dst.arch} being initialised has {attr}={getattr(dst, attr)}")
    try:
        return init_from_stage(model, payload["state_dict"])
    except ValueError as e:
        raise CheckpointError(f"checkpoint {uri}: {e}") from None


def shippable(ck: Checkpoint) -> dict:
    """A loaded checkpoint as plain types and numpy arrays: Ray's object store holds the arrays zero-copy,
    so inference actors get the weights without re-reading, re-hashing or unpickling the file."""
    return {"config": ck.config.to_dict(), "class_names": list(ck.class_names), "input": ck.convention.to_dict(),
            "model_id": ck.model_id, "uri": ck.uri,
            "state": {k: v.detach().cpu().numpy() for k, v in ck.model.state_dict().items()}}


def from_shippable(d: dict, map_location: str = "cpu") -> Checkpoint:
    """The inverse of `shippable` (weights copied out of the read-only shared memory)."""
    config = ModelConfig(**d["config"])
    state = {k: torch.from_numpy(np.array(v)) for k, v in d["state"].items()}
    model = build_from_state(config, state, d["uri"]).to(map_location).eval()
    return Checkpoint(model, config, list(d["class_names"]), InputConvention.from_dict(d["input"]), {},
                      d["model_id"], d["uri"])
