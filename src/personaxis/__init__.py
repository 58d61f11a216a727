"""personaxis: map, monitor and stabilize the persona of open-weights chat models.

Everything a notebook needs is here, in one import (names load on first use, so `import personaxis` stays light):

    import personaxis as px

    model = px.load_model("default")                      # a hub id, a folder, a .gguf, or a model already loaded
    trait = px.Vectors.load("trait.safetensors")
    with px.steer(model, trait, 0.15, 14), px.monitor(model, trait, 14) as trace:
        replies = px.generate(model, [[{"role": "user", "content": "Plan my weekend"}]], px.Sampling(max_new_tokens=32))

- models and generation: `load_model`, `wrap_model`, `ChatModel`, `generate`, `Sampling`, `Generation`;
- artifacts: `Vectors`, `CapConfig`, `export_gguf`, `import_gguf`, `import_reference`;
- extraction: `mean_difference`, `mean_vectors`;
- ops as context managers on a `ChatModel` or a plain Hugging Face model (the model is untouched afterwards):
  `steer`, `ablate`, `cap`, `monitor` (they nest); as ops for `generate(..., ops=)` or `engine_for(model).apply(ops)`:
  `steer_op`, `ablate_op`, `cap_op`, `project_op` and the engine's own `Add`, `Ablate`, `Cap`, `Project`, `Record`;
- the two pipelines: `build_axis` with `BuildConfig` (the Assistant Axis), `extract_trait` with `ExtractSettings` and
  `load_trait` (persona vectors);
- `VLLMModel` (needs vLLM: docs/vllm.md); `PersonaxisError`, the one error a user mistake raises.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ChatModel": "personaxis.model.loading",
    "load_model": "personaxis.model.loading",
    "wrap_model": "personaxis.model.loading",
    "Generation": "personaxis.inference.generation",
    "Sampling": "personaxis.inference.generation",
    "generate": "personaxis.inference.generation",
    "CapConfig": "personaxis.vectors",
    "Vectors": "personaxis.vectors",
    "export_gguf": "personaxis.vectors",
    "import_gguf": "personaxis.vectors",
    "import_reference": "personaxis.vectors",
    "mean_difference": "personaxis.inference.means",
    "mean_vectors": "personaxis.inference.means",
    "ablate": "personaxis.inference.steering",
    "ablate_op": "personaxis.inference.steering",
    "cap": "personaxis.inference.steering",
    "cap_op": "personaxis.inference.steering",
    "monitor": "personaxis.inference.steering",
    "project_op": "personaxis.inference.steering",
    "steer": "personaxis.inference.steering",
    "steer_op": "personaxis.inference.steering",
    "Ablate": "personaxis.engine",
    "Add": "personaxis.engine",
    "Cap": "personaxis.engine",
    "Project": "personaxis.engine",
    "Record": "personaxis.engine",
    "engine_for": "personaxis.engine",
    "BuildConfig": "personaxis.axis.build",
    "build_axis": "personaxis.axis.build",
    "ExtractSettings": "personaxis.traits.extraction",
    "extract_trait": "personaxis.traits.extraction",
    "load_trait": "personaxis.traits.library",
    "VLLMModel": "personaxis.vllm",
    "PersonaxisError": "personaxis.errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'personaxis' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
