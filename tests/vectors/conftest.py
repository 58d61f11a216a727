"""Small random artifacts: no model is needed to test files, checks and formulas.

Every builder makes vectors for a model "tiny/model" with 6 layers and hidden size 8.
"""

from collections.abc import Callable, Sequence
from types import SimpleNamespace

import pytest
import torch

from personaxis.vectors import VectorMeta, Vectors

HIDDEN, N_LAYERS, MODEL_ID = 8, 6, "tiny/model"


def _meta(**overrides) -> VectorMeta:
    fields = dict(
        model_id=MODEL_ID,
        hidden_size=HIDDEN,
        n_layers=N_LAYERS,
        method="mean_diff",
        points_toward="more evil",
        aggregation="response_mean",
        counts={"pos": 12, "neg": 10},
        mean_norms={i: 10.0 + i for i in range(N_LAYERS)},
        config_hash="0" * 64,
        extra={"note": "test", "nested": {"a": [1, 2.5]}},
    )
    return VectorMeta(**(fields | overrides))


@pytest.fixture
def make_meta() -> Callable[..., VectorMeta]:
    return _meta


@pytest.fixture
def make_vectors() -> Callable[..., Vectors]:
    def make(names: Sequence[str] = ("evil",), layers: Sequence[int] = (1, 2, 4), seed: int = 0, **over) -> Vectors:
        gen = torch.Generator().manual_seed(seed)
        data = {n: torch.randn(len(layers), HIDDEN, generator=gen) for n in names}
        return Vectors(layers, data, _meta(**over))

    return make


@pytest.fixture
def model_info() -> SimpleNamespace:
    return SimpleNamespace(name=MODEL_ID, n_layers=N_LAYERS, hidden_size=HIDDEN)
