"""Vector artifacts: per-layer directions and capping configs, their files, and the reference formats.

Layer i is always the output of decoder block i (0-based) = Hugging Face `hidden_states[i + 1]` = llama.cpp
`direction.i`. Every other indexing is converted at the boundary, in `importers` and `gguf_io`.
"""

from personaxis.vectors.artifact import VectorMeta, Vectors, config_hash, load_vectors_dir
from personaxis.vectors.cap import CapConfig, CapKind, CapMeta
from personaxis.vectors.gguf_io import export_gguf, import_gguf
from personaxis.vectors.importers import import_capping_config, import_reference, import_vectors, load_pt

__all__ = [
    "CapConfig",
    "CapKind",
    "CapMeta",
    "VectorMeta",
    "Vectors",
    "config_hash",
    "export_gguf",
    "import_capping_config",
    "import_reference",
    "import_gguf",
    "import_vectors",
    "load_pt",
    "load_vectors_dir",
]
