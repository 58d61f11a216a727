"""The engine: the only code in personaxis that touches forward hooks.

One `Engine` per model. `engine.apply(ops)` attaches, for the duration of a `with` block, one pre-hook on the module
that owns the decoder blocks (it reads the attention mask and the cache length of every forward, so positions are
absolute and padding is known even under `generate()` or a training loop) and one forward hook on each block that
an op touches. With no ops nothing is attached, so outputs are bit-identical to the bare model. `engine.read(ops,
**inputs)` runs one forward pass for readouts only and stops it after the deepest block they need.

Inside a block hook the interventions of that layer are applied in order, then readouts see the result. Projections,
shifts and readouts are computed in float32; each intervention writes back in the model's dtype with one fused,
rounded-once kernel, and a token it does not move is exactly unchanged. Per capped layer of a bf16 model a decoding
step costs six kernels (cast, projection, clamp, shift, cast, update): the hit count is counted from the kept shifts
on read.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import torch

from personaxis.engine import functional as F
from personaxis.engine.ops import Ablate, Add, Cap, Op, Project, Record, validate_ops
from personaxis.errors import PersonaxisError

if TYPE_CHECKING:
    from personaxis.model.loading import ChatModel


CAP_SHIFTS_KEPT = 512  # cap shifts kept uncounted, at most: a long generation folds them in now and then


@dataclass
class _Step:
    """What the current forward call covers: which tokens are real, and where they sit in the sequence."""

    valid: torch.Tensor  # [B, T] bool
    columns: torch.Tensor  # [T] absolute column of each position (left padding included)
    last_prompt: torch.Tensor  # [B] absolute column of each row's last prompt token
    start: int  # absolute column of the first position, kept on the host
    cache: dict[Any, torch.Tensor] = field(default_factory=dict)


@dataclass
class _ApplyState:
    """What the hooks of one `apply` share: the current forward call, and tensors already copied to a device."""

    last_prompt: Sequence[int] | None  # given by a caller that resumes decoding a cache
    step: _Step | None = None
    copies: dict[tuple[Any, torch.device, torch.dtype], torch.Tensor] = field(default_factory=dict)

    def copy(self, key: Any, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """`tensor` on `device` in `dtype`, copied once per apply (a host-to-device copy waits for the device)."""
        full = (key, device, dtype)
        if full not in self.copies:
            self.copies[full] = tensor.to(device=device, dtype=dtype)
        return self.copies[full]


@dataclass
class _RecordState:
    op: Record
    sums: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, K, H] or [B, K]
    counts: torch.Tensor | None = None  # [B, K]


class Trace:
    """What one `apply` block read out: recorded means, per-token projections and how often caps bit."""

    def __init__(self) -> None:
        self._records: dict[str, _RecordState] = {}
        self._projections: dict[str, dict[int, list[tuple[int, torch.Tensor]]]] = {}
        self._cap_shifts: list[torch.Tensor] = []  # [B, T] per capped layer and forward call, not yet counted
        self._cap_counted: torch.Tensor | None = None  # [B] hits of the shifts already folded in

    @property
    def cap_hits(self) -> torch.Tensor | None:
        """[B]: token × layer positions a cap moved, per row (on device); None when no cap ran."""
        self._fold_cap_shifts()
        return self._cap_counted

    # -- written by the engine's hooks ---------------------------------------------------------------------------

    def expect(self, op: Op) -> None:
        """Make room for a readout op's results (an op of another kind reads nothing out)."""
        if isinstance(op, Record):
            self._records[op.name] = _RecordState(op)
        elif isinstance(op, Project):
            self._projections.setdefault(op.name, {})

    def add_counts(self, name: str, counts: torch.Tensor) -> None:
        """Add one forward call's [B, K] segment weights to record `name`."""
        record = self._records[name]
        record.counts = counts if record.counts is None else record.counts + counts

    def add_sum(self, name: str, layer: int, total: torch.Tensor) -> None:
        """Add one forward call's weighted sum at `layer` to record `name`."""
        sums = self._records[name].sums
        sums[layer] = total if layer not in sums else sums[layer] + total

    def add_projection(self, name: str, layer: int, start: int, values: torch.Tensor, mask: torch.Tensor) -> None:
        """One forward call's [B, T] projections at `layer`, from absolute column `start` (NaN outside `mask`). The
        same name on other rows of the same call (a monitor per request) joins the same readout."""
        chunks = self._projections[name].setdefault(layer, [])
        if chunks and chunks[-1][0] == start and chunks[-1][1].shape == values.shape:
            values = values.where(mask, chunks.pop()[1])
        chunks.append((start, values))

    def add_cap_shift(self, shift: torch.Tensor) -> None:
        """One capped layer's [B, T] shifts of one forward call; non-zero entries are hits."""
        self._cap_shifts.append(shift.detach())
        if len(self._cap_shifts) >= CAP_SHIFTS_KEPT:
            self._fold_cap_shifts()

    def _fold_cap_shifts(self) -> None:
        """Count the kept shifts in one go: a cap's hit count costs no kernel per decoding step."""
        if not self._cap_shifts:
            return
        device = self._cap_shifts[0].device
        hits = torch.cat([shift.to(device) for shift in self._cap_shifts], dim=1).ne(0).sum(dim=1)
        self._cap_counted = hits if self._cap_counted is None else self._cap_counted.to(device) + hits
        self._cap_shifts.clear()

    def record_names(self) -> list[str]:
        return list(self._records)

    def counts(self, name: str, on_device: bool = False) -> torch.Tensor:
        """[B, K] total weight (token count for 0/1 weights) of each row's segments."""
        state = self._state(name)
        if state.counts is None:
            raise PersonaxisError(f"record '{name}' saw no tokens")
        return state.counts if on_device else state.counts.cpu()

    def means(self, name: str, on_device: bool = False) -> torch.Tensor:
        """[B, K, L, H] float32 means (for stat='norm': [B, K, L]); NaN where a segment got no tokens.

        `on_device=True` leaves them where they were computed, so a caller can overlap the copy with more work.
        """
        state = self._state(name)
        counts = self.counts(name, on_device=True)
        layers = state.op.layers
        if any(layer not in state.sums for layer in layers):
            raise PersonaxisError(f"record '{name}' saw no forward pass")
        stacked = torch.stack([state.sums[layer] for layer in layers], dim=2)  # [B, K, L, (H)]
        denominator = counts.view(*counts.shape, *([1] * (stacked.dim() - 2))).to(stacked.device)
        means = stacked / denominator.where(denominator > 0, torch.full_like(denominator, float("nan")))
        return means if on_device else means.cpu()

    def projections(self, name: str) -> torch.Tensor:
        """[B, S, L] per-token projections at absolute columns, NaN where the op did not apply."""
        if name not in self._projections:
            raise PersonaxisError(f"no projection named '{name}' was read out")
        per_layer = self._projections[name]
        layers = sorted(per_layer)
        width = max(start + chunk.shape[1] for chunks in per_layer.values() for start, chunk in chunks)
        batch = next(iter(per_layer.values()))[0][1].shape[0]
        out = torch.full((batch, width, len(layers)), float("nan"))
        for j, layer in enumerate(layers):
            for start, chunk in per_layer[layer]:
                out[:, start : start + chunk.shape[1], j] = chunk.cpu()
        return out

    def latest(self, name: str) -> torch.Tensor:
        """[B, L] projections of the last position of the latest forward pass (the token just run)."""
        per_layer = self._projections[name]
        return torch.stack([per_layer[layer][-1][1][:, -1].float().cpu() for layer in sorted(per_layer)], dim=-1)

    def _state(self, name: str) -> _RecordState:
        if name not in self._records:
            raise PersonaxisError(f"no record named '{name}'")
        return self._records[name]


class _ReadoutsDone(Exception):
    """Raised after the deepest block a readout needs, to end a forward pass early (caught in `Engine.read`)."""


def _unwrap(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _rewrap(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class Engine:
    """Hook manager for one model. Use `with engine.apply(ops) as trace:` around a forward pass or generation.

    Hooks never wait on the device: positions are plain integers, vectors and weights are copied to each device once
    per `apply`, and counters stay on the device until read. Under decoding on a GPU a single host sync per layer
    would cost more than all of the ops' arithmetic.
    """

    def __init__(self, model: ChatModel) -> None:
        self.model = model

    @contextmanager
    def apply(self, ops: Sequence[Op], *, last_prompt: Sequence[int] | None = None) -> Iterator[Trace]:
        """Attach the ops for the duration of the block.

        `last_prompt` (the absolute column of each row's last prompt token) is for a caller that resumes decoding a
        cache under a new `apply`: without it the first forward of the block is taken to end the prompt.

        Blocks nest (`px.steer` inside `px.cap`, or a `generate` call inside either): each has its own hooks, phases
        and trace, and at each layer the outer block's ops run before the inner one's.
        """
        trace = Trace()
        ops = list(ops)
        if not ops:
            yield trace
            return
        self._validate(ops)
        by_layer: dict[int, list[Op]] = defaultdict(list)
        for op in ops:
            for layer in op.layers:
                by_layer[layer].append(op)
            trace.expect(op)
        state = _ApplyState(last_prompt)
        records = [op for op in ops if isinstance(op, Record)]
        handles = [self.model.base.register_forward_pre_hook(self._pre_hook(state, trace, records), with_kwargs=True)]
        for layer, layer_ops in sorted(by_layer.items()):
            handles.append(
                self.model.blocks[layer].register_forward_hook(self._block_hook(layer, layer_ops, state, trace))
            )
        try:
            yield trace
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def paired_single_rows(self) -> Iterator[None]:
        """For the duration of the block, a linear layer handed a single row computes it beside a copy of itself and
        keeps one. On a CPU a one-row matmul takes another kernel than two rows or more (which all agree), so a lone
        decoding row would not match the same row in a batch; part of batch-invariant decoding (`model.attention`).
        """
        paired: set[int] = set()

        def before(module: torch.nn.Module, args: tuple) -> tuple | None:
            if not args or args[0].shape[:-1].numel() != 1:
                return None
            x = args[0]
            paired.add(id(module))
            return (torch.cat([x, x]), *args[1:])

        def after(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if id(module) not in paired:
                return None
            paired.discard(id(module))
            return output[:1]

        linears = [m for m in self.model.model.modules() if isinstance(m, torch.nn.Linear)]
        handles = [m.register_forward_pre_hook(before) for m in linears]
        handles += [m.register_forward_hook(after) for m in linears]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def read(self, ops: Sequence[Op], **inputs: Any) -> Trace:
        """One forward pass (no KV cache) for the readouts of `ops`; returns the trace.

        The pass stops after the deepest block a readout (`record` or `project`) touches: in a single forward, layer i
        depends only on blocks 0..i, so the blocks above it and the LM head (a tenth to a fifth of a small model's
        compute, and a [batch, tokens, vocab] tensor) would be computed for nothing. Interventions above that block
        therefore have no effect here.
        """
        ops = list(ops)
        deepest = max((layer for op in ops if isinstance(op, (Record, Project)) for layer in op.layers), default=None)
        if deepest is None:
            raise PersonaxisError("read() needs at least one record or project op")
        with self.apply(ops) as trace:
            handle = self.model.blocks[deepest].register_forward_hook(_stop)  # after the ops' hook on that block
            try:
                self.model.model(**{"use_cache": False, **inputs})
            except _ReadoutsDone:
                pass
            finally:
                handle.remove()
        return trace

    def _validate(self, ops: Sequence[Op]) -> None:
        validate_ops(ops, self.model.n_layers, self.model.hidden_size)

    def _pre_hook(self, state: _ApplyState, trace: Trace, records: list[Record]):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            inputs = kwargs.get("input_ids")
            if inputs is None:
                inputs = args[0] if args else kwargs.get("inputs_embeds")
            batch, width = inputs.shape[0], inputs.shape[1]
            mask = kwargs.get("attention_mask")
            device = inputs.device
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                start = mask.shape[1] - width
                valid = mask[:, start:].bool()
            else:
                cache = kwargs.get("cache", kwargs.get("past_key_values"))
                start = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
                valid = torch.ones(batch, width, dtype=torch.bool, device=device)
            columns = torch.arange(start, start + width, device=device)
            previous = state.step
            if previous is None and state.last_prompt is not None:
                last = torch.as_tensor(state.last_prompt, dtype=torch.long).to(device)
            elif start == 0 or previous is None:
                last = torch.where(valid, columns, torch.full_like(columns, -1)).max(dim=1).values
            else:
                last = previous.last_prompt
            step = _Step(valid=valid, columns=columns, last_prompt=last, start=start)
            state.step = step
            for op in records:
                weights = self._record_weights(op, step, state)
                trace.add_counts(op.name, weights.sum(dim=1).float())

        return hook

    def _token_mask(self, op: Op, step: _Step, state: _ApplyState) -> torch.Tensor:
        """[B, T] positions the op applies to: real tokens, in its phase, in its rows."""
        key = ("mask", id(op))
        if key not in step.cache:
            mask = step.valid
            if op.when == "prompt":
                mask = mask & (step.columns[None, :] <= step.last_prompt[:, None])
            elif op.when == "response":
                mask = mask & (step.columns[None, :] >= step.last_prompt[:, None])
            if op.rows is not None:
                if any(not 0 <= r < mask.shape[0] for r in op.rows):
                    raise PersonaxisError(
                        f"{type(op).__name__}: rows {list(op.rows)} outside a batch of {mask.shape[0]}"
                    )
                rows = torch.zeros(mask.shape[0], dtype=torch.bool)
                rows[list(op.rows)] = True
                mask = mask & state.copy(("rows", id(op), mask.shape[0]), rows, mask.device, torch.bool)[:, None]
            step.cache[key] = mask
        return step.cache[key]

    def _intervention_mask(self, op: Op, step: _Step, state: _ApplyState) -> torch.Tensor | None:
        """None when the op applies at every position: padding need not be masked, since nothing ever reads it."""
        if op.when == "all" and op.rows is None:
            return None
        return self._token_mask(op, step, state)

    def _record_weights(self, op: Record, step: _Step, state: _ApplyState) -> torch.Tensor:
        """[B, T, K] weights of the current positions, zero for padding and rows or phases the op skips."""
        key = ("weights", id(op))
        if key not in step.cache:
            batch, width = step.valid.shape
            device = step.valid.device
            weights = torch.zeros(batch, width, op.n_segments, device=device)
            known = 0
            if op.weights is not None:
                stop = min(step.start + width, op.weights.shape[1])
                if stop > step.start:
                    if op.weights.shape[0] != batch:
                        raise PersonaxisError(
                            f"record '{op.name}': weights for {op.weights.shape[0]} rows, batch has {batch}"
                        )
                    known = stop - step.start
                    full = state.copy(("weights", id(op)), op.weights, device, torch.float32)
                    weights[:, :known] = full[:, step.start : stop]
            if op.generated is not None and known < width:
                weights[:, known:] = state.copy(("generated", id(op)), op.generated, device, torch.float32)
            step.cache[key] = weights * self._token_mask(op, step, state)[..., None]
        return step.cache[key]

    def _block_hook(self, layer: int, ops: list[Op], state: _ApplyState, trace: Trace):
        interventions = [op for op in ops if isinstance(op, (Add, Ablate, Cap))]
        readouts = [op for op in ops if isinstance(op, (Project, Record))]

        def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            step = state.step
            assert step is not None  # the pre-hook on the base module runs before every block
            hidden = _unwrap(output)
            device, dtype = hidden.device, hidden.dtype
            for op in interventions:
                mask = self._intervention_mask(op, step, state)
                if isinstance(op, Add):
                    delta = state.copy(("delta", id(op), layer), op.deltas[layer], device, dtype)
                    hidden = F.add(hidden, delta, mask)
                    continue
                unit = state.copy(("unit", id(op), layer), op.directions[layer], device, torch.float32)
                projection = F.project(hidden, unit)
                if isinstance(op, Ablate):
                    shift = F.ablate_shift(projection)
                else:
                    shift = F.cap_shift(projection, op.floor[layer] if op.floor else None,
                                        op.ceiling[layer] if op.ceiling else None)  # fmt: skip
                if mask is not None:
                    shift = shift * mask
                if isinstance(op, Cap):
                    trace.add_cap_shift(shift)
                hidden = F.move(hidden, shift, state.copy(("unit", id(op), layer), unit, device, dtype))
            if readouts:
                work = hidden.detach().float()
                for op in readouts:
                    if isinstance(op, Project):
                        mask = self._token_mask(op, step, state)
                        unit = state.copy(("unit", id(op), layer), op.directions[layer], device, torch.float32)
                        values = F.project(work, unit).masked_fill(~mask, float("nan"))
                        trace.add_projection(op.name, layer, step.start, values, mask)
                    else:
                        total = F.weighted_sum(self._record_weights(op, step, state), work, op.stat)
                        trace.add_sum(op.name, layer, total)
            return _rewrap(output, hidden) if interventions else None

        return hook


def _stop(module: torch.nn.Module, args: tuple, output: Any) -> None:
    raise _ReadoutsDone


_ENGINES: WeakKeyDictionary[ChatModel, Engine] = WeakKeyDictionary()


def engine_for(model: ChatModel) -> Engine:
    """The engine of a model: made on first use, then the same one for as long as the model lives. The model itself
    knows nothing of hooks; everything that runs ops on it goes through here."""
    engine = _ENGINES.get(model)
    if engine is None:
        engine = _ENGINES[model] = Engine(model)
    return engine
