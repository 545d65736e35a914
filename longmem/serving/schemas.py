"""Request and response models of the HTTP API (pydantic, which FastAPI ships), and request parsing.

A body is read by :func:`parse_json` (plain JSON only: a non-finite number anywhere or deep nesting is a
400 before any model sees it), then validated by its model: strict types (``"5"`` is not an integer),
unknown fields refused, and every error turned into one message naming the field (:func:`describe`).
Ranges that depend on the server's settings or the model (``max_tokens``, prompt size, ``logit_bias``
token ids) are checked after, by the server; the sampling values by ``SamplingConfig``.
"""
from __future__ import annotations

import json
import math
from typing import Any, Literal, NoReturn

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from longmem.generation.session import check_session_name

MAX_STOP = 4                          # stop strings a request may add, as OpenAI's API
MAX_LOGIT_BIAS = 300                  # logit_bias entries a request may hold, as OpenAI's API


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` and the JSON error's ``message`` and ``type``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_json(raw: bytes) -> Any:
    """The request body; RequestError (400) for anything that is not plain JSON with finite numbers."""
    def refuse(text: str) -> NoReturn:
        raise RequestError(400, f"the request holds the number {text}; every number must be finite")

    def finite(text: str) -> float:
        v = float(text)
        return v if math.isfinite(v) else refuse(text)

    try:
        return json.loads(raw, parse_constant=refuse, parse_float=finite)
    except RecursionError:
        raise RequestError(400, "the request body is nested too deeply") from None
    except ValueError as e:                                    # JSONDecodeError, UnicodeDecodeError, digit limit
        raise RequestError(400, f"the request body is not valid JSON: {e}") from None


_EXPECTED = {"int_type": "an integer", "float_type": "a finite number", "string_type": "a string",
             "bool_type": "true or false", "dict_type": "an object", "list_type": "a list",
             "literal_error": None, "finite_number": "a finite number"}


def describe(error: ValidationError, model: type[BaseModel]) -> str:
    """One message for a pydantic ValidationError: unknown fields listed with the accepted ones, else each
    wrong field named with what it must be and what it was (at most three)."""
    errors = error.errors()
    unknown = [".".join(map(str, e["loc"])) for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        where = errors[[e["type"] for e in errors].index("extra_forbidden")]["loc"][:-1]
        where = tuple(p for p in where if "[" not in str(p))            # union branches named in the path
        return (f"unknown field(s) {sorted(u.rsplit('.', 1)[-1] for u in unknown)}"
                f"{' in ' + '.'.join(map(str, where)) if where else ''}; accepted: "
                f"{', '.join(sorted(_model_at(model, where).model_fields))}")
    if any(e["type"] == "model_type" and not e["loc"] for e in errors):
        return "the request body must be a JSON object"
    out, seen = [], set()
    for e in errors:
        loc = ".".join(str(p) for p in e["loc"] if "[" not in str(p) and p not in ("str", "int", "float", "bool"))
        if loc in seen:                                         # one message per field (unions fail per branch)
            continue
        seen.add(loc)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "value_error":
            out.append(msg)
        elif _EXPECTED.get(e["type"]):
            out.append(f"'{loc}' must be {_EXPECTED[e['type']]}, got {_short(e.get('input'))}")
        else:
            out.append(f"'{loc}': {msg[:1].lower() + msg[1:]}, got {_short(e.get('input'))}")
    return "; ".join(out[:3]) or "invalid request"


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel]:
    """The model holding the fields at ``loc`` (field names and list indices) inside ``model``."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is not None:
            model = next((a for a in _types(field.annotation) if isinstance(a, type) and issubclass(a, BaseModel)),
                         model)
    return model


def _types(annotation: Any) -> list[Any]:
    """The types inside an annotation: ``list[ChatMessage] | None`` -> [ChatMessage, None]."""
    args = getattr(annotation, "__args__", None)
    return [t for a in args for t in _types(a)] if args else [annotation]


def validate(model: type[BaseModel], body: Any) -> Any:
    """``model.model_validate(body)``; RequestError (400) with :func:`describe`'s message."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise RequestError(400, describe(e, model)) from None


# -- requests ------------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="send a last chunk with the token counts (choices empty)")


class _Sampling(_Strict):
    """Fields of both completion requests (the OpenAI ones and longmem's extras)."""
    model: str | None = Field(None, description="accepted and ignored: the server serves one model")
    temperature: float | None = Field(None, description="divide logits by this; 0 is greedy [default 1]")
    top_p: float | None = Field(None, description="nucleus sampling mass in (0, 1] [default 1]")
    top_k: int | None = Field(None, description="keep the k most likely tokens, 0: all (longmem)")
    min_p: float | None = Field(None, description="min-p sampling threshold in [0, 1] (longmem)")
    repetition_penalty: float | None = Field(None, description="CTRL penalty, 1: off (longmem)")
    presence_penalty: float | None = Field(None, description="in [-2, 2]")
    frequency_penalty: float | None = Field(None, description="in [-2, 2]")
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} strings that end the answer")
    seed: int | None = Field(None, description="same seed, same text [default: random]")
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias in [-100, 100]")
    stream: bool = Field(False, description="send the answer as server-sent events, ending with data: [DONE]")
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, description="must be 1")
    session: str | None = Field(None, description="the session whose memory the request reads and extends "
                                                  "(created on first use); longmem's own field")
    user: str | None = Field(None, description="the session, when 'session' is not given")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        stops = [v] if isinstance(v, str) else (v or [])
        if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: Any) -> Any:
        if v is not None and len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"'logit_bias' must be an object {{token id: bias}} with at most {MAX_LOGIT_BIAS} "
                             f"entries")
        return v

    @field_validator("n")
    @classmethod
    def _one(cls, v: Any) -> Any:
        if v not in (None, 1):
            raise ValueError("'n' must be 1 (one completion per request)")
        return v

    @field_validator("session", "user")
    @classmethod
    def _name(cls, v: Any) -> Any:
        return None if v is None else check_session_name(v)

    @property
    def session_name(self) -> str | None:
        return self.session or self.user


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""
    prompt: str | list[str] = Field(description="the text to continue (a list of one string is accepted)")
    max_tokens: int | None = Field(None, description="tokens to generate at most [default 16]")
    echo: bool | None = Field(None, description="accepted and ignored")
    suffix: str | None = Field(None, description="accepted and ignored")
    logprobs: int | None = Field(None, description="accepted and ignored")
    best_of: int | None = Field(None, description="accepted and ignored")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) == 1:
            v = v[0]
        if not isinstance(v, str) or not v:
            raise ValueError("'prompt' must be a non-empty string")
        return v


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(None, description="text, or a list of text parts")
    name: str | None = Field(None, description="accepted and ignored")

    def plain(self) -> dict[str, str]:
        """``{"role", "content"}`` as chat templates take it: text parts joined, ``developer`` as ``system``."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far (see the session rule)")
    max_tokens: int | None = Field(None, description="tokens to generate at most")
    max_completion_tokens: int | None = Field(None, description="the same as max_tokens (OpenAI's newer name)")
    logprobs: bool | None = Field(None, description="false only")

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: Any) -> Any:
        if v:
            raise ValueError("'logprobs' is not supported; leave it out or false")
        return v


class InspectRequest(_Strict):
    """``POST /v1/inspect``."""
    text: str = Field(min_length=1, description="the text fed through the memory")
    session: str | None = Field(None, description="read the text after this session's memory (left unchanged)")
    top: int = Field(5, ge=1, le=32, description="retrieved entries shown per token, layer and head")
    layers: list[int] | None = Field(None, description="layers whose attention is summarized [default: all]")

    @field_validator("session")
    @classmethod
    def _name(cls, v: Any) -> Any:
        return None if v is None else check_session_name(v)


# -- responses -----------------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SessionInfo(BaseModel):
    """longmem's addition to a response that named a session."""
    session: str
    turns: int
    tokens: int = Field(description="tokens the memory has read (prompts and answers)")
    memory_bytes: int
    memory_parts: list[str]
    memory_reset: bool = Field(description="the memory went past max_session_bytes and was cleared")
    messages: int = Field(0, description="chat messages the memory holds (chat API)")
    messages_fed: int | None = Field(None, description="messages of this request fed to the memory (chat API)")


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    session: SessionInfo | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: None = None
    session: SessionInfo | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion (``data: {...}``; the stream ends with
    ``data: [DONE]``)."""
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "longmem"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str


class ErrorResponse(BaseModel):
    """Every error the server answers, whatever its status."""
    error: ErrorDetail


class SessionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]] = Field(description="{'session': name, 'live': in RAM now} per session")


class InspectResponse(BaseModel):
    """What ``generation.inspect.inspect_text`` reports (see its docstring)."""
    model_config = ConfigDict(extra="allow")
    tokens: list[dict[str, Any]]
    memory: str
    segment_len: int
    layers: list[int]
    bins: list[str]
    attention: dict[str, Any]
    segments: list[dict[str, Any]]
    knn: dict[str, Any] | None
    memory_tokens: dict[str, Any] | None
