"""How a job holds its root for a whole run, the same for labeling (an output root) and training (a run folder)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .errors import JobError
from .lease import Lease
from .ray_setup import release_resource_request
from .storage import Location


@contextmanager
def guarded_run(root: Location, *, holder: str, what: str) -> Iterator[Lease]:
    """The root's lease for the run: a second job on the same root exits at once naming this one. A lease lost
    mid-run (its heartbeat interrupts the main thread) ends the job with the lease's own one line. Whatever ends
    the run (an error, SIGTERM unwinding through pipeline.cli.run_job), the autoscaler request that
    --wait-for-resources made is withdrawn and the lease released."""
    with Lease.acquire(root, holder=holder, what=what) as lease:
        try:
            yield lease
        except KeyboardInterrupt:
            if lease.lost:  # the heartbeat interrupted us: another run owns the root now
                raise JobError(lease.lost) from None
            raise
        finally:
            release_resource_request()
