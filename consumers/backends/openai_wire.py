"""The OpenAI-compatible protocol as tribunal speaks it: the backend's options, the request
body with its label-set constraint (in the style each server understands: vLLM's
``structured_outputs``/``guided_choice``, ``response_format``, llama.cpp's GBNF
``grammar``), and a completion response read into a ``ModelOutput``.

Field names follow the servers' docs: OpenAI's chat/completions API, vLLM's structured
outputs, llama.cpp's server README (``grammar``, ``n_probs``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal, Required, TypeAlias, TypedDict

import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from consumers.backends.answers import ModelOutput
from consumers.backends.logprobs import TokenLogprob, logprob_of

Constraint = Literal["structured_outputs", "guided_choice", "response_format", "grammar", "none"]
Endpoint = Literal["chat", "completion"]
# A JSON value, as json.loads returns it.
JSONValue: TypeAlias = "str | int | float | bool | list[JSONValue] | dict[str, JSONValue] | None"
# Output tokens per constraint style: a bare label is a few tokens, JSON and free text more.
DEFAULT_MAX_TOKENS: dict[str, int] = {
    "structured_outputs": 16,
    "guided_choice": 16,
    "grammar": 16,
    "response_format": 32,
    "none": 48,
}


class OpenAIOptions(BaseModel):
    """The backend's ``options`` in the fleet file; unknown keys are an error at start."""

    model_config = ConfigDict(extra="forbid")

    base_url: str  # up to and including /v1, e.g. http://127.0.0.1:8001/v1
    model: str
    api_key: SecretStr | None = None  # SecretStr: never shown in logs or reprs
    api_key_env: str | None = None  # or the name of an environment variable holding it
    endpoint: Endpoint = "chat"
    constraint: Constraint = "structured_outputs"
    logprobs: bool = True
    top_logprobs: int = Field(default=10, ge=1, le=20)  # vLLM caps it at --max-logprobs (20)
    max_tokens: int | None = Field(default=None, ge=1)
    max_concurrency: int = Field(default=16, ge=1, le=1024)
    timeout_s: float = Field(default=20.0, gt=0)
    max_retries: int = Field(default=2, ge=0, le=20)
    backoff_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=8.0, ge=0)
    retry_after_max_s: float = Field(default=30.0, ge=0)
    extra_body: dict[str, Any] = Field(default_factory=dict)  # merged into every request

    def key(self) -> str | None:
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_env:
            value = os.environ.get(self.api_key_env)
            if not value:
                raise ValueError(f"api_key_env names {self.api_key_env!r}, which is not set")
            return value
        return None


class ChoiceConstraint(TypedDict):
    """vLLM's ``structured_outputs``: the answer is one of ``choice``."""

    choice: list[str]


class JSONSchema(TypedDict):
    name: str
    schema: dict[str, JSONValue]
    strict: bool


class ResponseFormat(TypedDict):
    """OpenAI's ``response_format`` asking for JSON that follows a schema."""

    type: Literal["json_schema"]
    json_schema: JSONSchema


class ConstraintFields(TypedDict, total=False):
    """The request fields that restrict the answer to the labels (one per style)."""

    grammar: str  # llama-server: a GBNF grammar
    structured_outputs: ChoiceConstraint  # vLLM >= 0.11
    guided_choice: list[str]  # vLLM < 0.12
    response_format: ResponseFormat  # OpenAI and most servers


class RequestBody(ConstraintFields, total=False):
    """A (chat) completion request for one item. ``extra_body`` may add keys of its own."""

    model: Required[str]
    temperature: Required[float]
    max_tokens: Required[int]
    messages: list[dict[str, str]]  # chat: the task's messages
    prompt: str  # completion: the task's plain prompt
    stop: list[str]
    logprobs: bool | int  # chat: true; completions: the number of top tokens
    top_logprobs: int


def gbnf_choice(labels: Sequence[str], lead: str = "") -> str:
    """A GBNF grammar (llama.cpp's grammar format, grammars/README.md there) whose only
    sentences are the labels, each after ``lead``.

    After a completion prompt ending in "Answer:" the lead must be the space the
    tokenizer puts before a word: without it a model is forced into a tokenization it
    never saw (Gemma-3-270M fell from 0.91 to 0.60, shared/FACTS.md)."""
    literal = [orjson.dumps(lead + label).decode() for label in labels]  # JSON escapes = GBNF's
    return "root ::= " + " | ".join(literal)


def constraint_fields(
    style: Constraint, labels: Sequence[str], endpoint: Endpoint = "chat"
) -> ConstraintFields:
    """The request fields that restrict the answer to the labels, per server generation."""
    if style == "grammar":  # llama.cpp's llama-server
        return {"grammar": gbnf_choice(labels, " " if endpoint == "completion" else "")}
    if style == "structured_outputs":  # vLLM >= 0.11
        return {"structured_outputs": {"choice": list(labels)}}
    if style == "guided_choice":  # vLLM < 0.12 (ignored by newer servers)
        return {"guided_choice": list(labels)}
    if style == "response_format":  # OpenAI, llama.cpp, Ollama, TGI, vLLM: JSON schema
        schema: dict[str, JSONValue] = {
            "type": "object",
            "properties": {"label": {"type": "string", "enum": list(labels)}},
            "required": ["label"],
            "additionalProperties": False,
        }
        return {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "label", "schema": schema, "strict": True},
            }
        }
    return {}


def parse_completion(data: Any) -> ModelOutput:
    """The answer of a chat completion or completion body: its text, per-token logprobs,
    ``finish_reason``, and the reasoning of servers that file it apart from the content
    (``reasoning_content``: llama-server, SGLang, older vLLM; ``reasoning``: newer vLLM).

    Logprobs come as ``logprobs.content[i] = {token, logprob, top_logprobs: [{token,
    logprob}]}`` (chat completions; llama-server also for completions) or in the legacy
    completions shape ``logprobs = {tokens, token_logprobs, top_logprobs: [{token:
    logprob}]}`` (vLLM's /v1/completions). A null or missing logprob is kept as unknown;
    logprobs in any other shape cost the answer its confidence, never its vote."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices or not isinstance(choices, list):
        raise ValueError("the server returned no choices")
    choice = choices[0]
    message = choice.get("message")
    if isinstance(message, dict):
        text = message.get("content")
        reasoning = message.get("reasoning_content") or message.get("reasoning")
    else:
        text, reasoning = choice["text"], None
    text = text or ""
    if not isinstance(text, str):
        raise TypeError(f"message content is {type(text).__name__}, not text")
    logprobs = choice.get("logprobs")
    tokens: list[TokenLogprob] | None = None
    try:
        if isinstance(logprobs, dict) and logprobs.get("content"):
            tokens = [
                TokenLogprob(
                    str(e["token"]),
                    logprob_of(e.get("logprob")),
                    tuple(
                        (str(t["token"]), logprob_of(t.get("logprob")))
                        for t in e.get("top_logprobs") or ()
                    ),
                )
                for e in logprobs["content"]
            ]
        elif isinstance(logprobs, dict) and logprobs.get("tokens"):
            tops = logprobs.get("top_logprobs") or [None] * len(logprobs["tokens"])
            tokens = [
                TokenLogprob(
                    str(tok),
                    logprob_of(lp),
                    tuple((str(t), logprob_of(v)) for t, v in (top or {}).items()),
                )
                for tok, lp, top in zip(
                    logprobs["tokens"], logprobs["token_logprobs"], tops, strict=True
                )
            ]
    except (KeyError, TypeError, ValueError, AttributeError):
        tokens = None  # an unreadable logprob list: no confidence, the label still counts
    finish = choice.get("finish_reason")
    return ModelOutput(
        text,
        tokens,
        finish_reason=str(finish) if finish else None,
        reasoning=reasoning if isinstance(reasoning, str) else None,
    )


def prompt_usage(data: Any) -> tuple[int, int] | None:
    """(prompt tokens, of which reused from the server's prompt cache) of one answer, or
    None where the server does not say.

    llama-server reports ``timings = {cache_n, prompt_n, …}`` (tokens taken from the cache,
    tokens evaluated: its server README); OpenAI and vLLM (``--enable-prompt-tokens-details``)
    ``usage = {prompt_tokens, prompt_tokens_details: {cached_tokens}}``."""
    if not isinstance(data, dict):
        return None
    timings = data.get("timings")
    if isinstance(timings, dict):
        cached, evaluated = timings.get("cache_n"), timings.get("prompt_n")
        if isinstance(cached, int) and isinstance(evaluated, int):
            return cached + evaluated, cached
    usage = data.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        if isinstance(cached, int):
            return usage["prompt_tokens"], cached
    return None
