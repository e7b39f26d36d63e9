"""OpenAI API request/response schemas (pydantic v2) for the grok1 server.

Requests are strict: an unknown field, a value out of range or of the wrong type is a 400 naming
the field (`ValidationError` -> `error_from_validation`). Fields OpenAI defines but grok1 does not
implement (penalties, logit_bias, best_of, suffix, tools, ...) are accepted only at their neutral
value. `top_k` is an extension (vLLM's: 0 or -1 = off).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_LOGPROBS = 20  # top alternatives per token (OpenAI allows 5 legacy / 20 chat)
MAX_STOP_STRINGS = 16


class ProtocolError(ValueError):
    """A request the server refuses: HTTP status plus OpenAI error fields."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 code: str | None = None, type: str | None = None,
                 retry_after_s: int | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code
        self.retry_after_s = retry_after_s  # sent as Retry-After (503)
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # accepted (vLLM clients send it); usage only at the end


class _SamplingFields(_Strict):
    """Fields shared by completions and chat completions."""
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # extension; 0 or -1 = off
    n: int = Field(default=1, ge=1)
    stop: list[str] = []  # a string or a list of strings on the wire
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored
    # OpenAI fields grok1 does not implement: accepted at their neutral value only.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # extension (vLLM's): generate max_tokens even past eos

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, v: Any) -> Any:
        return [] if v is None else [v] if isinstance(v, str) else v

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stops: list[str]) -> list[str]:
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @model_validator(mode="after")
    def _check_unsupported(self) -> _SamplingFields:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ValueError(f"{name} is not supported by this server (only 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported by this server (only best_of == n)")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return [""]  # an empty list is an empty prompt (refused later as such)
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients attach name, refusal, annotations...
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format other than text is not supported by this server")
        if self.tools or self.tool_choice not in (None, "none"):
            raise ValueError("tools are not supported by this server (Grok-1 is a base model)")
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise ValueError("max_tokens and max_completion_tokens disagree; give one")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens


# ---- responses -----------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy format; prompt tokens (echo) have null logprobs: the engine scores only
    the tokens it generates."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "grok1"
    max_model_len: int | None = None  # extension, as vLLM's


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_body(e: ProtocolError) -> dict[str, Any]:
    return ErrorResponse(error=ErrorInfo(message=e.message, type=e.type, param=e.param,
                                         code=e.code)).model_dump()


def _is_branch(part: Any) -> bool:
    """A union branch or validator name in a pydantic error location (`list[int]`, `str`)."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def error_from_validation(e: ValidationError) -> ProtocolError:
    """The first pydantic error as a 400 naming the field (`messages.0.role`) and the value.
    For a union field (prompt, content) it lists the accepted forms and the deepest error."""
    errors = e.errors(include_url=False)
    err = errors[0]
    param = ".".join(str(x) for x in err["loc"] if not _is_branch(x)) or None
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown parameter (not part of this API)"
    elif err["type"] == "missing":
        msg = "required parameter is missing"
    branch_at = next((i for i, x in enumerate(err["loc"]) if _is_branch(x)), None)
    if branch_at is not None:  # a union: every branch failed
        head = err["loc"][:branch_at]
        same = [x for x in errors if x["loc"][:branch_at] == head and len(x["loc"]) > branch_at]
        forms = list(dict.fromkeys(str(x["loc"][branch_at]) for x in same))
        deepest = max(same, key=lambda x: len(x["loc"]))
        where = ".".join(str(x) for x in deepest["loc"] if not _is_branch(x))
        msg = f"expected {' or '.join(forms)}"
        if len(deepest["loc"]) > branch_at + 1:
            msg += f"; {where}: {deepest['msg']}"
    shown = repr(err.get("input"))
    value = f" (got {shown[:80]})" if param and err["type"] != "missing" else ""
    return ProtocolError(f"{param + ': ' if param else ''}{msg}{value}", param=param,
                         code="invalid_value")
