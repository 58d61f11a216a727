"""The adapter inside a vLLM worker: one custom op per decoder layer, and the per-step plan it reads.

`install(runner)` runs right after the model runner has loaded its model. It finds the decoder blocks the way the
HF runtime does (`model.blocks.find_blocks`, no architecture table), puts a forward hook on each that calls the
registered custom op `personaxis::layer_ops(hidden, residual, layer)`, and wraps the runner's `_model_forward` so
that before every forward the requests of the batch (in the order of `input_batch.req_ids`, request i owning rows
`query_start_loc[i]:query_start_loc[i+1]`, positions from the batch) are laid out as a `StepPlan`.

Under vLLM's torch.compile the hook is traced once and the custom op stays a single opaque node of the graph
(`torch.library` with a fake implementation), so a compiled model keeps its graph; the op's body runs eagerly,
reads the plan prepared before the forward, and returns at once for a layer no request touches this step. A batch
without personaxis requests is never touched: its outputs are bit-identical to vanilla vLLM.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from personaxis.errors import PersonaxisError
from personaxis.model.blocks import find_blocks
from personaxis.vllm.spec import Resolver, raw_spec
from personaxis.vllm.steps import RequestOps, StepPlan

log = logging.getLogger("personaxis.vllm")


@torch.library.custom_op("personaxis::layer_ops", mutates_args=("hidden",))
def layer_ops(hidden: torch.Tensor, residual: torch.Tensor | None, layer: int) -> None:
    """Apply this step's ops for `layer` to the layer's output, in place (see `StepPlan.apply`)."""
    plan = STATE.plan
    if plan is not None:
        plan.apply(hidden, residual, layer)


@layer_ops.register_fake
def _(hidden: torch.Tensor, residual: torch.Tensor | None, layer: int) -> None:
    return None


class ModelInfo:
    """What validation needs to know of the served model (`Vectors.validate` and `validate_ops` read these)."""

    def __init__(self, name: str, n_layers: int, hidden_size: int) -> None:
        self.name, self.n_layers, self.hidden_size = name, n_layers, hidden_size


class WorkerState:
    """The requests this worker runs ops for, the plan of the forward in flight, and results awaiting collection."""

    def __init__(self) -> None:
        self.plan: StepPlan | None = None
        self.requests: dict[str, RequestOps] = {}
        self.by_key: dict[str, RequestOps] = {}
        self.refused: set[str] = set()
        self.resolver: Resolver | None = None
        self.info: ModelInfo | None = None

    def request_ops(self, req_id: str, cached: Any) -> RequestOps | None:
        """The ops of one request of the batch (resolved on its first step), or None."""
        if req_id in self.requests:
            return self.requests[req_id]
        if req_id in self.refused:
            return None
        params = getattr(cached, "sampling_params", None)
        spec = raw_spec(getattr(params, "extra_args", None))
        if spec is None:
            return None
        try:
            resolved = self.resolver.resolve(spec)
            from personaxis.engine.ops import validate_ops

            validate_ops(resolved.ops, self.info.n_layers, self.info.hidden_size)
        except PersonaxisError as exc:
            # requests are validated before they are queued (`plugin`); one that still fails runs without ops
            log.error("personaxis: request %s runs without ops: %s", req_id, exc)
            self.refused.add(req_id)
            return None
        state = RequestOps(resolved.ops, int(cached.num_prompt_tokens), key=resolved.key)
        self.requests[req_id] = state
        if resolved.key is not None:
            self.by_key[resolved.key] = state
        return state

    def plan_step(self, runner: Any, positions: torch.Tensor | None) -> StepPlan | None:
        batch = runner.input_batch
        n_reqs = batch.num_reqs
        if not self.requests and not any(raw_spec(_extra(runner, r)) is not None for r in batch.req_ids[:n_reqs]):
            return None
        starts = runner.query_start_loc.np[: n_reqs + 1].tolist()
        chosen = []
        for i, req_id in enumerate(batch.req_ids[:n_reqs]):
            state = self.request_ops(req_id, runner.requests.get(req_id))
            if state is not None:
                chosen.append((state, starts[i], starts[i + 1]))
        if not chosen or positions is None:
            return None
        return StepPlan(chosen, positions, starts[n_reqs])

    def finished(self, req_ids: set[str] | None) -> None:
        """Forget finished requests; in-process ones stay in `by_key` until collected."""
        for req_id in req_ids or ():
            self.requests.pop(req_id, None)
            self.refused.discard(req_id)

    def collect(self, key: str) -> RequestOps | None:
        """Hand back an in-process request's readouts and forget it (called between steps, by the engine's thread)."""
        state = self.by_key.pop(key, None)
        if state is not None:
            for req_id in [r for r, s in self.requests.items() if s is state]:
                del self.requests[req_id]
        return state


STATE = WorkerState()


def _extra(runner: Any, req_id: str) -> dict | None:
    cached = runner.requests.get(req_id)
    return getattr(getattr(cached, "sampling_params", None), "extra_args", None)


def _layer_hook(layer: int):
    def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        if isinstance(output, tuple):
            hidden = output[0]
            residual = output[1] if len(output) > 1 and isinstance(output[1], torch.Tensor) else None
        else:
            hidden, residual = output, None
        torch.ops.personaxis.layer_ops(hidden, residual, layer)

    return hook


def install(runner: Any) -> None:
    """Hook the runner's freshly loaded model (called by the plugin after `load_model`)."""
    config = runner.vllm_config
    parallel = config.parallel_config
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        raise PersonaxisError("personaxis ops run on one GPU per model for now: tensor/pipeline parallel must be 1")
    if config.speculative_config is not None:
        raise PersonaxisError("personaxis ops cannot run with speculative decoding (draft tokens are not replies)")
    model = runner.get_model()
    try:
        _, blocks = find_blocks(model)
    except PersonaxisError as exc:
        raise PersonaxisError(f"personaxis cannot hook this model: {exc}") from None
    hf = config.model_config.hf_config
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    STATE.info = ModelInfo(str(config.model_config.model), len(blocks), int(text.hidden_size))
    STATE.resolver = Resolver(STATE.info)
    for layer, block in enumerate(blocks):
        block.register_forward_hook(_layer_hook(layer))

    forward = runner._model_forward

    def model_forward(*args: Any, **kwargs: Any) -> Any:
        STATE.plan = STATE.plan_step(runner, kwargs.get("positions"))
        try:
            return forward(*args, **kwargs)
        finally:
            plan, STATE.plan = STATE.plan, None
            if plan is not None:
                plan.finish()

    execute = runner.execute_model

    def execute_model(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        STATE.finished(getattr(scheduler_output, "finished_req_ids", None))
        return execute(scheduler_output, *args, **kwargs)

    runner._model_forward = model_forward
    runner.execute_model = execute_model
    log.info("personaxis: ops installed on %d decoder layers", len(blocks))
