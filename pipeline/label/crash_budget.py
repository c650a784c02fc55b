"""The inference calls' retry budget, charged only for crashes, never for lost (spot) nodes.

Ray retries an actor call whose actor died (`max_task_retries`) and charges every death to the call, also one
whose node was reclaimed: Ray 2.60 exempts preempted nodes from the retries of tasks (ray-project/ray#54182) but
not of actor calls (#50640: "spot preemption related retries do not count towards the max retries" is open). A
night on spot GPUs can lose the node under one batch more often than any fixed budget allows, and an unlimited
budget would retry forever a batch that kills its actor by itself (a sticky CUDA error, a crash, the OOM killer).

So the labeling job lets Ray retry inference calls without limit and keeps the budget here: `BatchAttempts`, one
small actor on the driver's node, records each call's attempts (node, process); a call whose earlier attempts
died MAX_CRASHES times on nodes that are still alive ends the run with one line, and deaths on nodes that are gone
(preempted or not) cost nothing. `bound_crashes(InferenceActor)` is the pool's class with that check around each
call.
"""
from __future__ import annotations

import hashlib
import os

import pyarrow as pa
import ray

from ..errors import JobError
from ..ray_setup import on_driver_node

MAX_CRASHES = 3  # as the fixed budget before: a batch that kills its actor 3 times ends the run


class BatchKeepsCrashing(JobError):
    """An inference call killed its actor MAX_CRASHES times on nodes that stayed up."""


@ray.remote(num_cpus=0, max_restarts=0)
class BatchAttempts:
    """Attempts of the calls in flight: key -> [(node id, pid), ...]; a finished call is forgotten."""

    def __init__(self) -> None:
        self._open: dict[str, list[tuple[str, int]]] = {}

    def begin(self, key: str, node_id: str, pid: int) -> int:
        """Record an attempt; the number of earlier attempts of this call that died on a node still alive."""
        earlier = self._open.get(key, [])
        crashes = 0
        if earlier:  # a retry: Ray restarts an actor only once it knows its node's fate, so the table is current
            alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            crashes = sum(1 for node, _ in earlier if node in alive)
        self._open[key] = [*earlier, (node_id, pid)]
        return crashes

    def end(self, key: str) -> None:
        self._open.pop(key, None)


def start_attempts() -> ray.actor.ActorHandle:
    """The run's BatchAttempts, on this (the driver's) node: on Kubernetes the head, which is not a spot node."""
    return BatchAttempts.options(**on_driver_node()).remote()


def batch_key(batch: pa.Table) -> str:
    """A call's identity across retries: its images (a retried call gets the same block)."""
    return hashlib.sha1("\n".join(batch["image_uri"].to_pylist()).encode()).hexdigest()


def bound_crashes(actor_class: type) -> type:
    """`actor_class` (a Ray Data callable class) whose calls check and record their attempts in `attempts`, a
    one-element list holding the BatchAttempts handle (a constructor argument)."""

    class Bounded(actor_class):
        def __init__(self, *args, attempts: list, **kwargs):
            super().__init__(*args, **kwargs)
            self._attempts = attempts[0]
            self._node_id, self._pid = ray.get_runtime_context().get_node_id(), os.getpid()

        def __call__(self, batch: pa.Table) -> pa.Table:
            key = batch_key(batch)
            crashes = ray.get(self._attempts.begin.remote(key, self._node_id, self._pid))
            if crashes >= MAX_CRASHES:
                uris = batch["image_uri"].to_pylist()
                raise BatchKeepsCrashing(
                    f"an inference batch of {len(uris)} image(s) (first {uris[0]}) killed its inference actor "
                    f"{crashes} times on nodes that stayed up (a crash, a device error or the out-of-memory killer; "
                    "lost nodes are not counted): the run stops; rerun to retry the rest")
            out = super().__call__(batch)
            self._attempts.end.remote(key)
            return out

    Bounded.__name__ = Bounded.__qualname__ = actor_class.__name__  # Ray Data names the stage after it
    return Bounded


def batch_crash(error: BaseException) -> BatchKeepsCrashing | None:
    """The BatchKeepsCrashing inside the error Ray Data raised in the driver (wrapped in RayTaskError and
    UserCodeException), so the job ends with its one line; None for any other error."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if type(e) is BatchKeepsCrashing:
            return e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    found = [line for line in str(error).splitlines() if f"{BatchKeepsCrashing.__name__}: " in line]
    return BatchKeepsCrashing(found[-1].split(f"{BatchKeepsCrashing.__name__}: ", 1)[1]) if found else None
