"""One way for every job to get a Ray instance: the cluster it was submitted to, or a local one started here."""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Callable

import ray

from .errors import JobError
from .host_memory import keep_freed_memory_env

log = logging.getLogger(__name__)
_requested = False  # whether this process asked the autoscaler for resources (wait_for_resources)

# Ray reaps an idle worker process after ~1 s when more workers are idle than CPUs are free (ray#36766). A training
# worker holds its CPU(s) for the whole run, so on a small machine the Ray Data decode workers are killed between
# every two epochs and each epoch starts fresh processes (~1.5 s each: interpreter, ray.data import). Allowing a
# few idle workers keeps them warm. Only a Ray started by this process reads the variable; a cluster keeps its own
# setting (on GPU nodes with many CPUs the default already allows enough idle workers).
IDLE_WORKERS_ENV = "RAY_num_workers_soft_limit"
RAY_DATA_LOGGING = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_data_logging.yaml")
MIN_IDLE_WORKERS = 4


def default_wait_s(address: str | None, wait_s: float | None) -> float:
    """--wait-for-resources by default: 10 min on a cluster the job joins (it may autoscale), 0 on a local Ray
    the job starts itself (it never grows)."""
    if wait_s is not None:
        return wait_s
    address = address or os.environ.get("RAY_ADDRESS")
    return 0.0 if address in (None, "local") else 600.0


_connected_here: str | None = None  # the job id of the connection init_ray made, if it made one


def init_ray(address: str | None = None, *, num_cpus: int | None = None, log_to_driver: bool | str = "stdout",
             **kwargs) -> None:
    """Connect to `address` (default: $RAY_ADDRESS, else a running local cluster, else start one); no-op if
    Ray is already initialised in this process. With `num_cpus` (the size of a Ray to start) and no address, a
    local Ray is started: Ray cannot join a cluster with num_cpus, and `make demo` failed with a ValueError
    traceback when a `ray start --head` was left running on the machine.

    log_to_driver: what of the workers' output this process prints. "stdout" (the default): what they print to
    stdout, the jobs' own lines (`[train] ...`); their stderr (Ray's and the libraries' logging, tracebacks of
    failures that reach the job as one `error:` line anyway) stays in Ray's log files (worker-*.err, ray-train-*.log
    under the session's logs/ folder). True: both; False: neither."""
    global _connected_here
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or ("local" if num_cpus is not None else None)
    if address in (None, "local"):  # may start a local Ray, whose raylet inherits this environment
        os.environ.setdefault(IDLE_WORKERS_ENV, str(max(MIN_IDLE_WORKERS, num_cpus or os.cpu_count() or 1)))
        # Ray's default (the dashboard where ray[default] is installed), so its state API answers: Ray Train's
        # placement-group cleaner asks it every few seconds and logs a warning each time it cannot (40 lines in one
        # `make demo` without it). ~0.5 s more to start. The GPU kit's slimmed Ray has no dashboard: it starts without.
        kwargs["num_cpus"] = num_cpus
        # Ray Data's console in every process of this Ray shows warnings only (its log file keeps everything); a
        # path on this machine, so only for a Ray started here (a cluster's nodes keep Ray Data's defaults).
        # Its Python workers keep freed memory (pipeline/host_memory.py) for the whole job, so the inference actors
        # need no runtime_env of their own: a worker started just for them pushed a 2-CPU machine past Ray's
        # too-many-workers warning.
        # Each of its worker processes is told its Ray's address (own_address_hook).
        kwargs.setdefault("runtime_env", {"env_vars": {"RAY_DATA_LOGGING_CONFIG": RAY_DATA_LOGGING,
                                                       **keep_freed_memory_env()},
                                          "worker_process_setup_hook": own_address_hook()})
    ray.init(address=address, log_to_driver=bool(log_to_driver), **kwargs)
    _connected_here = ray.get_runtime_context().get_job_id()
    if log_to_driver == "stdout":
        _forward_workers_stdout_only()


def own_address_hook() -> Callable[[], None]:
    """The worker_process_setup_hook of a Ray started by init_ray: $RAY_ADDRESS in each of its worker processes is
    that Ray's GCS address. Ray's state API (ray.util.state), which Ray Train's placement-group cleaner asks every
    second, finds its cluster through $RAY_ADDRESS, else through the machine: the Ray of the last `ray start` (its
    ray_current_cluster file), else the one GCS process running. With another Ray on the machine (a `ray start`
    left running, another job's or a test session's local Ray) the cleaner asked that one, did not find its
    controller there and quit, or found several and its thread died with a 30-line traceback in the job's log
    ("Found multiple active Ray instances"). The address is only known once this Ray runs, hence a hook and not an
    env_var.

    A function Ray pickles by value (a nested one), not a module path: a worker runs its hook before it has the
    driver's sys.path, so a project used without installing it (jobs/*.py put the checkout on sys.path) could not
    import one, and Ray ends a worker process whose hook fails. For the same reason the hook never raises."""
    def address_own_ray() -> None:
        try:
            if ray.is_initialized():  # in a worker always; elsewhere the runtime context would start a Ray
                os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        except Exception:  # noqa: BLE001 - the worker keeps Ray's own way of finding its cluster
            pass

    return address_own_ray


def _forward_workers_stdout_only() -> None:
    """Print what the workers write to stdout, not what they write to stderr (init_ray's log_to_driver="stdout"):
    Ray forwards both through one handler of this process, which is wrapped here. Another Ray version without it
    forwards both."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    printers = [handler for name, handler in getattr(dispatcher, "handlers", ()) if name == "ray_print_logs"]
    if len(printers) != 1:
        return

    def forward(data: dict, _print=printers[0]) -> None:
        if not data.get("is_err"):
            _print(data)

    dispatcher.remove_handler("ray_print_logs")  # ray.shutdown removes the wrapper by the same name
    dispatcher.add_handler("ray_print_logs", forward)


def disconnect_ray() -> None:
    """Leave the Ray this process connected to through `init_ray` (a local one stops): the workers' forwarded
    output is flushed first, so nothing they print lands after the job's summary line. A Ray the caller set up
    (a test session, the demo) is left alone."""
    global _connected_here
    if _connected_here and ray.is_initialized() and ray.get_runtime_context().get_job_id() == _connected_here:
        ray.shutdown()
    _connected_here = None


def on_driver_node() -> dict:
    """Actor options that keep a run's bookkeeping actor on the driver's node: on Kubernetes or cluster.yaml the
    head, which is not a spot node, so a reclaimed worker node cannot take the run's records with it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}


def configure_progress(progress: bool | None) -> bool:
    """Ray Data's progress bars on a terminal only (or when asked): on `ray job submit`'s combined log they are
    thousands of lines of cursor codes. Datasets carry this setting to the workers that run them."""
    progress = sys.stderr.isatty() if progress is None else progress
    # Turned off on purpose: Ray Data's one-time "Progress bars disabled" warning would say so on every run; its
    # per-execution INFO lines go to ray-data.log only (as in the workers of a local Ray, see RAY_DATA_LOGGING).
    logging.getLogger("ray.data._internal.progress").setLevel(logging.INFO if progress else logging.ERROR)
    if not progress:
        for handler in logging.getLogger("ray.data").handlers:
            if type(handler).__name__ == "PlainRayHandler":  # the console; the file handler keeps everything
                handler.setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.enable_operator_progress_bars = progress
    ctx.print_on_execution_start = progress  # two lines per execution: per epoch, per dataset, in training
    return progress


def cluster_capacity() -> tuple[dict[str, float], bool]:
    """(resources, known) of the connected cluster: the most it can have.

    known=True: the autoscaler publishes its limits (autoscaler v2), or this process started the Ray instance
    (a fixed local cluster). known=False: a joined cluster whose limits are not published (autoscaler v1, as
    cluster.yaml starts it): the present resources are only a floor.
    """
    now = ray.cluster_resources()
    try:  # Ray Data reads the autoscaler's limits the same way (ray.data._internal.cluster_autoscaler)
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001 - an older GCS: no published limits
        limits = {}
    node = ray._private.worker._global_node  # set, with head=True, when this process started the head
    known = bool(limits) or bool(node is not None and getattr(node, "head", False))
    return {k: float(max(now.get(k, 0), limits.get(k, 0))) for k in set(now) | set(limits)}, known


def wait_for_resources(problem: Callable[[dict], str | None], bundles: list[dict], timeout_s: float,
                       say: Callable[[str], None]) -> dict:
    """The cluster's resources once `problem(resources)` is None. Until then, for at most `timeout_s`, ask the
    autoscaler for `bundles` (ray.autoscaler.sdk.request_resources) and poll; JobError naming the last problem
    when the time is up (at once when timeout_s is 0, or when the cluster's published limits can never fit).
    The request stays until `release_resource_request`. It is the cluster's one standing request: a job
    starting meanwhile replaces it, and a job killed with SIGKILL leaves it until the next job withdraws it."""
    have = ray.cluster_resources()
    found = problem(have)
    if found is None:
        return have
    capacity, known = cluster_capacity()
    if timeout_s <= 0 or (known and problem(capacity) is not None):  # it can never grow enough
        raise JobError(found)
    from ray.autoscaler.sdk import request_resources

    global _requested
    say(f"waiting up to {timeout_s:g} s (--wait-for-resources) for the cluster to grow: {found}")
    request_resources(bundles=bundles)
    _requested = True
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(1.0)
        have = ray.cluster_resources()
        found = problem(have)
        if found is None:
            say(f"the cluster has grown: {_describe(have)}")
            return have
    raise JobError(f"gave up after {timeout_s:g} s (--wait-for-resources): {found}; is the autoscaler running and "
                   "allowed a node type that has these resources?")


def release_resource_request() -> None:
    """Withdraw `wait_for_resources`'s request, if it made one, so the autoscaler may scale idle nodes down."""
    global _requested
    if not _requested:
        return
    _requested = False
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[])
    except Exception as e:  # noqa: BLE001 - never fail the end of a run on it
        log.warning("could not withdraw the resource request: %s", e)


def _describe(resources: dict) -> str:
    return ", ".join(f"{resources[k]:g} {k}" for k in ("CPU", "GPU") if resources.get(k))
