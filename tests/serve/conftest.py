from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from serve.serving_helpers import make_app, random_vectors, serving

from personaxis.model import ChatModel
from personaxis.vectors.cap import CapConfig


@pytest.fixture(scope="session")
def model(tiny) -> ChatModel:
    return tiny


@pytest.fixture(scope="session")
def artifacts(model):
    axis = random_vectors(model, ("axis",), seed=1)
    return {
        "axis": axis,
        "vectors": {
            "evil": random_vectors(model, ("evil",), seed=2),
            "traits": random_vectors(model, ("calm", "witty"), seed=3),
        },
        # a floor far above every activation: whenever it is on, it bites
        "caps": CapConfig.from_vectors(axis, {1: 100.0, 2: 100.0}),
    }


@pytest.fixture
def client(model, artifacts) -> Iterator[TestClient]:
    with TestClient(make_app(model, artifacts)) as c:
        yield c


@pytest.fixture
def live(model, artifacts) -> Iterator[tuple[str, FastAPI]]:
    app = make_app(model, artifacts)
    with serving(app) as url:
        yield url, app
