"""Drift conversations (science.md §2.5): scripted multi-turn conversations in four domains, and the prompt of a
simulated user that continues them.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from personaxis.axis.evals.common import (
    Domain,
    Id,
    StrictModel,
    Text,
    check_placeholders,
    check_unique,
    load_set,
)

# --- drift conversations ------------------------------------------------------------------------------------------


class Conversation(StrictModel):
    """Scripted user turns; the model answers each at run time, and drift is read per assistant turn.

    `topic` and `persona` describe the user, so a simulated user can carry the conversation further.
    """

    id: Id
    domain: Domain
    topic: Text
    persona: Text
    turns: list[Text] = Field(min_length=1)


class ConversationSet(StrictModel):
    description: str = ""
    conversations: list[Conversation] = Field(min_length=1)

    @field_validator("conversations")
    @classmethod
    def _unique_ids(cls, conversations: list[Conversation]) -> list[Conversation]:
        check_unique((c.id for c in conversations), "conversation id")
        return conversations

    def by_domain(self, domain: Domain) -> list[Conversation]:
        return [c for c in self.conversations if c.domain == domain]


class SimulatedUserPrompt(StrictModel):
    """System prompt for an LLM that plays the user and writes the next user message.

    The conversation so far goes to that LLM with the roles swapped (the model's replies as user turns), so its
    own reply is the next user message; `end_token` in that reply ends the conversation.
    """

    template: Text
    end_token: Text = "END_CONVERSATION"

    @field_validator("template")
    @classmethod
    def _slots(cls, template: str) -> str:
        return check_placeholders(template, {"persona", "topic", "domain"})

    @model_validator(mode="after")
    def _mentions_end(self) -> SimulatedUserPrompt:
        if self.end_token not in self.template:
            raise ValueError(f"template never tells the simulated user to write {self.end_token!r}")
        return self

    def render(self, *, persona: str, topic: str, domain: str) -> str:
        return self.template.format(persona=persona, topic=topic, domain=domain)

    def is_end(self, message: str) -> bool:
        return self.end_token in message


def load_conversations(path: str | Path | None = None) -> ConversationSet:
    """The scripted drift conversations (packaged `conversations.json` unless `path` is given)."""
    return load_set(ConversationSet, "conversations.json", path)


def load_simulated_user(path: str | Path | None = None) -> SimulatedUserPrompt:
    """The simulated-user prompt template (packaged `simulated_user.json` unless `path` is given)."""
    return load_set(SimulatedUserPrompt, "simulated_user.json", path)
