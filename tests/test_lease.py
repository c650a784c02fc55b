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


def _ttl(folder: Location, s3_ttl_s: float) -> float:
    """A lease ttl that sets only the pace: 2/3 of `s3_ttl_s` on a local folder (its mtimes are exact), `s3_ttl_s` on
    S3, whose Last-Modified has whole seconds (a lease written a moment ago can read up to 1 s older than it is)."""
    return s3_ttl_s if folder.uri.startswith("s3://") else round(s3_ttl_s * 2 / 3, 2)


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
    ttl = _ttl(folder, 1.0)
    time.sleep(ttl + 0.1)
    with Lease.acquire(folder, holder="next night", what="run x", ttl_s=ttl):
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
    ttl = _ttl(folder, 3.0)
    with Lease.acquire(folder, holder="long run", what="run x", ttl_s=ttl):
        time.sleep(ttl + 1.0)  # longer than the ttl: only the heartbeat (every ttl / 4) keeps it fresh
        with pytest.raises(LeaseHeld, match="long run"):
            Lease.acquire(folder, holder="impatient run", what="run x", ttl_s=ttl)


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
    # A ttl of 3 s on S3, not 1: its Last-Modified has whole seconds, so a lease written a moment ago can read up to 1 s
    # older than it is, and with a 1 s ttl the winner's fresh lease looked stale to the other taker (seen once).
    ttl = _ttl(folder, 3.0)
    _write_lease(folder, {"holder": "dead run", "id": "stale", "host": "elsewhere", "pid": 1})
    time.sleep(ttl + 0.1)
    results, barrier = {}, threading.Barrier(2)

    def take(name):
        barrier.wait()
        try:
            results[name] = Lease.acquire(folder, holder=name, what="run x", ttl_s=ttl, on_lost=lambda: None)
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


# ------------------------------------------------------------------- a store that applied a write but lost its answer
#
# tests/lossy_s3.py: a loopback proxy in front of the S3 server forwards each request and, for the one picked, lets
# the store apply it and answers 500; botocore's retry sends the same request again, and gets the store's answer to
# a repeat (412 for a conditional write that was applied). The product code on the path is the production code.


@pytest.fixture
def lossy_s3(bucket, s3_server, monkeypatch):
    """A LossyS3Proxy in front of the test bucket's server, which this process's new s3fs filesystems use."""
    import s3fs

    from tests.lossy_s3 import LossyS3Proxy

    proxy = LossyS3Proxy(s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    yield proxy
    s3fs.S3FileSystem.clear_instance_cache()
    proxy.stop()


def _replayed(proxy, method: str, condition: str) -> list[tuple[int, int]]:
    """(store's status, client's status) of each request of `method` on the lease carrying `condition`."""
    return [(e.store_status, e.sent_status) for e in proxy.exchanges(method, f"/{LEASE_FILE}") if condition in e.conditions]


def _stored_lease(s3) -> dict:
    s3.invalidate_cache()
    return json.loads(s3.cat_file(f"test-bucket/runs/x/{LEASE_FILE}"))


@pytest.mark.parametrize("holder", ["labeling run 20261126T0100Z-ab12cd", "the training started 2026-11-26 01:00:00 UTC"])
def test_a_lost_answer_to_the_lease_create_is_the_runs_own_lease(lossy_s3, s3, holder):
    """The conditional create (If-None-Match: *) is applied, its answer lost, and the SDK's retry gets 412: the lease
    found is this run's own (its record's id), so it is acquired, for labeling and training alike (both take their
    root through pipeline.run_guard)."""
    from pipeline.run_guard import guarded_run

    lossy_s3.lose_answer("PUT", f"/{LEASE_FILE}", condition="If-None-Match")
    with guarded_run(Location.of("s3://test-bucket/runs/x"), holder=holder, what="run x") as lease:
        assert _replayed(lossy_s3, "PUT", "if-none-match") == [(200, 500), (412, 412)]  # applied, lost, replayed
        assert _stored_lease(s3)["id"] == lease.record["id"] and lease.lost is None
        lease.check()
        with pytest.raises(LeaseHeld, match=f"run x is in use by {holder}"):  # still one holder at a time
            Lease.acquire(Location.of("s3://test-bucket/runs/x"), holder="another run", what="run x")
    assert not s3.exists(f"test-bucket/runs/x/{LEASE_FILE}")  # released


def test_a_renewal_applied_whose_answer_was_lost_keeps_the_lease(lossy_s3, s3):
    """A heartbeat's conditional PUT (If-Match on the lease's ETag) is applied, its answer lost; the retry finds the
    ETag changed by that very write (412). The stored record is still this run's: the lease is renewed, not lost."""
    told = threading.Event()
    lease = Lease.acquire(Location.of("s3://test-bucket/runs/x"), holder="run A", what="run x", ttl_s=0.8,
                          on_lost=told.set)
    try:
        lossy_s3.lose_answer("PUT", f"/{LEASE_FILE}", condition="If-Match")
        deadline = time.monotonic() + 10
        while len(_replayed(lossy_s3, "PUT", "if-match")) < 4 and time.monotonic() < deadline:  # renewals after it
            time.sleep(0.05)
        renewals = _replayed(lossy_s3, "PUT", "if-match")
        assert renewals[:2] == [(200, 500), (412, 412)], renewals  # applied, lost, replayed
        assert renewals[2:4] == [(200, 200), (200, 200)], renewals  # the next heartbeats go on, on the new ETag
        assert not told.is_set() and lease.lost is None, lease.lost
        lease.check()
        assert _stored_lease(s3)["id"] == lease.record["id"]
    finally:
        lease.release()
    assert not s3.exists(f"test-bucket/runs/x/{LEASE_FILE}")


def test_a_renewal_refused_for_another_runs_lease_is_still_a_lost_lease(lossy_s3, s3):
    """The 412 that a replay gets is told from a real takeover by the record stored: another run's lease is lost."""
    told = threading.Event()
    lease = Lease.acquire(Location.of("s3://test-bucket/runs/x"), holder="stalled run", what="run x", ttl_s=0.8,
                          on_lost=told.set)
    try:
        lease._stop.set()  # stalled: no heartbeat while another run takes the lease over
        lease._thread.join()
        stored = _stored_lease(s3)
        s3.pipe_file(f"test-bucket/runs/x/{LEASE_FILE}", json.dumps({**stored, "id": "other", "holder": "new run"}).encode())
        from pipeline.lease import _Lost, _renew

        with pytest.raises(_Lost):
            _renew(lease.location, b'{"id": "%s"}' % lease.record["id"].encode(), lease._etag, lease.record["id"])
    finally:
        lease.release()  # leaves the new holder's lease alone
    assert _stored_lease(s3)["holder"] == "new run"


def test_a_release_whose_answer_was_lost_is_released(lossy_s3, s3, caplog):
    """The release's DELETE (If-Match on its ETag) is applied, its answer lost; the retry finds no lease (404): it is
    gone, as wanted, and the release says nothing."""
    lease = Lease.acquire(Location.of("s3://test-bucket/runs/x"), holder="run A", what="run x")
    lossy_s3.lose_answer("DELETE", f"/{LEASE_FILE}", condition="If-Match")
    with caplog.at_level("WARNING", logger="pipeline.lease"):
        lease.release()
    assert _replayed(lossy_s3, "DELETE", "if-match") == [(204, 500), (404, 404)]
    assert not s3.exists(f"test-bucket/runs/x/{LEASE_FILE}")
    assert not [r for r in caplog.records if "could not release" in r.getMessage()], caplog.text


def test_a_takeover_whose_delete_answer_was_lost_takes_the_lease(lossy_s3, s3):
    """Taking over a dead holder's stale lease: the DELETE on its ETag is applied, its answer lost, and the retry
    finds nothing (404); the create that follows gets the lease."""
    s3.pipe_file(f"test-bucket/runs/x/{LEASE_FILE}", json.dumps({"holder": "dead run", "id": "stale", "host": "elsewhere",
                                                                 "pid": 1}).encode())
    time.sleep(1.1)  # older than the ttl below (S3 times are whole seconds)
    lossy_s3.lose_answer("DELETE", f"/{LEASE_FILE}", condition="If-Match")
    with Lease.acquire(Location.of("s3://test-bucket/runs/x"), holder="next night", what="run x", ttl_s=1.0,
                       on_lost=lambda: None) as lease:
        assert _replayed(lossy_s3, "DELETE", "if-match") == [(204, 500), (404, 404)]
        assert _stored_lease(s3)["id"] == lease.record["id"]


def test_a_local_create_reported_as_existing_that_made_the_link_is_the_runs_own(tmp_path, monkeypatch):
    """NFS's form of a lost answer: a retransmitted link() whose first copy was applied answers EEXIST. The lease
    found carries this run's id: acquired."""
    import os

    link = os.link

    def applied_then_exists(src, dst):
        link(src, dst)
        raise FileExistsError(dst)

    folder = Location.of(str(tmp_path / "out"))
    monkeypatch.setattr(os, "link", applied_then_exists)
    lease = Lease.acquire(folder, holder="run A", what="output")
    monkeypatch.undo()
    try:
        assert json.loads(folder.child(LEASE_FILE).read_bytes())["id"] == lease.record["id"]
    finally:
        lease.release()
    assert not folder.child(LEASE_FILE).exists()


# ray_session before lossy_s3: a Ray started here inherits the environment, and must not point at the proxy.
def test_a_labeling_run_whose_lease_create_answer_was_lost_labels(ray_session, lossy_s3, s3, tiny_checkpoint, tmp_path,
                                                                  capsys):
    """Issue 30, through the CLI: `jobs/label.py --output s3://...` against a store that applies the lease's create
    and loses its answer. The run used to refuse its own lease ("output ... is in use by labeling run <its own id>
    ... held for 0 min 0 s", exit 2); it labels, and releases the lease at the end. The job's entry point runs in
    this process, on the session's Ray (the lease is the driver's: its every request goes through the proxy), not
    as a subprocess starting a Ray of its own (~15 s more)."""
    from tests.label_fixtures import FAST_FLAGS, good_image, run_label_cli, write_files

    images = str(tmp_path / "images")
    write_files(images, {f"g{i}.png": good_image(i, 20, 24) for i in range(3)})
    lossy_s3.lose_answer("PUT", f"/{LEASE_FILE}", condition="If-None-Match")
    code, stdout, stderr = run_label_cli(["--images", images, "--checkpoint", tiny_checkpoint[0], "--output",
                                          "s3://test-bucket/out", "--run-id", "night-1", *FAST_FLAGS], capsys)
    creates = [(e.store_status, e.sent_status) for e in lossy_s3.exchanges("PUT", f"out/{LEASE_FILE}")
               if "if-none-match" in e.conditions]
    assert creates == [(200, 500), (412, 412)], creates  # the store applied it, the answer was lost, the retry: 412
    assert code == 0, stderr[-3000:]
    assert "in use by labeling run night-1" not in stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["labelled"] == 3, summary
    s3.invalidate_cache()
    assert not s3.exists(f"test-bucket/out/{LEASE_FILE}")  # released at the end
    assert len(s3.find("test-bucket/out/labels")) >= 1
