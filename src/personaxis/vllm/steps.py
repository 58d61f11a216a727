"""The ops of many requests in one flattened vLLM batch: which rows each op touches, and what it read out.

No vLLM import here: a runtime hands `StepPlan` the requests of one forward pass (their rows and absolute token
positions) and calls `apply` from each decoder layer; the math is `engine.functional`, the same the Hugging Face
hooks run. So the mapping from requests and phases to rows is testable without vLLM, against the HF engine.

Phases follow `engine.ops`: for a prompt of n tokens, "prompt" is positions 0..n-1, "response" is n-1 (the last
prompt token, whose output predicts the first reply token) and every generated token. Positions come from the
batch itself, so chunked prefill and recomputation after preemption land in the right phase. Readouts count each
position once: a position recomputed after preemption is not averaged or projected twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from personaxis.engine import functional as F
from personaxis.engine.ops import Ablate, Add, Cap, Op, Project, Record
from personaxis.errors import PersonaxisError


@dataclass(eq=False)
class RequestOps:
    """One request's ops and everything they read out so far (kept by the runtime until the request is collected)."""

    ops: list[Op]
    prompt_len: int
    key: str | None = None
    seen: int = 0  # positions below this one were read out already
    projections: dict[str, dict[int, dict[int, float]]] = field(default_factory=dict)  # name -> layer -> pos -> value
    sums: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # record -> layer -> [K, H] or [K]
    counts: dict[str, torch.Tensor] = field(default_factory=dict)  # record -> [K]
    cap_hits: int = 0

    def means(self, name: str) -> torch.Tensor:
        """[K, L, H] float32 means of a record (for stat "norm": [K, L]); NaN where a segment saw no token."""
        op = next((o for o in self.ops if isinstance(o, Record) and o.name == name), None)
        sums = self.sums.get(name, {})
        if op is None or any(layer not in sums for layer in op.layers):
            raise PersonaxisError(f"record '{name}' saw no forward pass")
        stacked = torch.stack([sums[layer] for layer in op.layers], dim=1)  # [K, L, (H)]
        denominator = self.counts[name].view(-1, *([1] * (stacked.dim() - 1)))
        return stacked / denominator.where(denominator > 0, torch.full_like(denominator, float("nan")))

    def projection_series(self, name: str, positions: Sequence[int]) -> torch.Tensor:
        """[len(positions), L] projections at those absolute positions, NaN where none was read."""
        per_layer = self.projections.get(name, {})
        layers = sorted(per_layer)
        out = torch.full((len(positions), len(layers)), float("nan"))
        for j, layer in enumerate(layers):
            values = per_layer[layer]
            for i, position in enumerate(positions):
                if position in values:
                    out[i, j] = values[position]
        return out


@dataclass
class _Lane:
    """One op at one layer, over the rows of every request that uses it this step."""

    op: Op
    mask: torch.Tensor  # [N] bool: rows the op applies to
    spans: list[tuple[RequestOps, int, int]]  # (request, first row, end row)


class StepPlan:
    """The ops of one forward pass, laid out per layer; `apply` runs them on a layer's output."""

    def __init__(self, requests: Sequence[tuple[RequestOps, int, int]], positions: torch.Tensor, n_rows: int) -> None:
        """`requests`: (ops, first row, end row) of each request with ops; `positions`: absolute position per row."""
        self.positions = positions.to("cpu", torch.long)[:n_rows]
        self.n_rows = n_rows
        self.requests = [r for r, _, _ in requests]
        self._fresh: dict[int, torch.Tensor] = {}  # id(request) -> [N] bool: rows not read out before
        self._spans = [(r, start, end) for r, start, end in requests]
        self._lanes: dict[int, list[_Lane]] = {}
        self._copies: dict[tuple, torch.Tensor] = {}
        self._pending: list[tuple[RequestOps, str, int, torch.Tensor, torch.Tensor]] = []  # projections to fold
        self._hits: list[tuple[RequestOps, torch.Tensor]] = []
        lanes: dict[tuple[int, int, int], _Lane] = {}
        for request, start, end in requests:
            rows = torch.zeros(n_rows, dtype=torch.bool)
            rows[start:end] = True
            self._fresh[id(request)] = rows & (self.positions >= request.seen)
            per_layer: dict[int, int] = {}
            for op in request.ops:
                mask = rows & self._phase(op, request.prompt_len)
                for layer in op.layers:
                    order = per_layer.get(layer, 0)
                    per_layer[layer] = order + 1
                    lane = lanes.setdefault(
                        (layer, order, id(op)), _Lane(op, torch.zeros(n_rows, dtype=torch.bool), [])
                    )
                    lane.mask |= mask
                    lane.spans.append((request, start, end))
        for (layer, _order, _id), lane in sorted(lanes.items(), key=lambda item: item[0][:2]):
            self._lanes.setdefault(layer, []).append(lane)

    @property
    def layers(self) -> list[int]:
        return sorted(self._lanes)

    def _phase(self, op: Op, prompt_len: int) -> torch.Tensor:
        if op.when == "prompt":
            return self.positions <= prompt_len - 1
        if op.when == "response":
            return self.positions >= prompt_len - 1
        return torch.ones(self.n_rows, dtype=torch.bool)

    def _on(self, key: tuple, tensor: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        full = (*key, like.device, dtype)
        if full not in self._copies:
            self._copies[full] = tensor.to(device=like.device, dtype=dtype)
        return self._copies[full]

    def apply(self, hidden: torch.Tensor, residual: torch.Tensor | None, layer: int) -> None:
        """Run this layer's ops on its output, in place. The residual stream ("output of block i") is
        `hidden + residual` (vLLM keeps the two apart); every shift is added to `hidden`, so rows that no op moves
        come back bit for bit unchanged."""
        lanes = self._lanes.get(layer)
        if not lanes:
            return
        n = self.n_rows
        out = hidden[:n]
        moved = False
        stream = out if residual is None else out + residual[:n]
        dtype = out.dtype
        for lane in lanes:
            op = lane.op
            mask = self._on(("mask", id(lane)), lane.mask, out, torch.bool)
            if isinstance(op, Add):
                delta = self._on(("delta", id(op), layer), op.deltas[layer], out, dtype)
                out, moved = F.add(out, delta, mask), True
                stream = F.add(stream, delta, mask)
            elif isinstance(op, (Cap, Ablate)):
                unit = self._on(("unit", id(op), layer), op.directions[layer], out, torch.float32)
                projection = F.project(stream, unit)
                if isinstance(op, Ablate):
                    shift = F.ablate_shift(projection)
                else:
                    lo = op.floor[layer] if op.floor else None
                    hi = op.ceiling[layer] if op.ceiling else None
                    shift = F.cap_shift(projection, lo, hi)
                shift = shift * mask
                if isinstance(op, Cap):
                    self._hits.extend((request, shift[start:end]) for request, start, end in lane.spans)
                unit = self._on(("unit", id(op), layer), unit, out, dtype)
                out, moved = F.move(out, shift, unit), True
                stream = F.move(stream, shift, unit)
        readouts = [lane for lane in lanes if isinstance(lane.op, (Project, Record))]
        if readouts:
            work = stream.detach().float()
            for lane in readouts:
                op = lane.op
                if isinstance(op, Project):
                    unit = self._on(("unit", id(op), layer), op.directions[layer], out, torch.float32)
                    values = F.project(work, unit)
                    for request, start, end in lane.spans:
                        keep = (lane.mask & self._fresh[id(request)])[start:end]
                        self._pending.append((request, op.name, layer, self.positions[start:end][keep],
                                              values[start:end][keep.to(values.device)]))  # fmt: skip
                else:
                    for request, start, end in lane.spans:
                        weights = self._weights(op, request, start, end)
                        total = F.weighted_sum(weights.to(work.device)[None], work[None, start:end], op.stat)[0]
                        sums = request.sums.setdefault(op.name, {})
                        sums[layer] = total.cpu() if layer not in sums else sums[layer] + total.cpu()
        if moved:
            hidden[:n] = out

    def _weights(self, op: Record, request: RequestOps, start: int, end: int) -> torch.Tensor:
        """[rows, K] weights of a record over one request's rows: its prompt weights by position, `generated` past
        them; zero outside its phase and for positions read out before."""
        key = ("weights", id(op), id(request))
        if key not in self._copies:
            positions = self.positions[start:end]
            weights = torch.zeros(end - start, op.n_segments)
            known = torch.zeros(end - start, dtype=torch.bool)
            if op.weights is not None:
                known = positions < op.weights.shape[1]
                weights[known] = op.weights[0, positions[known]].float()
            if op.generated is not None:
                weights[~known] = op.generated.float()
            keep = (self._phase(op, request.prompt_len) & self._fresh[id(request)])[start:end]
            self._copies[key] = weights * keep[:, None]
        return self._copies[key]

    def finish(self) -> None:
        """After the forward pass: fold projections, counts and cap hits into each request (one host copy each)."""
        for request, name, layer, positions, values in self._pending:
            table = request.projections.setdefault(name, {}).setdefault(layer, {})
            table.update(zip(positions.tolist(), values.float().cpu().tolist(), strict=True))
        for request, shift in self._hits:
            request.cap_hits += int(shift.ne(0).sum())
        for request, start, end in self._spans:
            for op in request.ops:
                if isinstance(op, Record):
                    counts = self._weights(op, request, start, end).sum(dim=0)
                    previous = request.counts.get(op.name)
                    request.counts[op.name] = counts if previous is None else previous + counts
            fresh = self.positions[self._fresh[id(request)]]
            if len(fresh):
                request.seen = max(request.seen, int(fresh.max()) + 1)
