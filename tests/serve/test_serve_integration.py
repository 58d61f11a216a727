"""The real embedded model behind the server, through the official SDK."""

from __future__ import annotations

import openai
import pytest
from serve.serving_helpers import serving

from personaxis.serve import Limits, create_app

pytestmark = pytest.mark.integration


def test_default_model_chat_with_steering():
    from personaxis.model import load_model

    model = load_model("default")
    with serving(create_app(model, limits=Limits(max_tokens=32))) as url:
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = sdk.chat.completions.create(
            model=model.name, messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=16, temperature=0
        )
        assert "4" in reply.choices[0].message.content
        stream = sdk.chat.completions.create(
            model=model.name,
            messages=[{"role": "user", "content": "What is 2 + 2?"}],
            max_tokens=16,
            temperature=0,
            stream=True,
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert streamed == reply.choices[0].message.content
