"""Prometheus metrics of the personaxis ops run by vLLM's own server (`python -m vllm.entrypoints.openai.api_server`).

There the worker runs in vLLM's engine process and `/metrics` is served by its API process, so the two need a
channel: a folder (`PERSONAXIS_METRICS_DIR`, made by the API process when the plugin starts, inherited by the
processes vLLM starts after it). Each worker keeps running totals and a thread of its own writes them there
atomically, as one small JSON file per process, once a second while they change; the API process's collector reads
the files at each scrape and sums them. Metrics (per requests that carried a personaxis spec):

- `personaxis_requests_with_ops_total{op}`: finished requests that steered, capped or monitored (op = steer / cap /
  monitor; a request counts once for each).
- `personaxis_cap_hits_total`: capped (token, layer) pairs, i.e. how often a floor or ceiling bit.
- `personaxis_turn_projection{vector}`: histogram of each reply's mean projection on a monitored vector.

The offline `VLLMModel` and `personaxis serve --engine vllm` read their readouts in-process and keep their own metrics.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from personaxis.engine.ops import Ablate, Add, Cap, Project
from personaxis.inference.plan import PROJECTION_BUCKETS
from personaxis.store.atomic import atomic_write_text
from personaxis.vllm.steps import RequestOps

DIR_ENV = "PERSONAXIS_METRICS_DIR"
PREFIX = "monitor:"


class Totals:
    """One process's running totals, written to the metrics folder."""

    def __init__(self, folder: str | os.PathLike[str] | None = None, name: str | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.name = name or str(os.getpid())  # the file of this process in the folder
        self.requests = {"steer": 0, "cap": 0, "monitor": 0}
        self.cap_hits = 0
        self.projections: dict[str, list[float]] = {}  # vector -> [count per bucket (+Inf last)..., sum, count]
        self._dirty = False
        self._lock = threading.Lock()
        self._writer: threading.Thread | None = None

    def finished(self, state: RequestOps) -> None:
        """Count one finished request served over HTTP (in-process ones are read by their caller)."""
        with self._lock:
            kinds = {
                "steer": any(isinstance(op, (Add, Ablate)) for op in state.ops),
                "cap": any(isinstance(op, Cap) for op in state.ops),
                "monitor": any(isinstance(op, Project) and op.name.startswith(PREFIX) for op in state.ops),
            }
            for kind, present in kinds.items():
                self.requests[kind] += int(present)
            self.cap_hits += state.cap_hits
            for name, per_layer in state.projections.items():
                if not name.startswith(PREFIX) or not per_layer:
                    continue
                values = [v for p, v in next(iter(per_layer.values())).items() if p >= state.prompt_len - 1]
                values = [v for v in values if math.isfinite(v)]
                if values:
                    self._observe(name.removeprefix(PREFIX), sum(values) / len(values))
            self._dirty = True
            if self.folder is not None and self._writer is None:
                self._writer = threading.Thread(target=self._write_every_second, name="personaxis-metrics", daemon=True)
                self._writer.start()

    def _observe(self, vector: str, value: float) -> None:
        row = self.projections.setdefault(vector, [0.0] * (len(PROJECTION_BUCKETS) + 3))
        for i, bound in enumerate(PROJECTION_BUCKETS):
            if value <= bound:
                row[i] += 1
        row[len(PROJECTION_BUCKETS)] += 1  # +Inf
        row[-2] += value
        row[-1] += 1

    def snapshot(self) -> dict[str, Any]:
        return {"requests": self.requests, "cap_hits": self.cap_hits, "projections": self.projections}

    def flush(self) -> None:
        """Write this process's totals if they changed since the last write."""
        with self._lock:
            if self.folder is None or not self._dirty:
                return
            text, self._dirty = json.dumps(self.snapshot()), False
        try:
            atomic_write_text(self.folder / f"{self.name}.json", text)
        except OSError:
            pass  # a full or vanished folder costs the metrics, never a request

    def _write_every_second(self) -> None:
        while True:
            time.sleep(1.0)
            self.flush()


def metrics_folder() -> str:
    """The folder the processes of this vLLM server share (made here, in the first process, if not given)."""
    folder = os.environ.get(DIR_ENV)
    if not folder:
        folder = tempfile.mkdtemp(prefix="personaxis-metrics-")
        os.environ[DIR_ENV] = folder
    return folder


class Collector:
    """A Prometheus collector summing the totals every process wrote to the folder."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, Metric

        requests = CounterMetricFamily(
            "personaxis_requests_with_ops", "Finished requests with personaxis ops, by kind", labels=["op"]
        )
        hits = CounterMetricFamily("personaxis_cap_hits", "Capped (token, layer) pairs")
        # samples by hand: prometheus_client's HistogramMetricFamily drops _sum and _count when buckets are negative
        name = "personaxis_turn_projection"
        projections = Metric(name, "Mean projection of each reply on a monitored vector", "histogram")
        totals = {"steer": 0, "cap": 0, "monitor": 0}
        cap_hits, rows = 0, {}
        for file in sorted(self.folder.glob("*.json")):
            try:
                data = json.loads(file.read_text())
            except (OSError, ValueError):
                continue
            for kind in totals:
                totals[kind] += int(data.get("requests", {}).get(kind, 0))
            cap_hits += int(data.get("cap_hits", 0))
            for vector, row in data.get("projections", {}).items():
                rows[vector] = [a + b for a, b in zip(rows.get(vector, [0.0] * len(row)), row, strict=True)]
        for kind, n in totals.items():
            requests.add_metric([kind], n)
        hits.add_metric([], cap_hits)
        for vector, row in sorted(rows.items()):
            bounds = [str(float(b)) for b in PROJECTION_BUCKETS] + ["+Inf"]
            for bound, n in zip(bounds, row, strict=False):
                projections.add_sample(f"{name}_bucket", {"vector": vector, "le": bound}, n)
            projections.add_sample(f"{name}_count", {"vector": vector}, row[-1])
            projections.add_sample(f"{name}_sum", {"vector": vector}, row[-2])
        yield requests
        yield hits
        yield projections


_collector_registered = False


def register_collector() -> None:
    """In vLLM's API process: serve the workers' totals on its `/metrics` (the global Prometheus registry)."""
    global _collector_registered
    if _collector_registered:
        return
    from prometheus_client import REGISTRY

    REGISTRY.register(Collector(metrics_folder()))
    _collector_registered = True
