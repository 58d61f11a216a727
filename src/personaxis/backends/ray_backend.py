"""Rollouts and local-model judging on a Ray cluster: one model replica per actor, results streamed back to the driver.

The driver (the process that calls `run_rollouts`) is the only writer of the run store. Actors generate and capture;
their results come back through Ray and the driver writes each group as it arrives. So the store never has to live
on a shared filesystem (SQLite's locking is only safe on a local disk), and a run on a cluster resumes exactly like a
local one.

Work goes out in shards of one batch each, at most `depth` in flight per actor, so fast replicas take more shards and
a lost actor costs little. When an actor dies (its node is lost, it runs out of memory, it is killed), the shards it
still held go back to the queue and the other actors (and a replacement, while `max_restarts` allows) redo them.
Finished shards were already streamed back and written; a shard is either returned whole or not at all, and the store
keeps the first record under each content-hash key, so nothing is ever written twice.

The driver orders the rollouts by prompt length and cuts batches exactly as `LocalBackend` does: with the same
`batch_size` (and the same hardware and dtype) the results are bit-identical to a local run.

`RayJudge` shards judge prompts over the same actors, so a `local:same` judge runs on the replicas that generated.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from personaxis.backends.runs import LocalBackend, Rollout, RolloutResult, longest_first
from personaxis.errors import PersonaxisError
from personaxis.judge.base import Judge
from personaxis.judge.scoring import MIN_MASS, Distribution
from personaxis.model.loading import DTYPES, model_name
from personaxis.store import RunStore

_LENGTH_CHUNK = 2000  # rollouts per tokenization task
log = logging.getLogger("personaxis.backends")


class _Replica:
    """One model replica, living in a Ray actor (wrapped with `ray.remote` when started)."""

    def __init__(self, spec: str, options: dict[str, Any], threads: int | None) -> None:
        import torch

        from personaxis.model import load_model

        if threads:
            torch.set_num_threads(threads)
        model = load_model(spec, dtype=options["dtype"], revision=options["revision"], device=options["device"])
        self.local = LocalBackend(model, options["layers"], options["captures"], options["batch_size"])
        self.judge: Any = None

    def identity(self) -> dict[str, Any]:
        return self.local.identity()

    def lengths(self, rollouts: list[Rollout]) -> list[int]:
        from personaxis.inference.generation import prompt_ids

        return [len(prompt_ids(self.local.model, r.chat)) for r in rollouts]

    def run(self, rollouts: list[Rollout]) -> list[RolloutResult]:
        return [result for group in self.local.stream(rollouts) for result in group]

    def number_probs(self, job: tuple[list[str], int]) -> list[Distribution]:
        """Judge prompts with this replica's model (`LocalJudge`, uncached: the driver caches)."""
        from personaxis.judge.local import LocalJudge

        if self.judge is None:
            self.judge = LocalJudge(self.local.model.model, self.local.model.tokenizer, judge_id="replica")
        prompts, hi = job
        return self.judge._number_probs(prompts, hi)


@dataclass
class RayStats:
    """What happened to the work, for reports: shards sent, shards redone after a loss, actors lost and started."""

    shards: int = 0
    redone: int = 0
    actors_lost: int = 0
    actors_started: int = 0


class RayBackend:
    """`LocalBackend` replicated over Ray actors; see the module doc for the guarantees.

    `model_spec` is anything `load_model` takes, resolved on each worker (so every node needs the model: a shared
    hub cache, a folder on every node, or hub access). `workers` defaults to the cluster's GPU count (1 without
    GPUs). Each actor asks for one GPU when the cluster has any, else `cpus_per_worker` CPUs; actors that do not fit
    wait for resources (an autoscaling cluster adds nodes) up to `start_timeout` seconds. `ray_address` None joins
    the cluster named by ``RAY_ADDRESS`` or an already initialized Ray, else starts a local one (stopped again by
    `close`). `depth` is how many shards an actor holds at once: two keep it busy while a result travels back.
    `max_restarts` (default: `workers`) bounds how many dead actors are replaced.
    """

    def __init__(
        self,
        model_spec: str | os.PathLike[str],
        layers: Sequence[int],
        captures: Sequence[str] = ("response",),
        *,
        workers: int | None = None,
        ray_address: str | None = None,
        batch_size: int = 8,
        dtype: str = "auto",
        revision: str | None = None,
        cpus_per_worker: int = 1,
        depth: int = 2,
        max_restarts: int | None = None,
        start_timeout: float = 1800.0,
    ) -> None:
        if workers is not None and workers < 1:
            raise PersonaxisError("workers must be at least 1")
        if batch_size < 1 or depth < 1 or cpus_per_worker < 1:
            raise PersonaxisError("batch_size, depth and cpus_per_worker must be at least 1")
        if dtype != "auto" and dtype not in DTYPES:
            raise PersonaxisError(f"unknown dtype {dtype!r} (choose from {', '.join(sorted(DTYPES))}, auto)")
        self.spec = os.fspath(model_spec)
        self.options = {
            "layers": list(layers),
            "captures": tuple(captures),
            "batch_size": batch_size,
            "dtype": dtype,
            "revision": revision,
            "device": None,
        }
        self.workers, self.ray_address = workers, ray_address
        self.cpus_per_worker, self.depth = cpus_per_worker, depth
        self.max_restarts, self.start_timeout = max_restarts, start_timeout
        self.stats = RayStats()
        self.actors: list[Any] = []
        self._identity: dict[str, Any] | None = None
        self._owns_ray = False
        self._restarts_left = 0
        self._resources: dict[str, Any] = {}
        self._threads: int | None = None
        self._starting: dict[Any, Any] = {}  # identity ref -> replacement actor still loading the model

    # -- Backend protocol ----------------------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """What every worker will report, known without starting them when the dtype is given (the workers then
        have to agree with it); with dtype "auto" only a loaded model can tell, so the workers are started."""
        if self._identity is None:
            if self.options["dtype"] == "auto":
                self.start()
            else:
                self._identity = {
                    "model": model_name(self.spec),
                    "revision": self.options["revision"],
                    "dtype": str(DTYPES[self.options["dtype"]]),
                    "layers": self.options["layers"],
                    "captures": self.options["captures"],
                }
        assert self._identity is not None
        return self._identity

    def stream(self, rollouts: Sequence[Rollout]) -> Iterator[list[RolloutResult]]:
        if not rollouts:
            return
        self.start()
        chunks = [list(rollouts[i : i + _LENGTH_CHUNK]) for i in range(0, len(rollouts), _LENGTH_CHUNK)]
        lengths: list[int] = [0] * len(rollouts)
        for c, values in self._map("lengths", chunks):
            lengths[c * _LENGTH_CHUNK : c * _LENGTH_CHUNK + len(values)] = values
        sizes = [(r.sampling.max_new_tokens, n) for r, n in zip(rollouts, lengths, strict=True)]
        batches = longest_first(sizes, self.options["batch_size"])  # LocalBackend's order and batches
        shards = [[rollouts[i] for i in batch] for batch in batches]
        for _, results in self._map("run", shards):
            yield results

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Join or start Ray and start the actors (each loads the model); done on first use."""
        if self.actors:
            return
        ray = _ray()
        if not ray.is_initialized():
            try:
                ray.init(address=self.ray_address, include_dashboard=False, logging_level=logging.WARNING)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise PersonaxisError(f"cannot reach Ray at {self.ray_address or 'RAY_ADDRESS'}: {e}") from e
            self._owns_ray = True
        total = ray.cluster_resources()
        gpus = int(total.get("GPU", 0))
        if gpus:
            self._resources = {"num_gpus": 1, "num_cpus": 1}
            self.options["device"] = "cuda"
        else:
            self._resources = {"num_cpus": self.cpus_per_worker}
            self._threads = self.cpus_per_worker
        workers = self.workers or max(1, gpus)
        fit = int(total.get("GPU", 0)) if gpus else int(total.get("CPU", 0)) // self.cpus_per_worker
        if workers > fit:
            log.warning(
                "%d Ray workers asked, the cluster has room for %d now: the others wait for resources", workers, fit
            )
        self._restarts_left = workers if self.max_restarts is None else self.max_restarts
        starting = [self._new_actor() for _ in range(workers)]
        try:
            identities = ray.get([actor.identity.remote() for actor in starting], timeout=self.start_timeout)
        except (ray.exceptions.RayError, TimeoutError) as e:
            for actor in starting:
                ray.kill(actor)
            self.close()
            if isinstance(e, TimeoutError | ray.exceptions.GetTimeoutError):
                raise PersonaxisError(
                    f"{workers} Ray workers did not start within {self.start_timeout:.0f} s: not enough free "
                    f"{'GPUs' if gpus else 'CPUs'} on the cluster ({fit} workers fit)?"
                ) from e
            raise PersonaxisError(f"Ray workers could not load {self.spec}: {_cause(e)}") from e
        problem = None
        if any(identity != identities[0] for identity in identities):
            problem = f"Ray workers loaded {self.spec} differently: {identities}"
        elif self._identity is not None and identities[0] != self._identity:
            problem = f"Ray workers loaded {self.spec} as {identities[0]}, not {self._identity}"
        if problem is not None:
            for actor in starting:
                ray.kill(actor)
            self.close()
            raise PersonaxisError(problem)
        self._identity = identities[0]
        self.actors = starting

    def close(self) -> None:
        """Stop the actors, and Ray itself if this backend started it."""
        ray = _ray()
        for actor in [*self.actors, *self._starting.values()]:
            ray.kill(actor)
        self.actors, self._starting = [], {}
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def __enter__(self) -> RayBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- work distribution ---------------------------------------------------------------------------------------

    def _new_actor(self) -> Any:
        ray = _ray()
        self.stats.actors_started += 1
        remote = ray.remote(_Replica).options(**self._resources, max_restarts=0)
        return remote.remote(self.spec, self.options, self._threads)

    def _map(self, method: str, payloads: list[list[Any]]) -> Iterator[tuple[int, Any]]:
        """Call `method` on each payload on some actor; yield (payload index, result) as they finish.

        A payload held by an actor that died goes back to the front of the queue. A replacement actor gets work only
        once it has loaded the model, so one that cannot be placed (no free resources) never holds work up.
        """
        ray = _ray()
        lost_errors = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)
        queue = deque(range(len(payloads)))
        in_flight: dict[Any, tuple[Any, int]] = {}
        try:
            while queue or in_flight:
                for _ in range(self.depth):  # breadth first: every actor gets one before any gets two
                    for actor in self.actors:
                        if queue and sum(a is actor for a, _ in in_flight.values()) < self.depth:
                            index = queue.popleft()
                            in_flight[getattr(actor, method).remote(payloads[index])] = (actor, index)
                            self.stats.shards += method == "run"
                if not in_flight and not self._starting:
                    raise PersonaxisError("every Ray worker died and no restarts are left")
                ready, _ = ray.wait([*in_flight, *self._starting], num_returns=1)
                if ready[0] in self._starting:
                    self._joined(ready[0])
                    continue
                actor, index = in_flight.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except lost_errors as e:
                    queue.appendleft(index)
                    self.stats.redone += method == "run"
                    self._lost(actor, e)
                    continue
                except ray.exceptions.RayTaskError as e:
                    raise PersonaxisError(f"a Ray worker failed on {method}: {_cause(e)}") from e
                yield index, result
        finally:
            for ref in in_flight:  # the consumer stopped early: do not leave queued work behind
                try:
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001 - best effort; the actors are killed on close anyway
                    pass

    def _lost(self, actor: Any, error: Exception) -> None:
        """Drop a dead actor (once) and start a replacement while the restart budget lasts."""
        if not any(a is actor for a in self.actors):
            return
        self.actors = [a for a in self.actors if a is not actor]
        self.stats.actors_lost += 1
        log.warning("a Ray worker died (%s); its unfinished shards are redone", _cause(error))
        if self._restarts_left > 0:
            self._restarts_left -= 1
            replacement = self._new_actor()
            self._starting[replacement.identity.remote()] = replacement

    def _joined(self, ref: Any) -> None:
        """A replacement finished loading: it takes work if it is the same model, else it is dropped."""
        ray = _ray()
        actor = self._starting.pop(ref)
        try:
            identity = ray.get(ref)
        except ray.exceptions.RayError as e:
            self.actors.append(actor)  # counted and replaced like any lost actor
            self._lost(actor, e)
            return
        if identity != self._identity:
            ray.kill(actor)
            raise PersonaxisError(f"a replacement Ray worker loaded {self.spec} differently: {identity}")
        self.actors.append(actor)


class RayJudge(Judge):
    """A local-model judge sharded over a `RayBackend`'s actors, each judging with the replica it already holds (so
    `judge local:same` needs no second copy of the model, and shards of a lost actor are redone like rollouts).

    The driver keeps the cache and the counts (`Judge`); the default `judge_id` is the one `judge_from_spec` gives a
    `LocalJudge` of the same model, so the two share cached answers. A call is cut into shards of at most `shard`
    prompts (the local judge's batch), fewer when that spreads it over more actors. The distributions equal a
    `LocalJudge`'s up to float rounding: which prompts share a forward pass changes padding and the last bits.
    """

    def __init__(
        self,
        backend: RayBackend,
        *,
        judge_id: str | None = None,
        shard: int = 8,
        cache: RunStore | str | os.PathLike[str] | None = None,
        min_mass: float = MIN_MASS,
    ) -> None:
        super().__init__(judge_id or f"local:{backend.identity()['model']}", cache=cache, min_mass=min_mass)
        self.backend, self.shard = backend, shard

    def _number_probs(self, prompts: list[str], hi: int) -> list[Distribution]:
        self.backend.start()
        size = max(1, min(self.shard, math.ceil(len(prompts) / max(1, len(self.backend.actors)))))
        shards = [(prompts[i : i + size], hi) for i in range(0, len(prompts), size)]
        out: list[list[Distribution]] = [[] for _ in shards]
        for index, distributions in self.backend._map("number_probs", shards):
            out[index] = distributions
        return [d for part in out for d in part]


def _cause(error: Exception) -> str:
    text = " ".join(str(getattr(error, "cause", None) or error).split())
    return text[:300]


def _ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise PersonaxisError("the Ray executor needs the ray package: pip install 'ray>=2.9'") from e
    return ray
