"""Run store: sample-level records of every pipeline stage, atomic and resumable, plus atomic file writes."""

from personaxis.store.atomic import atomic_dir, atomic_write_bytes, atomic_write_text
from personaxis.store.runstore import Record, RunStore, canonical_json, key

__all__ = ["Record", "RunStore", "atomic_dir", "atomic_write_bytes", "atomic_write_text", "canonical_json", "key"]
