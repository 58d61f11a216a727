"""One thread owns the model; requests queue and are decoded together.

Continuous batching: between two decode steps the worker lets every waiting request (up to `max_batch` rows in all)
join the running batch and drops the finished ones (`serve.batcher`). Each request carries its interventions as
per-row engine ops, so one request's steering never touches another's tokens. For models whose KV cache cannot be
spliced (sliding-window or recurrent layers) a batch takes whatever is waiting when it starts and runs to its end.
Tokens travel back to the event loop through `call_soon_threadsafe`, all of one decode step in one wake-up.

A request that fails fails alone: requests are fully validated before they are submitted (`serve.schema`), a failed
prefill of several jobs is retried job by job, and a decode step isolates the row at fault (`serve.batcher`). Only a
failure that no single request explains reaches the whole batch.

Batch-invariant decoding (`batch_invariant`, on by default on a CPU with continuous batching) makes greedy replies
independent of the batch in bf16 too; see `serve.batcher` and `model.attention`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable

import torch

from personaxis.errors import PersonaxisError
from personaxis.inference.generation import Generation, generate_batch
from personaxis.inference.plan import Registry
from personaxis.model import ChatModel
from personaxis.model.attention import rowwise, supports_rowwise
from personaxis.model.cache import returned_cache, spliceable
from personaxis.serve.batcher import RunningBatch, one_line
from personaxis.serve.jobs import Job, QueueFull, post


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
        batch_invariant: bool | None = None,
    ) -> None:
        self.model, self.registry = model, registry
        self.max_batch, self.max_queue = max_batch, max_queue
        self.on_batch = on_batch
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="personaxis-worker", daemon=True)
        self.continuous = self._can_splice()
        if batch_invariant is None:
            batch_invariant = self.continuous and model.batch_invariant
        if batch_invariant and not (self.continuous and supports_rowwise(model.config)):
            raise PersonaxisError(
                f"{model.name}: batch-invariant decoding needs plain key/value caches and attention without sliding "
                "windows or soft-capping"
            )
        self.batch_invariant = batch_invariant
        self._invariance = contextlib.ExitStack()  # row-wise attention while the worker runs
        self._decoding = 0

    def _can_splice(self) -> bool:
        """Whether this model's KV cache can take rows joining and leaving (probed with a one-token forward)."""
        tokenizer = self.model.tokenizer
        token = next((t for t in (tokenizer.bos_token_id, tokenizer.pad_token_id) if t is not None), 0)
        with torch.inference_mode():
            out = self.model.model(input_ids=torch.tensor([[token]], device=self.model.device), use_cache=True)
        return spliceable(returned_cache(out))

    def start(self) -> None:
        if self.batch_invariant:
            self._invariance.enter_context(rowwise(self.model.model))
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
        self._invariance.close()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def decoding(self) -> int:
        """Requests in the running batch."""
        return self._decoding

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._queue.append(job)
            self._cond.notify()

    def _take(self, room: int, block: bool) -> list[Job] | None:
        """Up to `room` waiting requests (waiting for one if `block`); None once the worker is stopped."""
        with self._cond:
            while block and not self._queue and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return None
            jobs: list[Job] = []
            while self._queue and len(jobs) < room:
                job = self._queue.popleft()
                if not job.cancelled:
                    jobs.append(job)
            return jobs

    def _run(self) -> None:
        if not self.continuous:
            while (jobs := self._take(self.max_batch, block=True)) is not None:
                if jobs:
                    self._batch(jobs)
            return
        batch = RunningBatch(self.model, self.registry, invariant=self.batch_invariant)
        try:
            while (jobs := self._take(self.max_batch - len(batch), block=not batch)) is not None:
                if jobs:
                    self._admit(batch, jobs)
                if batch:
                    self._step(batch)
        finally:
            batch.fail("the server is shutting down")
            post(batch.outbox)

    def _admit(self, batch: RunningBatch, jobs: list[Job]) -> None:
        """Prefill `jobs` into the batch; if that fails, admit them one by one, so that the failing job alone gets its
        error (a failed prefill never touches the running rows)."""
        try:
            batch.admit(jobs)
        except Exception as exc:
            if len(jobs) == 1:
                jobs[0].emit("error", f"generation failed: {one_line(exc)}")
                return
            for job in jobs:
                self._admit(batch, [job])

    def _step(self, batch: RunningBatch) -> None:
        rows, started = len(batch), time.perf_counter()
        try:
            produced = batch.step()
        except Exception as exc:  # no single row explains it (the batch isolated those): every running request fails
            batch.fail(f"generation failed: {one_line(exc)}")
            produced = 0
        post(batch.outbox)
        batch.outbox = []
        self._decoding = len(batch)
        if self.on_batch is not None and produced:
            self.on_batch(rows, produced, time.perf_counter() - started)

    def _batch(self, jobs: list[Job]) -> None:
        ops = [op for row, job in enumerate(jobs) for op in job.plan.ops_for_row(row)]
        monitored = list(dict.fromkeys(name for job in jobs for name in job.plan.monitor))
        ops += [self.registry.monitor_op(name) for name in monitored]
        wanted = [set(job.plan.monitor) for job in jobs]

        emitted = [False] * len(jobs)

        def on_token(row: int, token: int, projections: dict) -> bool:
            job = jobs[row]
            emitted[row] = True
            if job.cancelled:
                return False
            values = {
                key.removeprefix("monitor:"): float(v[0])
                for key, v in projections.items()
                if key.removeprefix("monitor:") in wanted[row]
            }
            job.emit("token", token, values)
            return not job.cancelled

        started, self._decoding = time.perf_counter(), len(jobs)
        try:
            generations: list[Generation] = generate_batch(
                self.model,
                [job.prompt for job in jobs],
                [job.sampling for job in jobs],
                ops=ops,
                on_token=on_token,
            )
        except Exception as exc:  # a failed batch must not kill the worker
            message = f"generation failed: {one_line(exc)}"
            if len(jobs) == 1:
                jobs[0].emit("error", message)
                return
            # the jobs that have streamed tokens cannot start over; the others are rerun one by one, so that a job
            # that fails (at its prefill, typically) fails alone
            for job, sent in zip(jobs, emitted, strict=True):
                if sent:
                    job.emit("error", message)
            for job, sent in zip(jobs, emitted, strict=True):
                if not sent:
                    self._batch([job])
            return
        finally:
            self._decoding = 0
        elapsed = time.perf_counter() - started
        for job, generation in zip(jobs, generations, strict=True):
            job.emit("done", generation)
        if self.on_batch is not None:
            self.on_batch(len(jobs), sum(len(g.token_ids) for g in generations), elapsed)
