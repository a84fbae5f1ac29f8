"""The bodies the gateway's routes accept, as pydantic models (strict: no silent coercion).

Chat: only what the gateway itself relies on is validated (alias, messages, stream, n), and the
prompt-scoring parameters are refused; sampling parameters pass through and vLLM validates them,
answering its own OpenAI-style 400.
Feedback: `feedback.FeedbackRequest` (the feedback package validates its own events). Admin:
the SQL and adapter-action bodies below. A body that fails gets 422 naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from store import DEFAULT_ALIAS


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


# Log-probabilities of the prompt's own tokens. vLLM computes them in the step's LoRA batch
# layout, and with runtime LoRA on the CPU build one such request sharing a step with requests
# on an adapter kills the engine core (punica_cpu `bgmv_shrink`, in
# `_get_prompt_logprobs_dict`) — every client's requests with it. `echo` turns them on in chat.
_PROMPT_SCORING = ("prompt_logprobs", "prompt_logprob_token_ids", "echo")
# OpenAI's limits on `metadata`: 16 pairs, keys up to 64 characters, values up to 512.
METADATA_MAX_PAIRS, METADATA_MAX_KEY, METADATA_MAX_VALUE = 16, 64, 512


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    n: int = 1
    prompt_logprobs: Any = None
    prompt_logprob_token_ids: Any = None
    echo: Any = False
    # OpenAI's: a string map stored with the completion (filterable in SQL), and whether to
    # store the exchange at all (`false`: answered, nothing captured). The gateway consumes
    # both; vLLM does not see them.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    user: str | None = None

    @field_validator("metadata")
    @classmethod
    def _openai_metadata(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        if metadata is None:
            return None
        if len(metadata) > METADATA_MAX_PAIRS:
            raise ValueError(f"{len(metadata)} pairs; at most {METADATA_MAX_PAIRS} are taken")
        for key, value in metadata.items():
            if len(key) > METADATA_MAX_KEY:
                raise ValueError(f"key {key[:20]!r}...: keys are at most {METADATA_MAX_KEY} "
                                 "characters")
            if len(value) > METADATA_MAX_VALUE:
                raise ValueError(f"value of {key!r}: values are at most {METADATA_MAX_VALUE} "
                                 "characters")
        return metadata

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported: the feedback store keeps one answer per id")
        return n

    @field_validator(*_PROMPT_SCORING)
    @classmethod
    def _no_prompt_scoring(cls, value: Any) -> Any:
        if value is None or value is False:  # `is`: prompt_logprobs 0 turns them on
            return value
        raise ValueError("log-probabilities of the prompt are not served here (leave out "
                         "echo, prompt_logprobs and prompt_logprob_token_ids); logprobs and "
                         "top_logprobs give the answer's")


class _Admin(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SqlRequest(_Admin):
    """POST /admin/sql: one read-only statement, its `?` parameters, a row limit."""

    sql: str = Field(min_length=1, pattern=r"\S")
    params: list[Any] = Field(default_factory=list)
    max_rows: int | None = Field(default=None, ge=0)  # capped at server.sql_max_rows


class PublishRequest(_Admin):
    """POST /admin/adapters/publish: a version folder; `promote` false loads and probes only."""

    path: str = Field(min_length=1)
    promote: bool = True


class PromoteRequest(_Admin):
    version: str = Field(min_length=1)


class RollbackRequest(_Admin):
    alias: str = DEFAULT_ALIAS


class KeyRequest(_Admin):
    """POST /admin/keys: a new principal and its scopes (chat, feedback, admin)."""

    name: str = Field(min_length=1)
    scopes: list[str] = Field(min_length=1)


class RevokeRequest(_Admin):
    name: str = Field(min_length=1)


class ReviewRequest(_Admin):
    """POST /admin/review/{approve|reject}: signal ids (feedback or follow-up ids)."""

    ids: list[str] = Field(min_length=1, max_length=10_000)


ADAPTER_ACTIONS: dict[str, type[_Admin]] = {
    "publish": PublishRequest, "promote": PromoteRequest, "rollback": RollbackRequest,
}
