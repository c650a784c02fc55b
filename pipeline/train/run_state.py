"""What a training run has durably completed, read from its storage directory.

Layout under `<storage>/<name>/` (Ray Train's run directory):
    epoch_0003/model.pt         the FCN checkpoint (models.load_checkpoint reads it; labeling uses it as is)
    epoch_0003/train_state.pt   optimizer, schedule step, history: what resuming needs
    epoch_0003/state.json       epoch, metrics, the config, the byte sizes and SHA-256 of the two files
    ledger/epoch_0003-<attempt>.json   one file each time an epoch was committed (proof of exactly once)

A checkpoint directory counts only when all three files are there at their recorded sizes; before resuming
from one, its files' hashes are checked too (two runs writing one folder would mix files of equal size; the
run lease prevents that, the hashes catch it). Ray Train can lose a checkpoint reported just before a worker
died (its upload finished, its registration did not); the scan still finds it, so that epoch is neither lost
nor trained again.
"""
from __future__ import annotations

import hashlib
import json
import re
import uuid

from ..storage import Location

EPOCH_DIR = re.compile(r"^epoch_(\d{4,})$")
MODEL_FILE, STATE_FILE, META_FILE = "model.pt", "train_state.pt", "state.json"


def epoch_dir_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def run_location(storage: str, name: str) -> Location:
    """The run directory `<storage>/<name>`, resolved once."""
    return Location.of(storage).child(name)


def _meta(epoch_dir: Location) -> dict | None:
    try:
        meta = json.loads(epoch_dir.child(META_FILE).read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    for fname, key in ((MODEL_FILE, "model_bytes"), (STATE_FILE, "state_bytes")):
        try:
            if epoch_dir.fs.size(epoch_dir.child(fname).path) != meta[key]:
                return None
        except (FileNotFoundError, KeyError):
            return None
    return meta


def scan_checkpoints(run: Location) -> list[dict]:
    """Complete checkpoints of a run, oldest epoch first: {epoch, uri (dir), model_uri, metrics, meta}."""
    try:
        run.fs.invalidate_cache()
        entries = run.fs.ls(run.path, detail=False)
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        m = EPOCH_DIR.match(name)
        if not m:
            continue
        epoch_dir = run.child(name)
        meta = _meta(epoch_dir)
        if meta is None or meta.get("epoch") != int(m.group(1)):
            continue
        found.append({"epoch": meta["epoch"], "uri": epoch_dir.uri, "model_uri": epoch_dir.child(MODEL_FILE).uri,
                      "metrics": meta.get("metrics", {}), "meta": meta})
    return sorted(found, key=lambda c: c["epoch"])


def verify_checkpoint(run: Location, checkpoint: dict) -> bool:
    """The files of a scanned checkpoint hash to what its state.json recorded (true for checkpoints written
    before hashes were recorded)."""
    meta, epoch_dir = checkpoint["meta"], run.child(epoch_dir_name(checkpoint["epoch"]))
    for fname, key in ((MODEL_FILE, "model_sha256"), (STATE_FILE, "state_sha256")):
        if key in meta and hashlib.sha256(epoch_dir.child(fname).read_bytes()).hexdigest() != meta[key]:
            return False
    return True


def stored_config(checkpoint: dict) -> dict | None:
    """The training config a scanned checkpoint was written with (state.json; older runs: model.pt's metadata)."""
    if "train_config" in checkpoint["meta"]:
        return checkpoint["meta"]["train_config"]
    from models import read_checkpoint_payload

    payload, _ = read_checkpoint_payload(checkpoint["model_uri"])
    return json.loads(payload["metadata"]).get("train_config")


def write_ledger(run: Location, epoch: int, attempt: str, metrics: dict) -> None:
    record = {"epoch": epoch, "attempt": attempt, "metrics": metrics}
    run.child("ledger", f"{epoch_dir_name(epoch)}-{attempt}.json").write_bytes(json.dumps(record).encode())


def ledger(run: Location) -> list[dict]:
    """Every committed-epoch record of the run, by epoch (duplicates would mean an epoch ran twice)."""
    folder = run.child("ledger")
    try:
        folder.fs.invalidate_cache()
        names = sorted(folder.fs.ls(folder.path, detail=False))
    except FileNotFoundError:
        return []
    out = [json.loads(folder.child(n.rsplit("/", 1)[-1]).read_bytes()) for n in names if n.endswith(".json")]
    return sorted(out, key=lambda r: r["epoch"])


def new_attempt_id() -> str:
    return uuid.uuid4().hex[:12]
