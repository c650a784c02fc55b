"""One writer per folder: a lease file created exclusively, kept alive by a heartbeat, void once it goes stale.

    with Lease.acquire(folder, holder="run 20261126T0100Z-ab12cd", what="training run s3://b/runs/x"):
        ...  # nobody else holds `folder` meanwhile

The lease is `<folder>/_lease.json`, created with an exclusive create (locally: a hard link of a complete
temporary file, which fails if the name exists; on S3: a conditional PUT, `If-None-Match: *`). A thread rewrites
it every `ttl_s / 4` seconds; its modification time (the store's clock) is the heartbeat. A lease whose heartbeat
is older than `ttl_s` belongs to a holder that died: the next run deletes it and takes its own. Releasing a lease
that is already gone (or was taken over) is not an error.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from .errors import JobError
from .storage import Location, storage_error

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
DEFAULT_TTL_S = 600.0


class LeaseHeld(JobError):
    """Another live holder has the lease (the message names it and for how long)."""


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600} h {seconds // 60 % 60} min" if seconds >= 3600 else f"{seconds // 60} min {seconds % 60} s"


class Lease:
    def __init__(self, location: Location, record: dict, ttl_s: float):
        self.location, self.record, self.ttl_s = location, record, ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)

    # ------------------------------------------------------------------------------------------ acquire

    @classmethod
    def acquire(cls, folder: Location, *, holder: str, what: str, ttl_s: float = DEFAULT_TTL_S) -> Lease:
        """Take the lease of `folder` or raise LeaseHeld naming the live holder."""
        location = folder.child(LEASE_FILE)
        record = {"holder": holder, "id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                  "acquired_at": datetime.now(timezone.utc).isoformat(), "ttl_s": ttl_s}
        data = json.dumps(record, indent=1).encode()
        for _ in range(2):  # a stale lease is removed once, then the create is tried again
            if _create_exclusive(location, data):
                lease = cls(location, record, ttl_s)
                lease._thread.start()
                return lease
            current, heartbeat_age = _read(location)
            if current is None:  # released between our create and our read
                continue
            if heartbeat_age <= ttl_s:
                held_for = _held_for(current)
                raise LeaseHeld(f"{what} is in use by {current.get('holder', 'another run')} (host "
                                f"{current.get('host', '?')}, pid {current.get('pid', '?')}), which has held it for "
                                f"{held_for}; a holder that died frees it {_age(ttl_s)} after its last heartbeat "
                                f"({_age(heartbeat_age)} ago)")
            log.warning("taking over the lease of %s from %s: no heartbeat for %s", folder.uri,
                        current.get("holder", "a dead run"), _age(heartbeat_age))
            _remove(location)
        raise LeaseHeld(f"{what}: another run took the lease at the same moment")

    # ------------------------------------------------------------------------------------ hold and release

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                current, _ = _read(self.location)
                if current is None or current.get("id") != self.record["id"]:
                    log.error("lost the lease of %s (taken over after a stall)", self.location.uri)
                    return
                self.location.write_bytes(json.dumps(self.record, indent=1).encode())
            except Exception as e:  # noqa: BLE001 - a missed beat is retried; the lease lives ttl_s
                log.warning("lease heartbeat of %s failed: %s", self.location.uri, e)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours; a lease already gone is fine."""
        self._stop.set()
        try:
            current, _ = _read(self.location)
            if current is not None and current.get("id") == self.record["id"]:
                _remove(self.location)
        except Exception as e:  # noqa: BLE001 - ending a run never fails on its lease
            log.warning("could not release the lease %s: %s", self.location.uri, e)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _held_for(record: dict) -> str:
    try:
        return _age(time.time() - datetime.fromisoformat(record["acquired_at"]).timestamp())
    except (KeyError, ValueError):
        return "an unknown time"


def _create_exclusive(location: Location, data: bytes) -> bool:
    """Create the file with `data` unless it exists; True when this call created it."""
    try:
        if location.is_local:
            os.makedirs(os.path.dirname(location.path), exist_ok=True)
            tmp = f"{location.path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, location.path)  # fails if the name exists; readers never see a partial file
            finally:
                os.unlink(tmp)
        else:
            location.fs.pipe_file(location.path, data, mode="create")  # S3: If-None-Match: *
        return True
    except FileExistsError:
        return False
    except Exception as e:
        raise storage_error(location.uri, e) from None


def _read(location: Location) -> tuple[dict | None, float]:
    """(record, seconds since its last heartbeat), or (None, 0) when there is no lease."""
    try:
        location.fs.invalidate_cache()
        info = location.fs.info(location.path)
        record = json.loads(location.read_bytes())
    except FileNotFoundError:
        return None, 0.0
    except ValueError:  # unreadable content: only its age counts
        record = {}
    modified = info.get("mtime") or info.get("LastModified")
    modified = modified.timestamp() if hasattr(modified, "timestamp") else float(modified or 0)
    return record, time.time() - modified


def _remove(location: Location) -> None:
    try:
        location.fs.rm(location.path)
    except FileNotFoundError:
        pass
