"""Continuous batching: requests join and leave a running batch between decode steps.

The running batch keeps one KV cache whose rows are left-padded to a common width. Waiting requests are prefilled
together, each with its own ops, and their cache rows are padded and appended to the batch; a finished request's rows
are dropped and columns that are padding in every row are trimmed. Positions are absolute per row and padding is
masked, so a row's tokens do not depend on who shares its batch, up to float rounding (exactly, with `invariant`:
below).

Engine ops are per row, so they are rebuilt (rows renumbered) whenever the batch changes; between changes one
`engine.apply` stays open across decode steps. This splicing needs caches made of plain growing key/value tensors
(`model.cache.spliceable`; sliding-window and recurrent caches are not), and the worker falls back to batches that
start and finish together for the others.

One request's failure stays its own. `admit` raises before the batch changes, and the worker then admits the jobs one
at a time so that only the failing one is refused. In a decode step, a row whose sampling fails is finished with its
error; when the forward fails, the cache is rolled back, each row is tried alone (on a copy), the rows that fail alone
get their error and the step is rerun for the others. Only a failure no single row explains (out of memory, say)
reaches every running request.

With `invariant` (batch-invariant decoding, `model.attention`) a row's tokens do not depend on its batch even in bf16:
attention runs row by row, and a lone row's matmuls run as two rows (`Engine.paired_single_rows`), since on a CPU a
one-row matmul takes another kernel (another summation order) than two rows or more.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from personaxis.engine import Op, Trace, engine_for
from personaxis.inference.generation import Generation, accepts, left_pad, position_ids, sample_next, stop_token_ids
from personaxis.inference.plan import Registry
from personaxis.model import ChatModel
from personaxis.model.cache import append_rows, cache_argument, drop_left, returned_cache

if TYPE_CHECKING:
    from personaxis.inference.generation import Sampling
    from personaxis.serve.jobs import Job


@dataclass(eq=False)
class Row:
    """One request in the running batch."""

    job: Job
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    projections: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # monitor name -> per token [L]
    cap_hits: int = 0
    finish: str = ""
    error: str | None = None  # why this row failed, alone; it leaves the batch with an "error" event

    @property
    def monitored(self) -> bool:
        return bool(self.job.plan.monitor)


class RunningBatch:
    """The rows being decoded, their shared KV cache, and the engine scope their ops run in."""

    def __init__(self, model: ChatModel, registry: Registry, *, invariant: bool = False) -> None:
        self.model, self.registry, self.invariant = model, registry, invariant
        self.stops = stop_token_ids(model)
        self.extra = {"logits_to_keep": 1} if accepts(model.model, "logits_to_keep") else {}
        self.cache_name = cache_argument(model.model) or "past_key_values"
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask = self.positions = self.logits = None  # [B, W] · [B] · [B, V], on the model's device
        self._scope: contextlib.ExitStack | None = None
        self._trace: Trace | None = None
        self.outbox: list[tuple[Job, tuple]] = []  # (job, event) produced by the latest steps, for the worker to post

    def __len__(self) -> int:
        return len(self.rows)

    # -- joining -----------------------------------------------------------------------------------------------------

    def admit(self, jobs: Sequence[Job]) -> None:
        """Prefill `jobs` together (left-padded) and add them to the batch; on failure the batch is as it was."""
        generators = [_generator(job.sampling) for job in jobs]  # a bad seed fails here, before any work
        device, pad = self.model.device, self.model.tokenizer.pad_token_id
        ids, mask = left_pad([job.prompt for job in jobs], pad)
        ids, mask = ids.to(device), mask.to(device)
        ops = [op for row, job in enumerate(jobs) for op in job.plan.ops_for_row(row)]
        self._close()  # the engine runs one scope at a time: the running rows' scope reopens at the next step
        with torch.inference_mode(), engine_for(self.model).apply(ops) as trace:
            out = self.model.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True,
                                   **self.extra)  # fmt: skip
        hits = trace.cap_hits.tolist() if trace.cap_hits is not None else [0] * len(jobs)
        rows = [Row(job, g, cap_hits=int(h)) for job, g, h in zip(jobs, generators, hits, strict=True)]
        self._splice(returned_cache(out), out.logits[:, -1], mask, mask.sum(dim=1), rows)

    def _splice(self, cache: DynamicCache, logits: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                rows: list[Row]) -> None:  # fmt: skip
        if not self.rows:
            self.cache, self.logits, self.mask, self.positions, self.rows = cache, logits, mask, positions, rows
            return
        width = max(self.mask.shape[1], mask.shape[1])
        old, new = width - self.mask.shape[1], width - mask.shape[1]
        append_rows(self.cache, cache)
        self.mask = torch.cat([F.pad(self.mask, (old, 0)), F.pad(mask, (new, 0))])
        self.positions = torch.cat([self.positions, positions])
        self.logits = torch.cat([self.logits, logits])
        self.rows = self.rows + rows

    # -- decoding ----------------------------------------------------------------------------------------------------

    def step(self) -> int:
        """Sample one token per row and run it; tokens and finished replies go to `outbox`. Returns the tokens made."""
        sampled = self._sample()
        produced = 0
        for row, token in zip(self.rows, sampled, strict=True):
            if row.error is not None:
                row.finish = "error"
                continue
            if row.job.cancelled:
                row.finish = "stop"
                continue
            if token in self.stops:
                row.finish = "stop"
                continue
            row.tokens.append(token)
            produced += 1
            if len(row.tokens) >= row.job.sampling.max_new_tokens:
                row.finish = "length"
            if not row.monitored:  # nothing to read out: the token goes out now and a finished row needs no forward
                self.outbox.append((row.job, ("token", token, {})))
        self._retire(keep=lambda row: not row.finish or row.monitored and row.finish == "length")
        if not self.rows:
            return produced
        if not self._forward():
            return produced
        names = self._monitored()
        latest = {name: self._trace.latest(f"monitor:{name}") for name in names}
        for b, row in enumerate(self.rows):
            if row.monitored:
                values = {name: latest[name][b] for name in row.job.plan.monitor}
                for name, value in values.items():
                    row.projections.setdefault(name, []).append(value)
                event = ("token", row.tokens[-1], {name: float(v[0]) for name, v in values.items()})
                self.outbox.append((row.job, event))
        self._retire(keep=lambda row: not row.finish)
        return produced

    def _sample(self) -> list[int | None]:
        """Every row's next token; if sampling the batch fails, the rows are sampled one by one and a row that fails
        alone gets its error (`Row.error`, token None)."""
        settings, generators = [row.job.sampling for row in self.rows], [row.generator for row in self.rows]
        try:
            return sample_next(self.logits, settings, generators, [True] * len(self.rows))
        except Exception:
            if len(self.rows) == 1:
                raise
        out: list[int | None] = []
        for b, row in enumerate(self.rows):
            try:
                out += sample_next(self.logits[b : b + 1], settings[b : b + 1], generators[b : b + 1], [True])
            except Exception as exc:
                row.error = f"generation failed: {one_line(exc)}"
                out.append(None)
        return out

    def _forward(self) -> bool:
        """Run every row's latest token. If that fails, find the rows that fail alone, drop them with their error
        and rerun; raise when no single row explains the failure. Returns whether rows are left."""
        while True:
            tokens = torch.tensor([row.tokens[-1] for row in self.rows]).to(self.model.device)
            mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
            lengths = [layer.keys.shape[2] for layer in self.cache.layers]
            try:
                self._open()  # a row's ops are checked here
                self.cache, self.logits = self._decode(tokens[:, None], mask)
            except Exception:
                self._rollback(lengths)
                if len(self.rows) == 1 or not self._isolate(tokens, mask):
                    raise
                if not self.rows:
                    return False
                continue
            self.mask, self.positions = mask, self.positions + 1
            return True

    def _rollback(self, lengths: list[int]) -> None:
        """Undo a failed forward: its layers that ran appended a column to the cache; the engine scope is reset."""
        for layer, length in zip(self.cache.layers, lengths, strict=True):
            layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]
        if self._scope is not None:
            with contextlib.suppress(Exception):
                self._scope.close()
        self._scope, self._trace = None, None

    def _isolate(self, tokens: torch.Tensor, mask: torch.Tensor) -> bool:
        """Forward each row alone on a copy of its cache row (nothing is kept); retire the rows that fail alone with
        their error. Returns whether any did."""
        failed: dict[int, str] = {}
        monitor_ops = {name: self.registry.monitor_op(name) for name in self._monitored()}
        for b, row in enumerate(self.rows):
            cache = DynamicCache([(layer.keys[b : b + 1], layer.values[b : b + 1]) for layer in self.cache.layers])
            last_prompt = mask[b : b + 1].argmax(dim=1) + len(row.job.prompt) - 1
            try:
                ops = row.job.plan.ops_for_row(0) + [monitor_ops[name] for name in row.job.plan.monitor]
                with torch.inference_mode(), engine_for(self.model).apply(ops, last_prompt=last_prompt):
                    self.model.model(input_ids=tokens[b : b + 1, None], attention_mask=mask[b : b + 1],
                                     position_ids=self.positions[b : b + 1, None], use_cache=True,
                                     **{self.cache_name: cache}, **self.extra)  # fmt: skip
            except Exception as exc:
                failed[b] = f"generation failed: {one_line(exc)}"
        for b, message in failed.items():
            self.rows[b].error, self.rows[b].finish = message, "error"
        self._retire(keep=lambda row: row.error is None)
        return bool(failed)

    def _decode(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
        """One forward of the rows' next tokens."""
        with torch.inference_mode():
            out = self.model.model(input_ids=tokens, attention_mask=mask, position_ids=self.positions[:, None],
                                   use_cache=True, **{self.cache_name: self.cache}, **self.extra)  # fmt: skip
        return returned_cache(out), out.logits[:, -1]

    def fail(self, message: str) -> None:
        """Every running request gets `message` as its error; the batch is emptied."""
        if self._scope is not None:  # detach the hooks; the counts of a failed batch are not worth banking
            with contextlib.suppress(Exception):
                self._scope.close()
        self._scope, self._trace = None, None
        self.outbox += [(row.job, ("error", message)) for row in self.rows]
        self.rows, self.cache, self.mask, self.positions, self.logits = [], None, None, None, None

    def close(self) -> None:
        self._close()

    def _monitored(self) -> list[str]:
        return list(dict.fromkeys(name for row in self.rows for name in row.job.plan.monitor))

    def _open(self) -> None:
        """Enter the engine with the current rows' ops (positions of each row's prompt are passed on explicitly), and
        under `invariant` pair a lone row's matmuls."""
        if self._scope is not None:
            return
        ops: list[Op] = [op for b, row in enumerate(self.rows) for op in row.job.plan.ops_for_row(b)]
        ops += [self.registry.monitor_op(name) for name in self._monitored()]
        lengths = torch.tensor([len(row.job.prompt) for row in self.rows], device=self.mask.device)
        last_prompt = self.mask.argmax(dim=1) + lengths - 1  # first real column + prompt length - 1
        scope = contextlib.ExitStack()
        with scope:  # left at once if entering fails; kept open (popped) otherwise
            self._trace = scope.enter_context(engine_for(self.model).apply(ops, last_prompt=last_prompt))
            if self.invariant and len(self.rows) == 1:
                scope.enter_context(engine_for(self.model).paired_single_rows())
            self._scope = scope.pop_all()

    def _close(self) -> None:
        """Leave the engine scope, crediting each row with the cap hits counted in it."""
        if self._scope is None:
            return
        if self._trace.cap_hits is not None:
            for row, hits in zip(self.rows, self._trace.cap_hits.tolist(), strict=True):
                row.cap_hits += int(hits)
        self._scope.close()
        self._scope, self._trace = None, None

    def _retire(self, keep: Callable[[Row], bool]) -> None:
        kept = [b for b, row in enumerate(self.rows) if keep(row)]
        if len(kept) == len(self.rows):
            return
        self._close()
        for row in self.rows:
            if not keep(row):
                event = ("error", row.error) if row.error is not None else ("done", self._generation(row))
                self.outbox.append((row.job, event))
        if not kept:
            self.rows, self.cache, self.mask, self.positions, self.logits = [], None, None, None, None
            return
        index = torch.tensor(kept, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.logits = self.mask[index], self.positions[index], self.logits[index]
        self.rows = [self.rows[b] for b in kept]
        first = int(self.mask.any(dim=0).int().argmax())  # columns left of it are padding in every row
        if first > 0:
            self.mask = self.mask[:, first:]
            drop_left(self.cache, first)

    def _generation(self, row: Row) -> Generation:
        projections = {
            f"monitor:{name}": torch.stack(values) if values else torch.empty(0, 1)
            for name, values in ((n, row.projections.get(n, [])) for n in row.job.plan.monitor)
        }
        return Generation(
            prompt_ids=list(row.job.prompt),
            token_ids=row.tokens,
            text=self.model.tokenizer.decode(row.tokens, skip_special_tokens=True),
            finish_reason=row.finish or "stop",
            projections=projections,
            cap_hits=row.cap_hits,
        )


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _generator(sampling: Sampling) -> torch.Generator | None:
    if sampling.seed is None or sampling.greedy:
        return None
    return torch.Generator().manual_seed(sampling.seed)
