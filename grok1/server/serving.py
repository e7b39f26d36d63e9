"""OpenAI semantics over the engine: a validated request becomes engine requests (n per prompt),
and their outputs become a response or a stream of SSE chunks. No HTTP here (app.py does that).

Chat prompt format. Grok-1 is a base model with no chat template, so messages become a plain
transcript, one line per message, ending with an open assistant turn:

    System: You are terse.
    User: Hi
    Assistant: Hello.
    User: What is 2+2?
    Assistant:

("developer" messages are written as "System"). Generation stops at "\\nUser:" or "\\nSystem:"
(besides the request's own stop strings), and the reply's leading whitespace is dropped.
That is the "transcript" entry of CHAT_TEMPLATES; a checkpoint's family names its template
(grok1.loading.Family.chat_template): Grok-2's is "grok-2", its own chat template
(`Human: ...<|separator|>\\n\\nAssistant:`, grok1.tokenizer_grok2.chat_prompt), whose turns end
with the <|separator|> token, a stop token as eos is.

Stop strings are matched on the detokenized text (detokenize.py); the matching engine request is
aborted at once. Choice k of a seeded request samples with seed + k * 0x9E3779B97F4A7C15
(mod 2^63), so choice 0 of `seed=s` is the same as a lone request with `seed=s`. Usage counts
each prompt once and the tokens of each choice's text: stop tokens are excluded (the engine does
not report them), and so are a stop string's tokens and the chat reply's dropped leading
whitespace; the logprobs list exactly these tokens, streamed or not.
Logprobs are the engine's (the model's distribution before temperature). With `echo` they
cover the prompt's tokens too (the first with null logprobs), scored by the engine in the
prefill's own forward (SamplingParams.prompt_logprobs), as is vLLM's `prompt_logprobs`; with
`max_tokens=0` the prompt is scored and nothing is generated (how lm-eval's loglikelihood tasks
ask).

Tokenizing and detokenizing run in a small worker pool (`offload`), never on the event loop:
a multi-megabyte prompt took seconds to encode, during which every stream and /health waited.
A text prompt longer than `max_prompt_chars` (default MAX_CHARS_PER_TOKEN per token of the
context) is refused before it is tokenized.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from pydantic import BaseModel

from grok1.chat import CHAT_STOPS, chat_prompt_text
from grok1.engine.llm import RequestOutput, SamplingParams, TokenLogprob
from grok1.server import protocol as P
from grok1.server.bridge import (
    ClientTooSlowError,
    EngineStepError,
    EngineUnavailableError,
    QueueFullError,
    RequestGroup,
    RequestRejectedError,
    SubRequest,
)
from grok1.server.detokenize import CONTEXT_TOKENS, StopTextStream, TokenizerLike, token_text
from grok1.tokenizer_grok2 import SEPARATOR
from grok1.tokenizer_grok2 import chat_prompt as grok2_template

log = logging.getLogger("grok1.server")

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
_SEED_STRIDE = 0x9E3779B97F4A7C15
DONE = "data: [DONE]\n\n"
# English averages ~4 characters a token; 32 leaves room for long pieces and runs of spaces, and
# bounds what a prompt that cannot fit the context costs to tokenize before it is refused
MAX_CHARS_PER_TOKEN = 32


def chat_prompt(messages: list[P.ChatMessage]) -> str:
    """The transcript a base model continues (format in the module docstring)."""
    return chat_prompt_text((m.role, m.text()) for m in messages)


def grok2_chat_prompt(messages: list[P.ChatMessage]) -> str:
    """Grok-2's chat template (grok1.tokenizer_grok2.chat_prompt) for the request's messages."""
    return grok2_template([{"role": m.role, "content": m.text()} for m in messages])


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """How a model family's chat requests become a prompt, and what ends its reply besides
    the request's own stops: `stop_strings` on the text, `stop_tokens` (special texts of the
    tokenizer, one token each) as stop token ids, which end the reply unshown as eos does."""
    render: Callable[[list[P.ChatMessage]], str]
    stop_strings: tuple[str, ...] = ()
    stop_tokens: tuple[str, ...] = ()


CHAT_TEMPLATES = {
    "transcript": ChatTemplate(chat_prompt, stop_strings=tuple(CHAT_STOPS)),
    "grok-2": ChatTemplate(grok2_chat_prompt, stop_tokens=(SEPARATOR,)),
}


def stop_token_ids(tokenizer: TokenizerLike, template: ChatTemplate) -> tuple[int, ...]:
    """The ids of the template's stop tokens; ValueError naming a text that the tokenizer does
    not encode as one token (a tokenizer from another model)."""
    ids = []
    for text in template.stop_tokens:
        encoded = tokenizer.encode(text)
        if len(encoded) != 1:
            raise ValueError(f"the chat template's stop token {text!r} is {len(encoded)} tokens "
                             f"in the {type(tokenizer).__name__} given, not one special token: "
                             "a tokenizer of another model?")
        ids.append(encoded[0])
    return tuple(ids)


def special_tokens(tokenizer: TokenizerLike) -> dict[str, tuple[str, int]]:
    """The control pieces a client may write as text ("[BOS]", "[EOS]", "[PAD]" in Grok-1's
    SentencePiece model): role -> (piece, id); empty for a tokenizer without pieces."""
    piece = getattr(tokenizer, "id_to_piece", None)
    if piece is None:
        return {}
    ids = {role: getattr(tokenizer, f"{role}_id", -1) for role in ("bos", "eos", "pad")}
    return {role: (piece(i), i) for role, i in ids.items() if i >= 0}


def derived_seed(seed: int | None, k: int) -> int | None:
    return None if seed is None else (seed + k * _SEED_STRIDE) % 2**63


def sse(obj: BaseModel | dict) -> str:
    data = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


def as_protocol_error(e: BaseException, rid: str) -> P.ProtocolError:
    """The error the client gets for an exception raised while serving `rid`; anything not a
    client error or back-pressure is our bug: logged with the request id, answered 500."""
    if isinstance(e, P.ProtocolError):
        return e
    if isinstance(e, QueueFullError):
        return P.ProtocolError(str(e), status=503, code="queue_full", type="server_busy",
                               retry_after_s=e.retry_after_s)
    if isinstance(e, EngineUnavailableError):
        return P.ProtocolError(str(e), status=503, code="unavailable", type="server_busy",
                               retry_after_s=5)
    if isinstance(e, RequestRejectedError):  # engine.add_request refused the input
        return P.ProtocolError(f"invalid request: {e}", code="invalid_value")
    if isinstance(e, ClientTooSlowError):  # the client's doing; it will hardly read this
        return P.ProtocolError(str(e), status=408, code="client_too_slow")
    log.error("request %s failed with a server error", rid, exc_info=e)
    return P.ProtocolError(f"internal server error (request id {rid}): {type(e).__name__}: {e}",
                           status=500, code="internal_error")


@dataclasses.dataclass
class Choice:
    """One engine request's progress as one OpenAI choice."""
    index: int
    request_id: str
    prompt_ids: list[int]
    text: StopTextStream
    strip_leading: bool  # chat: drop the whitespace after "Assistant:"
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # from the first engine output
    num_generated: int = 0
    finish_reason: str | None = None
    content: str = ""  # text released so far
    token_ends: list[int] = dataclasses.field(default_factory=list)  # in the unstripped text
    stripped_chars: int = 0  # leading whitespace dropped from the content (chat)
    logprobs_sent: int = 0  # streaming: tokens whose logprobs went out
    stop_token_logprob: TokenLogprob | None = None  # the eos or stop token id that ended it

    def advance(self, out: RequestOutput, group: RequestGroup) -> str:
        """Apply one engine output; return the newly released text."""
        tokenizer = self.text.detok.tokenizer
        for t in out.new_token_ids:
            start = self.token_ends[-1] if self.token_ends else 0
            context = self.prompt_ids[-CONTEXT_TOKENS:] + self.token_ids[-CONTEXT_TOKENS:]
            self.token_ends.append(start + len(token_text(tokenizer, context, t)))
            self.token_ids.append(t)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.logprobs += out.new_logprobs or []
        self.stop_token_logprob = out.stop_token_logprob
        self.num_generated = out.num_generated_tokens
        delta = self.text.push(out.new_token_ids, final=out.finished)
        if self.strip_leading and not self.content:
            self.stripped_chars += len(delta) - len(delta.lstrip())
            delta = delta.lstrip()
        self.content += delta
        if self.text.stopped:
            self.finish_reason = "stop"
            if not out.finished:
                group.finish(self.request_id)  # abort the engine request now
        elif out.finished:
            if out.finish_reason not in ("stop", "length"):
                raise EngineStepError(f"engine ended {out.request_id} with finish_reason="
                                      f"{out.finish_reason!r}")
            self.finish_reason = out.finish_reason
        return delta

    @property
    def num_released_tokens(self) -> int:
        """Generated tokens whose text starts within the text released so far: all of them at
        the end unless a stop string cut the text (its tokens are not the output's)."""
        n = len(self.token_ids)
        if self.finish_reason is not None and not self.text.stopped:
            return n
        released = self.text.emitted
        if not n or not released:
            return 0
        # token 0 starts at 0; token i > 0 starts where token i - 1 ends
        return 1 + min(bisect.bisect_left(self.token_ends, released), n - 1)

    @property
    def num_stripped_tokens(self) -> int:
        """Leading tokens that are all dropped whitespace (chat): not in the content's logprobs."""
        return bisect.bisect_right(self.token_ends, self.stripped_chars) \
            if self.stripped_chars else 0

    @property
    def ended_by_stop_token(self) -> bool:
        """Ended by eos or a stop_token_ids token, which the engine does not return: OpenAI and
        vLLM list it last in the logprobs (with no text) and count it in usage."""
        return self.finish_reason == "stop" and not self.text.stopped

    def released_logprobs(self) -> tuple[int, list[TokenLogprob]]:
        """(index of the first, logprobs) of the released tokens not sent yet, as the text
        shows them, then the stop token's at the end; marks them sent. (lm-eval's echo requests
        take the last entry for the generated token and drop it.)"""
        start = max(self.logprobs_sent, self.num_stripped_tokens)
        end = max(start, min(self.num_released_tokens, len(self.logprobs)))
        lps = self.logprobs[start:end]
        if self.ended_by_stop_token and self.stop_token_logprob is not None \
                and end == len(self.logprobs) and self.logprobs_sent <= end:
            lps.append(self.stop_token_logprob)
            end += 1
        self.logprobs_sent = end
        return start, lps

    @property
    def num_completion_tokens(self) -> int:
        """usage.completion_tokens: the tokens of the content, as its logprobs list them (not
        those of a stop string, nor the chat's dropped leading whitespace, which is our
        transcript's formatting), and a stop token that ended it."""
        shown = self.num_released_tokens if self.text.stopped else self.num_generated
        return shown - self.num_stripped_tokens + self.ended_by_stop_token


@dataclasses.dataclass
class Job:
    """A validated request planned as engine requests."""
    rid: str
    req: P.CompletionRequest | P.ChatCompletionRequest
    prompts: list[list[int]]
    subs: list[SubRequest]
    choices: dict[str, Choice]  # by engine request id, in choice order
    model_name: str  # the served model it names: the base or a LoRA adapter

    @property
    def chat(self) -> bool:
        return isinstance(self.req, P.ChatCompletionRequest)

    def usage(self) -> P.Usage:
        n_prompt = sum(len(p) for p in self.prompts)
        n_gen = sum(c.num_completion_tokens for c in self.choices.values())
        return P.Usage(prompt_tokens=n_prompt, completion_tokens=n_gen,
                       total_tokens=n_prompt + n_gen)


class OpenAIServing:
    """Plans requests and formats results for one served model and its LoRA adapters
    (`adapter_names`: adapter k + 1 of the engine, selected by a request's `model`, as vLLM)."""

    def __init__(self, tokenizer: TokenizerLike, model_name: str, *, max_model_len: int,
                 vocab_size: int, max_n: int, max_choices: int,
                 max_prompt_chars: int | None = None, worker_threads: int = 4,
                 chat_template: str = "transcript", adapter_names: tuple[str, ...] = ()):
        self.tokenizer, self.model_name = tokenizer, model_name
        self.adapter_names = adapter_names
        if chat_template not in CHAT_TEMPLATES:
            raise ValueError(f"chat_template={chat_template!r}: one of "
                             f"{', '.join(CHAT_TEMPLATES)}")
        self.chat_template = CHAT_TEMPLATES[chat_template]
        self.chat_stop_ids = stop_token_ids(tokenizer, self.chat_template)
        self.max_model_len, self.vocab_size = max_model_len, vocab_size
        self.max_n, self.max_choices = max_n, max_choices
        self.max_prompt_chars = max_prompt_chars or MAX_CHARS_PER_TOKEN * max_model_len
        self._workers = anyio.CapacityLimiter(worker_threads)
        self.special_tokens = special_tokens(tokenizer)
        pieces = sorted((p for p, _ in self.special_tokens.values()), key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(map(re.escape, pieces)) + ")") \
            if pieces else None

    async def offload(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) in the worker pool (tokenizing, detokenizing, parsing), off the loop."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._workers)

    # ---- planning --------------------------------------------------------------------------
    def plan_completion(self, rid: str, req: P.CompletionRequest) -> Job:
        adapter = self._check_model_and_n(req)
        self._check_choices(len(req.prompts()), req.n)
        prompts = [self._prompt_ids(p, "prompt") for p in req.prompts()]
        wanted = DEFAULT_COMPLETION_TOKENS if req.max_tokens is None else req.max_tokens
        max_tokens = [self._check_length(len(p), wanted, "max_tokens") for p in prompts]
        # echo + logprobs scores the prompt with as many alternatives as the generated tokens
        scored = [k for k in (req.logprobs if req.echo else None, req.prompt_logprobs)
                  if k is not None]
        return self._plan(rid, req, prompts, max_tokens, req.stop, req.logprobs, chat=False,
                          prompt_logprobs=max(scored) if scored else None, adapter=adapter)

    def plan_chat(self, rid: str, req: P.ChatCompletionRequest) -> Job:
        adapter = self._check_model_and_n(req)
        ids = self._prompt_ids(self.chat_template.render(req.messages), "messages")
        max_tokens = self._check_length(len(ids), req.max_new_tokens, "messages"
                                        if req.max_new_tokens is None else "max_tokens")
        top = (req.top_logprobs or 0) if req.logprobs else None
        return self._plan(rid, req, [ids], [max_tokens],
                          [*self.chat_template.stop_strings, *req.stop], top, chat=True,
                          adapter=adapter)

    def _check_model_and_n(self, req: P.CompletionRequest | P.ChatCompletionRequest) -> int:
        """The model (-> its adapter index, 0: the base), n, and the token ids in logit_bias
        and stop_token_ids (in the vocabulary)."""
        adapter = self._check_optional_model(req.model)
        for param, ids in (("logit_bias", map(int, req.logit_bias or {})),
                           ("stop_token_ids", req.stop_token_ids)):
            bad = [t for t in ids if t >= self.vocab_size]
            if bad:
                raise P.ProtocolError(f"{param}: token id {bad[0]} is outside the vocabulary "
                                      f"[0, {self.vocab_size})", param=param,
                                      code="invalid_value")
        if req.n > self.max_n:
            raise P.ProtocolError(f"n={req.n}: at most {self.max_n}", param="n",
                                  code="invalid_value")
        return adapter

    def _check_choices(self, num_prompts: int, n: int) -> None:
        if num_prompts * n > self.max_choices:
            raise P.ProtocolError(f"{num_prompts} prompt(s) x n={n} = {num_prompts * n} "
                                  f"choices: at most {self.max_choices}", param="n",
                                  code="invalid_value")

    def _prompt_ids(self, prompt: str | list[int], param: str) -> list[int]:
        """Token ids of a prompt, refused (400) before tokenizing if it has too many characters
        and after if it is empty or has ids outside the vocabulary."""
        if isinstance(prompt, str) and len(prompt) > self.max_prompt_chars:
            raise P.ProtocolError(
                f"{param}: the prompt has {len(prompt)} characters; this server takes at most "
                f"{self.max_prompt_chars} (its context is {self.max_model_len} tokens)",
                param=param, code="context_length_exceeded")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        if not ids:
            raise P.ProtocolError(f"{param}: the prompt is empty", param=param,
                                  code="empty_prompt")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise P.ProtocolError(f"{param}: token id {bad[0]} is outside the vocabulary "
                                  f"[0, {self.vocab_size})", param=param, code="invalid_value")
        return list(ids)

    def _check_length(self, n_prompt: int, max_tokens: int | None, param: str) -> int:
        """max_tokens to use (None: fill the context); 400 if prompt + it exceed the context."""
        if max_tokens is None:
            if n_prompt >= self.max_model_len:
                raise P.ProtocolError(
                    f"{param}: the prompt has {n_prompt} tokens, which leaves no room in the "
                    f"model's context of {self.max_model_len} tokens; shorten it",
                    param=param, code="context_length_exceeded")
            return self.max_model_len - n_prompt
        if n_prompt + max_tokens > self.max_model_len:
            raise P.ProtocolError(
                f"the prompt has {n_prompt} tokens and max_tokens is {max_tokens}: "
                f"{n_prompt + max_tokens} > the model's context of {self.max_model_len} tokens; "
                "shorten the prompt or lower max_tokens", param=param,
                code="context_length_exceeded")
        return max_tokens

    def _sampling(self, req: P.CompletionRequest | P.ChatCompletionRequest, max_tokens: int,
                  k: int, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=req.temperature if req.temperature is not None else 1.0,
                top_p=req.top_p if req.top_p is not None else 1.0,
                top_k=max(req.top_k or 0, 0),  # -1 and 0 both mean off
                seed=derived_seed(req.seed, k), ignore_eos=req.ignore_eos, logprobs=logprobs,
                prompt_logprobs=prompt_logprobs, min_tokens=req.min_tokens, min_p=req.min_p,
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                repetition_penalty=req.repetition_penalty,
                logit_bias=tuple((int(t), b) for t, b in (req.logit_bias or {}).items()),
                stop_token_ids=tuple(req.stop_token_ids) + (
                    self.chat_stop_ids if isinstance(req, P.ChatCompletionRequest) else ()))
        except ValueError as e:  # SamplingParams' own checks (the schema's are stricter)
            raise P.ProtocolError(f"invalid sampling parameters: {e}",
                                  code="invalid_value") from None

    def _plan(self, rid: str, req: P.CompletionRequest | P.ChatCompletionRequest,
              prompts: list[list[int]], max_tokens: list[int], stops: list[str],
              logprobs: int | None, chat: bool, prompt_logprobs: int | None = None,
              adapter: int = 0) -> Job:
        """n engine requests per prompt; choice index = prompt index * n + i (OpenAI's order)."""
        subs, choices = [], {}
        for j, ids in enumerate(prompts):
            for i in range(req.n):
                k = j * req.n + i
                sub_id = f"{rid}-{k}"
                subs.append(SubRequest(sub_id, ids, self._sampling(
                    req, max_tokens[j], k, logprobs, prompt_logprobs), adapter))
                text = StopTextStream(self.tokenizer, ids, stops, req.include_stop_str_in_output)
                choices[sub_id] = Choice(k, sub_id, ids, text, chat)
        name = self.adapter_names[adapter - 1] if adapter else self.model_name
        return Job(rid, req, prompts, subs, choices, name)

    # ---- tokenizer endpoints (vLLM's shapes) ---------------------------------------------------
    def tokenize(self, req: P.TokenizeRequest) -> dict[str, Any]:
        """{count, max_model_len, tokens}: the prompt's ids, a special piece's text as its id
        (lm-eval's remote tokenizer finds eos and bos that way)."""
        self._check_optional_model(req.model)
        text = req.prompt if req.prompt is not None else self.chat_template.render(req.messages)
        param = "prompt" if req.prompt is not None else "messages"
        if len(text) > self.max_prompt_chars:
            raise P.ProtocolError(f"{param}: {len(text)} characters; this server tokenizes at "
                                  f"most {self.max_prompt_chars}", param=param,
                                  code="context_length_exceeded")
        by_piece = {p: i for p, i in self.special_tokens.values()}
        parts = self._special_split.split(text) if self._special_split else [text]
        ids = []
        for part in parts:
            if part in by_piece:
                ids.append(by_piece[part])
            elif part:
                ids += self.tokenizer.encode(part)
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}

    def detokenize(self, req: P.DetokenizeRequest) -> dict[str, Any]:
        self._check_optional_model(req.model)
        bad = [t for t in req.tokens if t >= self.vocab_size]
        if bad:
            raise P.ProtocolError(f"tokens: token id {bad[0]} is outside the vocabulary "
                                  f"[0, {self.vocab_size})", param="tokens", code="invalid_value")
        return {"prompt": self.tokenizer.decode(req.tokens)}

    def tokenizer_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"tokenizer_class": type(self.tokenizer).__name__,
                                "model_max_length": self.max_model_len,
                                "vocab_size": self.vocab_size}
        for role in ("bos", "eos", "pad"):
            if role in self.special_tokens:
                info[f"{role}_token"] = self.special_tokens[role][0]
        return info

    def _check_optional_model(self, model: str | None) -> int:
        """The adapter index `model` names (0: the base model, or none named); 404 if unknown."""
        if model is None or model == self.model_name:
            return 0
        if model in self.adapter_names:
            return self.adapter_names.index(model) + 1
        served = ", ".join(repr(m) for m in (self.model_name, *self.adapter_names))
        raise P.ProtocolError(f"model {model!r} does not exist; this server serves {served}",
                              status=404, param="model", code="model_not_found")

    # ---- results ---------------------------------------------------------------------------
    async def collect(self, job: Job, group: RequestGroup) -> BaseModel:
        """Run the job to the end and return its (non-streamed) response."""
        async for out in group.outputs():
            await self.offload(job.choices[out.request_id].advance, out, group)
        return await self.offload(self._response, job)

    def _response(self, job: Job) -> BaseModel:
        if job.chat:
            return P.ChatCompletionResponse(id=job.rid, model=job.model_name, usage=job.usage(),
                                            choices=[self._chat_choice(c)
                                                     for c in job.choices.values()])
        return P.CompletionResponse(id=job.rid, model=job.model_name, usage=job.usage(),
                                    choices=[self._completion_choice(job.req, c)
                                             for c in job.choices.values()])

    def _completion_choice(self, req: P.CompletionRequest, c: Choice) -> P.CompletionChoice:
        prefix = self.tokenizer.decode(c.prompt_ids) if req.echo else ""
        lp = None
        if req.logprobs is not None:
            start, lps = c.released_logprobs()
            lp = self._completion_logprobs(c, lps, start, len(prefix))
            if req.echo:
                pl = self._echo_logprobs(c.prompt_ids, c.prompt_logprobs)
                lp = P.CompletionLogprobs(
                    tokens=pl.tokens + lp.tokens,
                    token_logprobs=pl.token_logprobs + lp.token_logprobs,
                    top_logprobs=pl.top_logprobs + lp.top_logprobs,
                    text_offset=pl.text_offset + lp.text_offset)
        return P.CompletionChoice(index=c.index, text=prefix + c.content, logprobs=lp,
                                  finish_reason=c.finish_reason,
                                  prompt_logprobs=self._vllm_prompt_logprobs(req, c))

    def _chat_choice(self, c: Choice) -> P.ChatChoice:
        lp = None
        if c.logprobs:
            start, lps = c.released_logprobs()
            lp = self._chat_logprobs(c, lps, start)
        return P.ChatChoice(index=c.index, message=P.ChatResponseMessage(content=c.content),
                            logprobs=lp, finish_reason=c.finish_reason)

    async def stream(self, job: Job, group: RequestGroup) -> AsyncIterator[str]:
        """The job as SSE events: chunks per engine step, a usage chunk if asked, [DONE].
        A failure after the headers went out ends the stream with an error event."""
        created = int(time.time())
        chat = job.chat
        offsets = {}  # completion logprobs: text offset per choice

        def chunk(c: Choice, text: str | None, lp: BaseModel | None, role: bool = False,
                  last: bool = True) -> str:
            finish_reason = c.finish_reason if last else None
            if chat:
                delta = P.DeltaMessage(role="assistant" if role else None, content=text)
                return sse(P.ChatCompletionChunk(
                    id=job.rid, created=created, model=job.model_name, choices=[
                        P.ChatChunkChoice(index=c.index, delta=delta, logprobs=lp,
                                          finish_reason=finish_reason)]))
            return sse(P.CompletionResponse(
                id=job.rid, created=created, model=job.model_name, choices=[
                    P.CompletionChoice(index=c.index, text=text or "", logprobs=lp,
                                       finish_reason=finish_reason)]))

        def opening(c: Choice) -> str | None:
            return chunk(c, "", None, role=True) if chat else None

        def echo(c: Choice) -> str | None:
            """The prompt as the choice's first chunk (with its logprobs, which come with the
            first engine output)."""
            prefix = self.tokenizer.decode(c.prompt_ids)
            offsets[c.index] = len(prefix)
            lp = None
            if job.req.logprobs is not None:
                lp = self._echo_logprobs(c.prompt_ids, c.prompt_logprobs)
            return chunk(c, prefix, lp, last=False) if prefix or lp else None

        def on_output(out: RequestOutput) -> list[str]:
            c = job.choices[out.request_id]
            delta = c.advance(out, group)
            events = []
            if not chat and job.req.echo and c.index not in offsets:
                events.append(echo(c))
            lp = None
            # the logprobs of the tokens whose text goes out now (none of a stop string's)
            start, lps = c.released_logprobs()
            if chat and job.req.logprobs and lps:
                lp = self._chat_logprobs(c, lps, start)
            elif not chat and job.req.logprobs is not None:
                lp = self._completion_logprobs(c, lps, start, offsets.get(c.index, 0))
                offsets[c.index] = offsets.get(c.index, 0) + sum(map(len, lp.tokens))
            if delta or lps or c.finish_reason:
                events.append(chunk(c, delta or (None if chat else ""), lp))
            return [e for e in events if e is not None]

        for c in job.choices.values():
            if (event := await self.offload(opening, c)) is not None:
                yield event
        try:
            async for out in group.outputs():
                for event in await self.offload(on_output, out):
                    yield event
        except Exception as e:  # noqa: BLE001 - headers are sent: report it in the stream
            yield sse(P.error_body(as_protocol_error(e, job.rid))) + DONE
            return
        if job.req.include_usage:
            usage_chunk = P.ChatCompletionChunk if chat else P.CompletionResponse
            yield sse(usage_chunk(id=job.rid, created=created, model=job.model_name,
                                  choices=[], usage=job.usage()))
        yield DONE

    # ---- logprobs --------------------------------------------------------------------------
    def _completion_logprobs(self, c: Choice, lps: list[TokenLogprob], start: int,
                             offset: int) -> P.CompletionLogprobs:
        """Legacy logprobs of generated tokens start.. (text offsets from `offset`)."""
        out = P.CompletionLogprobs()
        ctx = c.prompt_ids + c.token_ids[:start]
        for lp in lps:
            s = token_text(self.tokenizer, ctx, lp.token_id)
            out.tokens.append(s)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append(self._top_with_token(ctx, lp, s))
            out.text_offset.append(offset)
            offset += len(s)
            ctx.append(lp.token_id)
        return out

    def _top_with_token(self, ctx: list[int], lp: TokenLogprob, text: str) -> dict[str, float]:
        """OpenAI's top_logprobs entry: the likeliest alternatives and the token itself."""
        top = {token_text(self.tokenizer, ctx, t): v for t, v in lp.top}
        top[text] = lp.logprob
        return top

    def _echo_logprobs(self, ids: list[int],
                       scores: list[TokenLogprob | None] | None) -> P.CompletionLogprobs:
        """echo + logprobs: the prompt's tokens with the engine's scores (None for the first)."""
        out = P.CompletionLogprobs()
        offset = 0
        for i, t in enumerate(ids):
            s = token_text(self.tokenizer, ids[:i], t) if i else self.tokenizer.decode([t])
            lp = scores[i] if scores else None
            out.tokens.append(s)
            out.token_logprobs.append(None if lp is None else lp.logprob)
            out.top_logprobs.append(None if lp is None else
                                    self._top_with_token(ids[:i], lp, s))
            out.text_offset.append(offset)
            offset += len(s)
        return out

    def _vllm_prompt_logprobs(self, req: P.CompletionRequest,
                              c: Choice) -> list[dict[str, P.PromptLogprob] | None] | None:
        """vLLM's prompt_logprobs: per prompt token, {token id: logprob, rank, decoded_token}
        for the token and the `req.prompt_logprobs` likeliest."""
        if req.prompt_logprobs is None or c.prompt_logprobs is None:
            return None
        out: list[dict[str, P.PromptLogprob] | None] = [None]
        for lp in c.prompt_logprobs[1:]:
            entry = {str(t): P.PromptLogprob(logprob=v, rank=rank + 1,
                                             decoded_token=self.tokenizer.decode([t]))
                     for rank, (t, v) in enumerate(lp.top[:req.prompt_logprobs])}
            entry[str(lp.token_id)] = P.PromptLogprob(
                logprob=lp.logprob, rank=lp.rank,
                decoded_token=self.tokenizer.decode([lp.token_id]))
            out.append(entry)
        return out

    def _chat_logprobs(self, c: Choice, lps: list[TokenLogprob], start: int) -> P.ChatLogprobs:
        """Entries of tokens start.. as the content shows them: the first content token without
        the leading whitespace the content drops."""
        entries = []
        ctx = c.prompt_ids + c.token_ids[:start]
        for i, lp in enumerate(lps, start):
            s = token_text(self.tokenizer, ctx, lp.token_id)
            if i == c.num_stripped_tokens and c.stripped_chars:
                s = s.lstrip()
            top = [P.TopLogprob(token=(a := token_text(self.tokenizer, ctx, t)), logprob=v,
                                bytes=list(a.encode())) for t, v in lp.top]
            entries.append(P.TokenLogprobEntry(token=s, logprob=lp.logprob,
                                               bytes=list(s.encode()), top_logprobs=top))
            ctx.append(lp.token_id)
        return P.ChatLogprobs(content=entries)

