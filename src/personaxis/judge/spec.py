"""Judges named on the command line: `local:MODEL` or `openai:MODEL@BASE_URL` (key from $OPENAI_API_KEY)."""

from __future__ import annotations

import os
from typing import Any

from personaxis.errors import PersonaxisError
from personaxis.judge.base import Judge

JUDGE_HELP = "local:MODEL (a model personaxis can load; 'local:same' reuses the studied model) or openai:MODEL@BASE_URL"


def judge_from_spec(spec: str, *, cache: Any = None, same: Any = None) -> Judge:
    """Build a judge from its spec; `same` is the studied ChatModel, used for `local:same` to avoid a second load."""
    kind, _, rest = spec.partition(":")
    if kind == "local" and rest:
        from personaxis.judge.local import LocalJudge

        if rest == "same":
            if same is None:
                raise PersonaxisError("judge 'local:same' needs a studied model")
            model = same
        else:
            from personaxis.model import load_model

            model = load_model(rest)
        return LocalJudge(model.model, model.tokenizer, cache=cache, judge_id=f"local:{model.name}")
    if kind == "openai" and "@" in rest:
        from personaxis.judge.api import OpenAIJudge

        name, _, base_url = rest.partition("@")
        return OpenAIJudge(base_url, name, os.environ.get("OPENAI_API_KEY"), cache=cache)
    raise PersonaxisError(f"bad judge {spec!r}: use {JUDGE_HELP}")
