"""The intervention engine: one set of hooks per model, and the ops it runs."""

from personaxis.engine.hooks import Engine, Trace, engine_for
from personaxis.engine.ops import Ablate, Add, Cap, Op, Project, Record

__all__ = ["Ablate", "Add", "Cap", "Engine", "Op", "Project", "Record", "Trace", "engine_for"]
