"""One writer per folder: a lease file created exclusively, kept alive by a heartbeat, void once it goes stale.

    with Lease.acquire(folder, holder="run 20261126T0100Z-ab12cd", what="run s3://b/runs/x") as lease:
        ...  # nobody else holds `folder` meanwhile; lease.lost says why if it was lost

The lease is `<folder>/_lease.json`:
- created exclusively (`Location.create_exclusive`): locally a hard link of a complete temporary file (`O_EXCL`
  where the filesystem has no hard links), on S3 a conditional PUT (`If-None-Match: *`);
- renewed every `ttl_s / 4` seconds by a thread, on S3 with a conditional PUT on its ETag, so a renewal never
  overwrites a lease another run took meanwhile; its modification time is the heartbeat;
- taken over when its heartbeat is older than `ttl_s`, or at once when its holder's process is gone from this
  host: the stale file is renamed away locally (one taker wins) or deleted on its ETag on S3 (`If-Match`);
- a heartbeat time from the future is clock skew (a holder's clock ahead, for a local or NFS folder whose file
  times are its clock): up to `ttl_s` ahead it counts as fresh, so a live holder with a fast clock is respected and
  a dead one's lease still frees within 2 x `ttl_s`. Further ahead, its age cannot be told, so the lease is watched
  for the holder's ttl: a live holder renews it every ttl / 4 (refused, naming the skew); one that never changes is
  a dead holder's (a live holder stops writing once 3/4 of its ttl passed without a renewal) and is taken over;
- released by its holder only while it is still its own; one already gone is not an error;
- a conditional write that the store applied but whose answer was lost is sent again by the SDK's retry, and the
  repeat is refused (412): a refused create or renewal whose stored lease carries this holder's record id (a random
  id per acquire) is this holder's own write, so the lease is held, not lost. A repeated delete (takeover or release)
  finds nothing (404) or another run's new lease (412), and leaves it: both are what the first delete meant.
A holder that loses its lease (a stall longer than `ttl_s`) is told: `on_lost` runs, by default interrupting the
main thread, so a run never goes on writing beside another.
"""
from __future__ import annotations

import _thread
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Callable, NamedTuple

from .errors import JobError
from .storage import Location, StorageError

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
DEFAULT_TTL_S = 600.0
SKEW_NOTICE_S = 5.0  # a heartbeat further ahead of this host's clock is named as clock skew in messages


class LeaseHeld(JobError):
    """Another live holder has the lease (the message names it and for how long)."""


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600} h {seconds // 60 % 60} min" if seconds >= 3600 else f"{seconds // 60} min {seconds % 60} s"


class Lease:
    def __init__(self, location: Location, record: dict, ttl_s: float, etag: str | None,
                 on_lost: Callable[[], None]):
        self.location, self.record, self.ttl_s = location, record, ttl_s
        self.lost: str | None = None
        self._etag, self._on_lost = etag, on_lost
        self._renewed_at = time.monotonic()  # the last time the lease file was known to be ours
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)

    # ------------------------------------------------------------------------------------------ acquire

    @classmethod
    def acquire(cls, folder: Location, *, holder: str, what: str, ttl_s: float = DEFAULT_TTL_S,
                on_lost: Callable[[], None] = _thread.interrupt_main) -> Lease:
        """Take the lease of `folder` or raise LeaseHeld naming the live holder."""
        location = folder.child(LEASE_FILE)
        record = {"holder": holder, "id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                  "acquired_at": datetime.now(timezone.utc).isoformat(), "ttl_s": ttl_s}
        data = _encode(record)
        for _ in range(3):  # a stale lease is removed, then the create is tried again
            created, etag = _create_exclusive(location, data)
            if created:
                lease = cls(location, record, ttl_s, etag, on_lost)
                lease._thread.start()
                return lease
            current = _read(location)
            if current is None:  # released between our create and our read
                continue
            if current.record.get("id") == record["id"]:  # our create was applied, its answer lost: a retry got 412
                log.info("the lease of %s is this run's own: the store applied its create, and the retry of the request "
                         "was refused as a repeat", folder.uri)
                lease = cls(location, record, ttl_s, current.etag, on_lost)
                lease._thread.start()
                return lease
            found, heartbeat_age, found_etag = current.record, current.age, current.etag
            dead = _holder_died(found)
            held = f"{what} is in use by {found.get('holder', 'another run')} (host {found.get('host', '?')}, pid " \
                   f"{found.get('pid', '?')}), which has held it for {_held_for(found)}"
            ahead = -heartbeat_age
            if ahead > ttl_s and not dead:  # clock skew: how old the heartbeat is cannot be told; watch it
                watch_s = _holder_ttl(found, ttl_s)
                skew = _skew(ahead, found)
                log.warning("the lease of %s: %s; watching it for up to %s for a heartbeat of its holder", folder.uri,
                            skew, _age(watch_s))
                renewed = _renewed_within(location, current, watch_s)
                if renewed is None:  # released meanwhile
                    continue
                if renewed:
                    raise LeaseHeld(f"{held}, and it is alive (it renewed the lease); {skew}: set the clocks right "
                                    "(NTP) on both hosts")
                log.warning("taking over the lease of %s from %s: %s, and it did not change for %s", folder.uri,
                            found.get("holder", "a dead run"), skew, _age(watch_s))
            elif heartbeat_age <= ttl_s and not dead:
                skew = f"; {_skew(ahead, found)}" if ahead > SKEW_NOTICE_S else ""
                raise LeaseHeld(f"{held}; a holder that died frees it {_age(ttl_s)} after its last heartbeat "
                                f"({_age(heartbeat_age)} ago){skew}")
            else:
                log.warning("taking over the lease of %s from %s: %s", folder.uri, found.get("holder", "a dead run"),
                            "its process is gone" if dead else f"no heartbeat for {_age(heartbeat_age)}")
            _remove_if_unchanged(location, found, found_etag)
        raise LeaseHeld(f"{what}: other runs are taking its lease at the same moment; try again")

    # ------------------------------------------------------------------------------------ hold and release

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                current = _read(self.location)
                if current is None or current.record.get("id") != self.record["id"]:
                    self._check_folder()
                    raise _Lost()
                # Each renewal's bytes differ (renewed_at), so its ETag does on every store; on the version just read
                # (ours), so an earlier renewal applied but unanswered is no reason for a 412.
                self.record = {**self.record, "renewed_at": datetime.now(timezone.utc).isoformat()}
                self._etag = _renew(self.location, _encode(self.record), current.etag, self.record["id"])
                self._renewed_at = time.monotonic()
            except _Lost:
                self.lost = (f"lost the lease of {self.location.uri}: another run took it over after this one "
                             f"sent no heartbeat for {_age(self.ttl_s)}")
                log.error("%s", self.lost)
                self._on_lost()
                return
            except StorageError as e:  # the store itself is gone (a deleted bucket): not another run's doing
                self.lost = f"lost the lease of {self.location.uri}: {e}"
                log.error("%s", self.lost)
                self._on_lost()
                return
            except Exception as e:  # noqa: BLE001 - a missed beat is retried; the lease lives ttl_s
                log.warning("lease heartbeat of %s failed: %s", self.location.uri, e)

    def _check_folder(self) -> None:
        """Raise StorageError when the lease vanished with its bucket (deleted under the run), not by a takeover."""
        self.location.check_bucket()

    def check(self) -> None:
        """Raise JobError unless the lease is surely still ours: not lost, and renewed within the last 3/4 of its
        ttl (a holder cut off from the store for longer may have been taken over without knowing it). Call it
        before each write that only the holder may make."""
        if self.lost:
            raise JobError(self.lost)
        silent = time.monotonic() - self._renewed_at
        if silent > 0.75 * self.ttl_s:
            raise JobError(f"the lease of {self.location.uri} was last renewed {_age(silent)} ago (its heartbeats "
                           f"fail); stopping before another run could take it over (it expires after {_age(self.ttl_s)})")

    def release(self) -> None:
        """Stop the heartbeat, then delete the lease if it is still ours; a lease already gone is fine."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        try:
            current = _read(self.location)
            if current is not None and current.record.get("id") == self.record["id"]:
                _remove_if_unchanged(self.location, current.record, current.etag)
        except Exception as e:  # noqa: BLE001 - ending a run never fails on its lease
            log.warning("could not release the lease %s: %s", self.location.uri, e)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _Lost(Exception):
    pass


def _encode(record: dict) -> bytes:
    return json.dumps(record, indent=1).encode()


def _skew(ahead_s: float, record: dict) -> str:
    return (f"its heartbeat is {_age(ahead_s)} ahead of this host's clock (clock skew between this host and "
            f"{record.get('host', 'its holder')} or the store)")


def _holder_ttl(record: dict, ttl_s: float) -> float:
    """How long to watch a lease for a heartbeat: its holder's ttl (it renews every ttl / 4), at most ours."""
    try:
        recorded = float(record.get("ttl_s", ttl_s))
    except (TypeError, ValueError):
        return ttl_s
    return min(ttl_s, recorded) if recorded > 0 else ttl_s


def _renewed_within(location: Location, seen: _Found, watch_s: float) -> bool | None:
    """Whether the lease `seen` is renewed (or replaced) within `watch_s` seconds; None when it is released."""
    deadline = time.monotonic() + watch_s
    while True:
        time.sleep(min(max(watch_s / 10, 0.2), 15.0, max(0.0, deadline - time.monotonic())))
        now = _read(location)
        if now is None:
            return None
        if (now.modified, now.record.get("id")) != (seen.modified, seen.record.get("id")):
            return True
        if time.monotonic() >= deadline:
            return False


def _held_for(record: dict) -> str:
    try:
        return _age(time.time() - datetime.fromisoformat(record["acquired_at"]).timestamp())
    except (KeyError, ValueError):
        return "an unknown time"


def _holder_died(record: dict) -> bool:
    """The holder ran on this host and its process is gone (a kill -9, a crash): no need to wait for the ttl."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _create_exclusive(location: Location, data: bytes) -> tuple[bool, str | None]:
    """Create the file with `data` unless it exists: (created, ETag on S3)."""
    try:
        return True, location.create_exclusive(data)
    except FileExistsError:
        return False, None


class _Found(NamedTuple):
    record: dict
    age: float            # seconds since its last heartbeat, by this host's clock (negative: from the future)
    etag: str | None
    modified: float       # the heartbeat: the file's modification time


def _read(location: Location) -> _Found | None:
    """The lease as found, or None when there is none."""
    try:
        location.fs.invalidate_cache()
        info = location.fs.info(location.path)
        data = location.read_bytes()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(data)
    except ValueError:  # being written (O_EXCL fallback) or damaged: only its age counts
        record = {}
    modified = info.get("mtime") or info.get("LastModified")
    modified = modified.timestamp() if hasattr(modified, "timestamp") else float(modified or 0)
    return _Found(record, time.time() - modified, info.get("ETag"), modified)


def _renew(location: Location, data: bytes, etag: str | None, own_id: str) -> str | None:
    """Rewrite the lease (its mtime is the heartbeat); on S3 only if it is still the version `etag`, which this
    holder just read (its record's id `own_id`). Returns the new ETag; raises _Lost when another run holds it.

    A 412 is also what a renewal gets whose answer was lost after the store applied it: the SDK's retry of the
    same PUT finds the ETag changed by that very write. So a 412 is a lost lease only when the lease stored is not
    this holder's: between its read and its PUT, only its own write can store a lease with its id."""
    if location.is_local:
        location.write_bytes(data)
        return None
    bucket, _, key = location.path.partition("/")
    try:
        kwargs = {"IfMatch": etag} if etag else {}
        new_etag = location.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **kwargs).get("ETag")
    except OSError as e:
        if not _precondition_failed(e):
            raise
        current = _read(location)
        if current is None or current.record.get("id") != own_id:
            raise _Lost() from None
        log.info("the renewal of %s was applied and its retry refused as a repeat: the lease is still this run's",
                 location.uri)
        return current.etag
    location.fs.invalidate_cache()
    return new_etag


def _precondition_failed(e: OSError) -> bool:
    """s3fs reports HTTP 412 (an If-Match that no longer holds) as an OSError with this text."""
    return "pre-condition" in str(e).lower() or "precondition" in str(e).lower()


def _remove_if_unchanged(location: Location, record: dict, etag: str | None) -> None:
    """Delete the lease only if it is still `record` (two runs taking over one stale lease: one wins)."""
    if not location.is_local:
        bucket, _, key = location.path.partition("/")
        try:
            location.fs.call_s3("delete_object", Bucket=bucket, Key=key, **({"IfMatch": etag} if etag else {}))
        except FileNotFoundError:
            pass
        except OSError as e:
            if not _precondition_failed(e):
                raise
        location.fs.invalidate_cache()
        return
    aside = f"{location.path}.{uuid.uuid4().hex}.stale"
    try:
        os.rename(location.path, aside)  # atomic: of two takers, one moves it
    except FileNotFoundError:
        return
    try:
        with open(aside, "rb") as f:
            moved = json.loads(f.read() or b"{}")
    except ValueError:
        moved = {}
    if moved.get("id") != record.get("id"):  # a fresh lease came between our read and our rename: put it back
        try:
            os.link(aside, location.path)
        except FileExistsError:
            pass
    os.unlink(aside)
