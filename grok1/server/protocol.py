"""OpenAI API request/response schemas (pydantic v2) for the grok1 server.

Known fields are strict: a value out of range or of the wrong type is a 400 naming the field
(`ValidationError` -> `error_from_validation`). Unknown top-level fields (`store`, `metadata`,
`service_tier`, ... which SDKs and frameworks send) are accepted and ignored, and the server logs
one warning per request naming them, as vLLM does (`unknown_fields`). Types are pydantic's
strict ones, as OpenAI's API is strict: `"n": "2"`, `"stream": "yes"` and `[true, false]` as token ids are
refused, as are NaN and infinities. Every field is bounded (numbers, string lengths, list
lengths; prompt and message text by the body limit here and by serving.py's max_prompt_chars
before any tokenizing, as are the context and the vocabulary); text must be valid Unicode (a lone
UTF-16 surrogate such as "\ud800" is refused). Fields OpenAI defines but grok1 does not
implement (best_of, suffix, tools, ...) are accepted only at their neutral value. vLLM's
extensions: `top_k` (0 or -1 = off), `min_p`, `min_tokens`, `repetition_penalty`,
`stop_token_ids`, `include_stop_str_in_output`, `skip_special_tokens`, `ignore_eos`,
`prompt_logprobs` (completions).
"""

from __future__ import annotations

import re
import reprlib
import time
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

MAX_LOGPROBS = 20  # top alternatives per token (OpenAI allows 5 legacy / 20 chat)
MAX_STOP_STRINGS = 16
MAX_INT32 = 2**31 - 1  # counts (max_tokens, n, top_k, token ids): the engine keeps them in int32
MAX_NAME_CHARS = 256  # model, user, a stop string
MAX_PROMPTS = 1024  # prompts in one completion request (the server's max_choices is lower)
MAX_TOKEN_IDS = 1 << 20  # token ids in one prompt (beyond any context; checked against it later)
MAX_MESSAGES = 4096
MAX_CONTENT_PARTS = 1024
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_unicode(text: str) -> str:
    """JSON can spell a lone UTF-16 surrogate ("\\ud800"), which no encoder (nor the
    tokenizer) accepts: refuse it here, naming the field, instead of failing later."""
    bad = _LONE_SURROGATE.search(text)
    if bad:
        raise ValueError(f"lone surrogate U+{ord(bad.group()):04X} at character {bad.start()}: "
                         "text must be valid Unicode")
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
Name = Annotated[str, Field(max_length=MAX_NAME_CHARS), AfterValidator(_valid_unicode)]
Count = Annotated[int, Field(ge=1, le=MAX_INT32)]
TokenId = Annotated[int, Field(ge=0, le=MAX_INT32)]
Seed = Annotated[int, Field(ge=-2**63, le=2**63 - 1)]  # int64, as OpenAI's


def _one_of(forms: str, empty_list: str) -> Discriminator:
    """A union validated by the form its JSON value has (the tags below: "str", "list[str]",
    ...; `empty_list` for []): only that form is validated, so the client gets its error rather
    than one per form."""
    def form(value: Any) -> str | None:
        if isinstance(value, str):
            return "str"
        if isinstance(value, list):
            if not value:
                return empty_list
            return {str: "list[str]", list: "list[list[int]]",
                    dict: "list[part]"}.get(type(value[0]), "list[int]")
        return None
    return Discriminator(form, custom_error_type="invalid_form",
                         custom_error_message=f"expected {forms}")


Prompt = Annotated[Union[
    Annotated[Text, Tag("str")],
    Annotated[list[Text], Field(max_length=MAX_PROMPTS), Tag("list[str]")],
    Annotated[list[TokenId], Field(max_length=MAX_TOKEN_IDS), Tag("list[int]")],
    Annotated[list[Annotated[list[TokenId], Field(max_length=MAX_TOKEN_IDS)]],
              Field(max_length=MAX_PROMPTS), Tag("list[list[int]]")],
], _one_of("a string, a list of strings, a list of token ids or a list of token-id lists",
           empty_list="list[int]")]  # [] is an empty prompt, refused as such later


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
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _Request(_Strict):
    """A request body: its own fields strict, unknown top-level ones kept aside (model_extra)."""
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    @property
    def unknown_fields(self) -> list[str]:
        """Top-level fields this API does not define (accepted, ignored, logged)."""
        return sorted(self.model_extra or {})


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # accepted (vLLM clients send it); usage only at the end


class _SamplingFields(_Request):
    """Fields shared by completions and chat completions."""
    model: Name
    max_tokens: Count | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)  # < 1e-5: greedy
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=MAX_INT32)  # extension; 0 or -1 = off
    n: Count = 1
    stop: list[Name] = Field(default=[], max_length=MAX_STOP_STRINGS)  # a string or a list
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Name | None = None  # accepted and ignored
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    # token id (as a string, OpenAI's JSON) -> bias added to its logit
    logit_bias: dict[Name, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        default=None, max_length=300)
    ignore_eos: bool = False  # extension (vLLM's): generate max_tokens even past eos
    # vLLM's sampling extensions
    min_tokens: int = Field(default=0, ge=0, le=MAX_INT32)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    stop_token_ids: list[TokenId] = Field(default=[], max_length=MAX_STOP_STRINGS)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # Grok-1 never outputs its specials (eos ends a request)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, v: Any) -> Any:
        return [] if v is None else [v] if isinstance(v, str) else v

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stops: list[str]) -> list[str]:
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            if not key.isdigit() or int(key) > MAX_INT32:
                raise ValueError(f"keys must be token ids, got {key!r}")
        return bias

    @model_validator(mode="after")
    def _check_stream_options(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)



class CompletionRequest(_SamplingFields):
    prompt: Prompt
    max_tokens: Annotated[int, Field(ge=0, le=MAX_INT32)] | None = None  # 0: score the prompt
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # vLLM's extension: each prompt token's logprob and this many alternatives (choice field
    # prompt_logprobs)
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: Count | None = None
    suffix: Text | None = None

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
    text: Text


Content = Annotated[Union[
    Annotated[Text, Tag("str")],
    Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS), Tag("list[part]")],
], _one_of("a string or a list of text parts", empty_list="list[part]")]


class ChatMessage(BaseModel):
    # clients attach name, refusal, annotations...: ignored, but the fields read are strict
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Content | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ResponseFormat(_Strict):
    type: Literal["text"]  # json_object and json_schema are not supported


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.tools:
            raise ValueError("tools are not supported by this server (Grok-1 is a base model)")
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise ValueError("max_tokens and max_completion_tokens disagree; give one")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens


class TokenizeRequest(_Request):
    """vLLM's /tokenize: a prompt, or chat messages (tokenized as the chat transcript).
    add_special_tokens is accepted for vLLM's clients; Grok-1 adds none (no BOS, as the
    reference), and special-token text such as "[EOS]" is that token."""
    model: Name | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1,
                                               max_length=MAX_MESSAGES)
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(_Request):
    model: Name | None = None
    tokens: list[TokenId] = Field(max_length=MAX_TOKEN_IDS)


# ---- responses -----------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy format. With echo the prompt's tokens come first, the first of them with
    null logprobs (nothing precedes it). top_logprobs holds the `logprobs` likeliest tokens and
    the token itself (so up to logprobs + 1 entries)."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class PromptLogprob(BaseModel):
    """vLLM's shape of one alternative in prompt_logprobs (keyed by token id)."""
    logprob: float
    rank: int
    decoded_token: str


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    # vLLM's: per prompt token (None for the first), {token id: PromptLogprob}
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


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
    parent: str | None = None  # a LoRA adapter's base model (vLLM's field); None for the base


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


_FORM_TAGS = frozenset({"str", "list[str]", "list[int]", "list[list[int]]", "list[part]"})
_abbreviated = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_abbreviated.maxstring, _abbreviated.maxother, _abbreviated.maxlevel = 60, 60, 2
_abbreviated.maxlist = _abbreviated.maxdict = 4


def error_from_validation(e: ValidationError) -> ProtocolError:
    """The first pydantic error as a 400 naming the field (`messages.0.role`) and the value
    (abbreviated: reprlib never walks more of it than it shows)."""
    err = e.errors(include_url=False)[0]
    param = ".".join(str(x) for x in err["loc"] if x not in _FORM_TAGS) or None
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown parameter (not part of this API)"
    elif err["type"] == "missing":
        msg = "required parameter is missing"
    shown = param and err["type"] != "missing"
    value = f" (got {_abbreviated.repr(err.get('input'))})" if shown else ""
    return ProtocolError(f"{param + ': ' if param else ''}{msg}{value}", param=param,
                         code="invalid_value")
