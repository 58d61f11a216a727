"""Persona vectors (science.md §1): the trait library, extraction, calibration, steering, monitoring and reports.

The submodules are `generator`, `extraction`, `calibrate`, `steer`, `monitor`, `report`, `plots` and `cli`.

The library (`load_trait`, `TraitSpec`) imports nothing heavy; the pipeline names below load on first use, so reading
a trait file never pulls in torch.
"""

from importlib import import_module
from typing import Any

from personaxis.traits.library import TraitSpec, list_traits, load_trait, parse_trait, save_trait

_LAZY = {
    "ExtractSettings": "extraction",
    "Thresholds": "extraction",
    "extract_trait": "extraction",
    "CalibrateSettings": "calibrate",
    "MonitorSettings": "monitor",
    "monitor_eval": "monitor",
    "prompt_projections": "monitor",
    "trait_steering": "steer",
    "trait_steer_op": "steer",
    "write_trait": "generator",
    "write_report": "report",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"personaxis.traits.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'personaxis.traits' has no attribute {name!r}")


__all__ = ["TraitSpec", "list_traits", "load_trait", "parse_trait", "save_trait", *_LAZY]
