"""pipeline.lease on a local folder and on the S3 server: one holder, a refusal naming it, takeover of a dead
holder's stale lease, and a release that never fails."""
from __future__ import annotations

import json
import threading
import time

import pytest

from pipeline.lease import LEASE_FILE, Lease, LeaseHeld
from pipeline.storage import Location


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path) -> Location:
    if request.param == "s3":
        request.getfixturevalue("bucket")
        return Location.of("s3://test-bucket/runs/x")
    return Location.of(str(tmp_path / "runs" / "x"))


def test_one_holder_at_a_time(folder):
    with Lease.acquire(folder, holder="run A", what="run x") as lease:
        assert json.loads(folder.child(LEASE_FILE).read_bytes())["holder"] == "run A"
        with pytest.raises(LeaseHeld, match=r"run x is in use by run A \(host .*, pid \d+\), which has held it for 0 min"):
            Lease.acquire(folder, holder="run B", what="run x")
        assert lease.record["holder"] == "run A"
    assert not folder.child(LEASE_FILE).exists()
    with Lease.acquire(folder, holder="run B", what="run x"):  # free again
        pass


def test_a_dead_holders_stale_lease_is_taken_over(folder):
    Lease.acquire(folder, holder="run that was killed", what="run x")._stop.set()  # no heartbeat: like a kill -9
    time.sleep(1.1)
    with Lease.acquire(folder, holder="next night", what="run x", ttl_s=1.0):
        assert json.loads(folder.child(LEASE_FILE).read_bytes())["holder"] == "next night"


def test_release_of_a_lease_already_gone_or_taken_over(folder):
    lease = Lease.acquire(folder, holder="run A", what="run x")
    folder.fs.rm(folder.child(LEASE_FILE).path)
    lease.release()  # gone: no error
    lease = Lease.acquire(folder, holder="run A", what="run x")
    folder.fs.rm(folder.child(LEASE_FILE).path)
    with Lease.acquire(folder, holder="run B", what="run x"):
        lease.release()  # someone else's now: left alone
        assert json.loads(folder.child(LEASE_FILE).read_bytes())["holder"] == "run B"


def test_the_heartbeat_keeps_a_live_lease(folder):
    with Lease.acquire(folder, holder="long run", what="run x", ttl_s=3.0):
        time.sleep(4.0)  # longer than the ttl: only the heartbeat keeps it fresh (S3 times are whole seconds)
        with pytest.raises(LeaseHeld, match="long run"):
            Lease.acquire(folder, holder="impatient run", what="run x", ttl_s=3.0)


def _write_lease(folder: Location, record: dict) -> None:
    folder.child(LEASE_FILE).write_bytes(json.dumps(record).encode())


def test_a_holder_whose_process_is_gone_from_this_host_is_taken_over_at_once(folder):
    import socket
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid now belongs to no process
    _write_lease(folder, {"holder": "killed run", "id": "x", "host": socket.gethostname(), "pid": gone.pid,
                          "acquired_at": "2026-11-26T00:00:00+00:00"})
    with Lease.acquire(folder, holder="next run", what="run x"):  # no 10-minute wait
        pass


def test_two_runs_taking_over_one_stale_lease_one_wins(folder):
    _write_lease(folder, {"holder": "dead run", "id": "stale", "host": "elsewhere", "pid": 1})
    time.sleep(1.1)
    results, barrier = {}, threading.Barrier(2)

    def take(name):
        barrier.wait()
        try:
            results[name] = Lease.acquire(folder, holder=name, what="run x", ttl_s=1.0, on_lost=lambda: None)
        except LeaseHeld as e:
            results[name] = e

    threads = [threading.Thread(target=take, args=(n,)) for n in ("B", "C")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [n for n, r in results.items() if isinstance(r, Lease)]
    assert len(winners) == 1, results
    assert json.loads(folder.child(LEASE_FILE).read_bytes())["holder"] == winners[0]
    results[winners[0]].release()


def test_a_holder_that_lost_its_lease_is_told(folder):
    told = threading.Event()
    lease = Lease.acquire(folder, holder="stalled run", what="run x", ttl_s=0.8, on_lost=told.set)
    folder.fs.rm(folder.child(LEASE_FILE).path)  # as if it stalled past the ttl and another run took over
    with Lease.acquire(folder, holder="new run", what="run x", on_lost=lambda: None):
        assert told.wait(5) and "lost the lease" in lease.lost
        lease.release()  # leaves the new holder's lease alone
        assert json.loads(folder.child(LEASE_FILE).read_bytes())["holder"] == "new run"


def test_a_holder_whose_heartbeats_fail_stops_before_it_could_be_taken_over(tmp_path):
    """The store stops answering the holder (here: its lease file becomes unreadable, a directory): heartbeats
    fail and are retried, and `check()`, called before each commit, refuses once 3/4 of the ttl passed
    without a renewal, before another run could take the lease over and both write."""
    import os

    folder = Location.of(str(tmp_path / "out"))
    lost = []
    with Lease.acquire(folder, holder="run A", what="output", ttl_s=0.8, on_lost=lambda: lost.append(1)) as lease:
        lease.check()  # just renewed
        path = folder.child(LEASE_FILE).path
        os.unlink(path)
        os.mkdir(path)  # every read of the lease now fails
        time.sleep(0.7)
        with pytest.raises(Exception, match=r"was last renewed 0 min 0 s ago \(its heartbeats fail\); stopping"):
            lease.check()
        os.rmdir(path)
    assert lost == []
