"""What a training run has durably completed, read from its storage directory.

Layout under `<storage>/<name>/` (Ray Train's run directory):
    epoch_0003/model.pt         the FCN checkpoint (models.load_checkpoint reads it; labeling uses it as is)
    epoch_0003/train_state.pt   optimizer, schedule step, history: what resuming needs
    epoch_0003/state.json       epoch, metrics and the byte sizes of the two files (completeness check)
    ledger/epoch_0003-<attempt>.json   one file each time an epoch was committed (proof of exactly once)

A checkpoint directory counts only when all three files are there at their recorded sizes. Ray Train can
lose a checkpoint reported just before a worker died (its upload finished, its registration did not); the
scan still finds it, so that epoch is neither lost nor trained again.
"""
from __future__ import annotations

import json
import re
import uuid

from .storage import filesystem, join, normalize, read_bytes, write_bytes

EPOCH_DIR = re.compile(r"^epoch_(\d{4,})$")
MODEL_FILE, STATE_FILE, META_FILE = "model.pt", "train_state.pt", "state.json"


def epoch_dir_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def run_uri(storage: str, name: str) -> str:
    return join(normalize(storage), name)


def _meta(run: str, dirname: str) -> dict | None:
    try:
        meta = json.loads(read_bytes(join(run, dirname, META_FILE)))
    except (FileNotFoundError, ValueError):
        return None
    fs, _ = filesystem(run)
    for fname, key in ((MODEL_FILE, "model_bytes"), (STATE_FILE, "state_bytes")):
        _, path = filesystem(join(run, dirname, fname))
        try:
            if fs.size(path) != meta[key]:
                return None
        except (FileNotFoundError, KeyError):
            return None
    return meta


def scan_checkpoints(run: str) -> list[dict]:
    """Complete checkpoints of a run, oldest epoch first: {epoch, uri (dir), model_uri, metrics}."""
    fs, path = filesystem(run)
    try:
        fs.invalidate_cache()
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        m = EPOCH_DIR.match(name)
        if not m:
            continue
        meta = _meta(run, name)
        if meta is None or meta.get("epoch") != int(m.group(1)):
            continue
        found.append({"epoch": meta["epoch"], "uri": join(run, name), "model_uri": join(run, name, MODEL_FILE),
                      "metrics": meta.get("metrics", {})})
    return sorted(found, key=lambda c: c["epoch"])


def write_ledger(run: str, epoch: int, attempt: str, metrics: dict) -> None:
    record = {"epoch": epoch, "attempt": attempt, "metrics": metrics}
    write_bytes(join(run, "ledger", f"{epoch_dir_name(epoch)}-{attempt}.json"), json.dumps(record).encode())


def ledger(run: str) -> list[dict]:
    """Every committed-epoch record of the run, by epoch (duplicates would mean an epoch ran twice)."""
    fs, path = filesystem(join(run, "ledger"))
    try:
        fs.invalidate_cache()
        names = sorted(fs.ls(path, detail=False))
    except FileNotFoundError:
        return []
    out = [json.loads(read_bytes(join(run, "ledger", n.rsplit("/", 1)[-1]))) for n in names if n.endswith(".json")]
    return sorted(out, key=lambda r: r["epoch"])


def new_attempt_id() -> str:
    return uuid.uuid4().hex[:12]
