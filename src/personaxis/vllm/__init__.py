"""personaxis inside vLLM: the same ops, artifacts and request schema, with no fork of vLLM (docs/vllm.md).

- `plugin`: the `vllm.general_plugins` entry point (switched on by `PERSONAXIS_VLLM=1` or `PERSONAXIS_VECTORS`).
- `worker`: the layer hooks and the custom op that run the ops inside the worker.
- `steps`: requests and phases to rows, and the readouts, for one flattened batch (no vLLM import).
- `spec`: what a request asks for, in `SamplingParams.extra_args["personaxis"]` or `vllm_xargs`.
- `offline`: `VLLMModel`, generation with ops and one-pass capture on the offline engine.

Importing this package does not import vLLM.
"""

from __future__ import annotations

from typing import Any

__all__ = ["VLLMModel", "require_vllm"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from personaxis.vllm import offline

        return getattr(offline, name)
    raise AttributeError(name)
