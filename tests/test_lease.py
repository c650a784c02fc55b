"""pipeline.lease on a local folder and on the S3 server: one holder, a refusal naming it, takeover of a dead
holder's stale lease, and a release that never fails."""
from __future__ import annotations

import json
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
