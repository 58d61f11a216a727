"""The personaxis server on vLLM (`personaxis serve --engine vllm`): the same API, request schema, per-token
telemetry, closed loop, `/metrics` and dashboard, with vLLM's engine doing the batching.

`VLLMWorker` takes the place of `serve.worker.Worker` behind `serve.app`: one thread owns the in-process vLLM engine
(`VLLMModel`'s `LLMEngine`), adds each accepted request with its plan's ops (steer, cap, and a projection per
monitored vector), steps the engine, and posts every new token with its projections to the request's event loop.
The telemetry needs no channel between processes: the engine runs in this process, so the worker's readouts
(`vllm.worker.STATE`) are read where they are made. The token at reply index k was sampled from the forward at
position n - 1 + k (n prompt tokens), and its projections are the ones read at that position, as on the HF runtime.

A request that fails (bad ops, an engine error on it) fails alone; a client that goes away is aborted in the engine
and its ops and readouts are dropped.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from personaxis.engine.ops import Op, validate_ops
from personaxis.inference.generation import Generation
from personaxis.inference.plan import Registry
from personaxis.serve.jobs import Job, QueueFull, post
from personaxis.vllm.offline import VLLMModel


@dataclass(eq=False)
class _Live:
    job: Job
    key: str | None
    tokens: list[int]


class VLLMWorker:
    """The vLLM engine's only user. `submit` is called from the event loop; `_run` is the worker thread."""

    def __init__(
        self,
        runtime: VLLMModel,
        registry: Registry,
        *,
        max_queue: int = 64,
        on_batch: Callable[[int, int, float], None] | None = None,
    ) -> None:
        self.runtime, self.registry = runtime, registry
        self.engine = runtime.llm.llm_engine
        self.max_queue, self.on_batch = max_queue, on_batch
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self._live: dict[str, _Live] = {}
        self._thread = threading.Thread(target=self._run, name="personaxis-vllm", daemon=True)

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

    @property
    def decoding(self) -> int:
        return len(self._live)

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._queue.append(job)
            self._cond.notify()

    # -- the worker thread ------------------------------------------------------------------------------------------

    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._queue and not self._live and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return None
            jobs = [job for job in self._queue if not job.cancelled]
            self._queue.clear()
            return jobs

    def _run(self) -> None:
        try:
            while (jobs := self._take()) is not None:
                for job in jobs:
                    self._add(job)
                self._drop_cancelled()
                if self._live:
                    self._step()
        finally:
            for rid in list(self._live):
                self._end(rid, ("error", "the server is shutting down"))

    def _ops(self, job: Job) -> list[Op]:
        ops = [replace(op, rows=None) for op in job.plan.ops]
        ops += [self.registry.monitor_op(name) for name in job.plan.monitor]
        validate_ops(ops, self.runtime.n_layers, self.runtime.hidden_size)
        return ops

    def _add(self, job: Job) -> None:
        key = None
        try:
            params, key = self.runtime.request(job.sampling, self._ops(job), output_kind=_delta(), detokenize=False)
            rid = uuid.uuid4().hex  # vLLM's outputs and aborts name a request by the id it was given
            self.engine.add_request(rid, {"prompt_token_ids": list(job.prompt)}, params)
        except Exception as exc:  # this request alone fails
            self.runtime.release(key)
            job.emit("error", f"generation failed: {_one_line(exc)}")
            return
        self._live[rid] = _Live(job, key, [])

    def _drop_cancelled(self) -> None:
        gone = [rid for rid, live in self._live.items() if live.job.cancelled]
        if gone:
            self.engine.abort_request(gone)
            for rid in gone:
                self.runtime.release(self._live.pop(rid).key)

    def _step(self) -> None:
        rows, started = len(self._live), time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as exc:  # a failed step fails the requests it ran, never the worker
            message = f"generation failed: {_one_line(exc)}"
            self.engine.abort_request(list(self._live))
            for rid in list(self._live):
                self._end(rid, ("error", message))
            return
        events: list[tuple[Job, tuple]] = []
        produced = 0
        for output in outputs:
            live = self._live.get(output.request_id)
            if live is None:
                continue
            completion = output.outputs[0]
            fresh = [t for t in completion.token_ids if t not in self.runtime._stops]
            fresh = fresh[: live.job.sampling.max_new_tokens - len(live.tokens)]
            state = self.runtime._state.by_key.get(live.key) if live.key is not None else None
            n = len(live.job.prompt)
            for token in fresh:
                values = self._projections(live, state, n - 1 + len(live.tokens))
                live.tokens.append(token)
                events.append((live.job, ("token", token, values)))
            produced += len(fresh)
            if output.finished:
                post(events)
                events = []
                self._end(output.request_id, None)
        post(events)
        if self.on_batch is not None and produced:
            self.on_batch(rows, produced, time.perf_counter() - started)

    def _projections(self, live: _Live, state: Any, position: int) -> dict[str, float]:
        values = {}
        for name in live.job.plan.monitor:
            per_layer = state.projections.get(f"monitor:{name}", {}) if state is not None else {}
            layer_values = next(iter(per_layer.values()), {})
            values[name] = float(layer_values.get(position, float("nan")))
        return values

    def _end(self, rid: str, failure: tuple | None) -> None:
        """Hand the request its end (its generation, or `failure`) and drop its ops and readouts."""
        live = self._live.pop(rid)
        state = self.runtime.release(live.key)
        if failure is not None:
            live.job.emit(*failure)
            return
        budget = live.job.sampling.max_new_tokens
        generation = Generation(
            prompt_ids=list(live.job.prompt),
            token_ids=live.tokens,
            text=self.runtime.tokenizer.decode(live.tokens, skip_special_tokens=True),
            finish_reason="length" if len(live.tokens) >= budget else "stop",
        )
        if state is not None:
            generation.cap_hits = state.cap_hits
            n = len(live.job.prompt)
            positions = list(range(n - 1, n - 1 + len(live.tokens)))
            for name in live.job.plan.monitor:
                generation.projections[f"monitor:{name}"] = state.projection_series(f"monitor:{name}", positions)
        live.job.emit("done", generation)


def _delta() -> Any:
    from vllm.sampling_params import RequestOutputKind

    return RequestOutputKind.DELTA


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
