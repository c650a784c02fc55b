"""Reading Ray's Prometheus endpoints in tests: what a Prometheus server would scrape from each node."""
from __future__ import annotations

import socket
import time
import urllib.request
from typing import Callable

from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(ports: list[int]) -> list[tuple[str, dict, float]]:
    """(sample name, labels, value) of every sample the metrics agents on `ports` export now."""
    samples = []
    for port in ports:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                text = r.read().decode()
        except OSError:  # a node that was just removed
            continue
        for family in text_string_to_metric_families(text):
            samples += [(s.name, s.labels, s.value) for s in family.samples]
    return samples


def node_ports() -> list[int]:
    """The metrics export ports of the live nodes of the connected Ray cluster."""
    import ray

    return [n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]]


def total(samples, name: str, **labels) -> float | None:
    """Sum over the series of `name` whose labels include `labels` (Ray adds WorkerId, NodeAddress, ...);
    None when there is no such series."""
    values = [v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items())]
    return sum(values) if values else None


def wait_for(ports: Callable[[], list[int]] | list[int], check: Callable[[list], bool], timeout: float = 60) -> list:
    """Scrape until `check(samples)` holds (Ray's agents publish what processes record within about a report
    interval); the last samples, or AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(ports() if callable(ports) else ports)
        if check(samples):
            return samples
        if time.monotonic() > deadline:
            names = sorted({n for n, _, _ in samples if "fcn_" in n})
            raise AssertionError(f"metrics not as expected after {timeout:g} s; fcn series: {names}")
        time.sleep(0.5)
