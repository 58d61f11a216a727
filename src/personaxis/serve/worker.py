"""One thread owns the model; requests queue and are decoded together.

Dynamic batching: when the worker starts a batch it takes every request that is waiting (up to `max_batch`), each
with its own interventions as per-row engine ops, so one request's steering never touches another's tokens. Results
travel back to the event loop through `call_soon_threadsafe`, token by token.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from personaxis.generate import Generation, Sampling, generate_batch
from personaxis.model import ChatModel
from personaxis.serve.plan import Plan, Registry


class QueueFull(Exception):
    """More requests are waiting than the server accepts (answered with 429)."""


@dataclass(eq=False)
class Job:
    """One request's work and the channel its tokens go back through."""

    prompt: list[int]
    sampling: Sampling
    plan: Plan
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    enqueued: float = field(default_factory=time.perf_counter)

    def emit(self, *event: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is gone: nobody is listening any more
            self.cancelled = True


class Worker:
    """The model's only user. `submit` is called from the event loop; `_run` is the worker thread."""

    def __init__(
        self,
        model: ChatModel,
        registry: Registry,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        on_batch: Callable[[int, int, float], None] | None = None,
    ) -> None:
        self.model, self.registry = model, registry
        self.max_batch, self.max_queue = max_batch, max_queue
        self.on_batch = on_batch
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="personaxis-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._queue.append(job)
            self._cond.notify()

    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._queue and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return None
            jobs: list[Job] = []
            while self._queue and len(jobs) < self.max_batch:
                job = self._queue.popleft()
                if not job.cancelled:
                    jobs.append(job)
            return jobs

    def _run(self) -> None:
        while (jobs := self._take()) is not None:
            if jobs:
                self._batch(jobs)

    def _batch(self, jobs: list[Job]) -> None:
        ops = [op for row, job in enumerate(jobs) for op in job.plan.ops_for_row(row)]
        monitored = list(dict.fromkeys(name for job in jobs for name in job.plan.monitor))
        ops += [self.registry.monitor_op(name) for name in monitored]
        wanted = [set(job.plan.monitor) for job in jobs]

        def on_token(row: int, token: int, projections: dict) -> bool:
            job = jobs[row]
            if job.cancelled:
                return False
            values = {
                key.removeprefix("monitor:"): float(v[0])
                for key, v in projections.items()
                if key.removeprefix("monitor:") in wanted[row]
            }
            job.emit("token", token, values)
            return not job.cancelled

        started = time.perf_counter()
        try:
            generations: list[Generation] = generate_batch(
                self.model,
                [job.prompt for job in jobs],
                [job.sampling for job in jobs],
                ops=ops,
                on_token=on_token,
            )
        except Exception as exc:  # a failed batch must not kill the worker: every job in it gets the error
            for job in jobs:
                job.emit("error", f"generation failed: {exc}")
            return
        elapsed = time.perf_counter() - started
        for job, generation in zip(jobs, generations, strict=True):
            job.emit("done", generation)
        if self.on_batch is not None:
            self.on_batch(len(jobs), sum(len(g.token_ids) for g in generations), elapsed)
