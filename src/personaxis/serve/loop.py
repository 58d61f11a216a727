"""The closed loop: watch each conversation's axis projection per assistant turn and cap it once it drifts.

Drift is measured as the Assistant Axis paper does (§2.5): the mean projection of an assistant turn's tokens on the
axis at its layer. When the mean of the last `window` turns falls below `threshold`, an alarm is raised and, if a cap
is configured, capping switches on for the rest of that conversation (§2.6). It stays on: a conversation that drifted
once is likely to drift again, and switching back and forth would make the persona flicker.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ClosedLoop:
    """Policy: which vector to watch, below which turn-mean projection to act, over how many recent turns."""

    threshold: float | None = None  # None: the loop only records projections
    window: int = 2
    vector: str = "axis"
    cap: str = "default"
    max_conversations: int = 10_000

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError("window must be at least 1 turn")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError("threshold must be finite")


@dataclass
class Conversation:
    turns: dict[int, float] = field(default_factory=dict)  # assistant turn index -> mean projection
    capped: bool = False


def conversation_key(explicit: str | None, messages: list[dict[str, str]]) -> str:
    """The client's id, or a hash of the conversation's opening (system prompts and first user message)."""
    if explicit:
        return explicit
    opening = []
    for message in messages:
        opening.append(message)
        if message["role"] == "user":
            break
    digest = hashlib.sha256(json.dumps(opening, sort_keys=True).encode()).hexdigest()[:16]
    return f"h-{digest}"


class Conversations:
    """Per-conversation state, bounded (least recently used are forgotten), safe to use from any thread."""

    def __init__(self, policy: ClosedLoop) -> None:
        self.policy = policy
        self._state: OrderedDict[str, Conversation] = OrderedDict()
        self._lock = threading.Lock()

    def capped(self, key: str) -> bool:
        with self._lock:
            state = self._state.get(key)
            return bool(state and state.capped)

    def record(self, key: str, turn: int, mean: float | None, can_cap: bool) -> dict:
        """Add a finished turn; return the loop's verdict and the events it raised."""
        policy = self.policy
        with self._lock:
            state = self._state.pop(key, None) or Conversation()
            self._state[key] = state
            while len(self._state) > policy.max_conversations:
                self._state.popitem(last=False)
            if mean is not None and math.isfinite(mean):
                state.turns[turn] = mean
            recent = [state.turns[t] for t in sorted(state.turns) if t <= turn][-policy.window :]
            window_mean = sum(recent) / len(recent) if recent else None
            events = []
            if policy.threshold is not None and window_mean is not None and window_mean < policy.threshold:
                events.append({"type": "alarm", "turn": turn, "window_mean": window_mean})
                if can_cap and not state.capped:
                    state.capped = True
                    events.append({"type": "cap_on", "turn": turn, "cap": policy.cap, "applies_from_turn": turn + 1})
            return {
                "capped": state.capped,
                "window_mean": window_mean,
                "threshold": policy.threshold,
                "window": policy.window,
                "events": events,
            }
