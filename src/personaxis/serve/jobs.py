"""A request's work on its way to the model's thread, and the channel its events come back through."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from personaxis.inference.generation import Sampling
from personaxis.inference.plan import Plan


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
        post([(self, event)])


def post(events: list[tuple[Job, tuple]]) -> None:
    """Hand events to their jobs' event loops with one wake-up per loop, not one per token: on a small CPU each
    wake-up of the serving thread takes a core from the model's threads."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, tuple]]] = {}
    for job, event in events:
        by_loop.setdefault(job.loop, []).append((job, event))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put, items)
        except RuntimeError:  # the loop is gone: nobody is listening any more
            for job, _ in items:
                job.cancelled = True


def _put(items: list[tuple[Job, tuple]]) -> None:
    for job, event in items:
        job.events.put_nowait(event)
