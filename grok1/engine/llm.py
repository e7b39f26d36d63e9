"""The engine's Python API: `Engine` (continuous batching, one `step()` at a time; the server
drives it from one thread) and `LLM` (offline batches with streaming callbacks).

Stop tokens (eos unless ignore_eos, and stop_token_ids) end a request and are not returned, as
in grok1.generation. Logprobs are those of the model's own distribution (before temperature and
filtering), as grok1.sampling.logprobs_of reports them. Prompt logprobs (params.prompt_logprobs)
come from the prefill's own forward (the runner returns the logits of the request's prompt
positions beside the sampled rows), in the request's first output: None for the first token,
then one TokenLogprob per prompt token. max_tokens=0 ends the request after its prefill.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable

import torch

from grok1.engine.kv_cache import BlockPool
from grok1.engine.runner import ModelRunner
from grok1.engine.sampler import process_logits, sample_rows, top_logprobs
from grok1.engine.scheduler import ScheduledChunk, Scheduler, Sequence
from grok1.lora import AdapterSelection
from grok1.model import Grok1
from grok1.sampling import SamplingParams, make_generator, rows_to_device
from grok1.tokenizer import Tokenizer

__all__ = [
    "LLM",
    "Completion",
    "Engine",
    "EngineStats",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
    "WarmupReport",
]


@dataclasses.dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token_id, logprob), best first, len == params.logprobs
    rank: int = 1  # 1 + the number of tokens the model found likelier


@dataclasses.dataclass
class RequestOutput:
    """One per request per engine step that produced something."""
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None
    num_prompt_tokens: int
    num_generated_tokens: int
    error: str | None = None  # finish_reason "error": why this request alone failed
    prompt_logprobs: list[TokenLogprob | None] | None = None  # in the first output only
    # finish_reason "stop" by a stop token (not returned): its logprob, if logprobs were asked
    stop_token_logprob: TokenLogprob | None = None


@dataclasses.dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preempted_total: int


@dataclasses.dataclass
class WarmupReport:
    forwards: int  # eager forwards run (each compiles what its shape needs on first use)
    graphs: int    # CUDA graphs captured
    seconds: float


def warmup_sizes(max_tokens: int) -> list[int]:
    """Token counts whose forwards reach every kernel specialization a step of up to
    `max_tokens` tokens can need: per power of two (the tuned tile configs change by token
    count), one count divisible by 16 and one not (Triton specializes integer arguments on it)."""
    sizes, p = {1, 2, 3, max_tokens}, 4
    while p <= max_tokens:
        sizes.update((p, min(p + 1, max_tokens)))
        p *= 2
    return sorted(sizes)


def _warmup_batches(m: int, max_len: int, max_batch: int) -> list[list[int]]:
    """Prompt lengths of the warm-up batches of m tokens: one sequence (split at max_len),
    and for m > 2 a mixed batch like a step that admits a prompt beside decoding rows."""
    def split(n: int) -> list[int]:
        return [max_len] * (n // max_len) + ([n % max_len] if n % max_len else [])
    if m < 3:
        return [split(m)]
    rows = min(m // 2, max_batch - 1)
    return [split(m), [1] * rows + split(m - rows)]


@dataclasses.dataclass
class _Request:
    seq: Sequence
    params: SamplingParams
    generator: torch.Generator | None
    stops: frozenset[int]
    # prompt_logprobs[p] scores prompt token p (None for p = 0); sent with the first output
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # the prompt's ids on the device, sent once: penalties read them every step
    prompt_ids: torch.Tensor | None = None


def default_num_blocks(model: Grok1, block_size: int, max_model_len: int,
                       max_batch_size: int, device: torch.device) -> int:
    """KV-cache blocks for max_batch_size full-length sequences, as many as fit 70 % of the
    GPU's free memory less 2 GiB (CPU: at most 4096). Under torchrun the ranks must agree on
    one number (grok1 serve takes the least of theirs)."""
    c = model.local_config  # a tensor-parallel rank's kv heads
    per_seq = -(-max_model_len // block_size)
    want = per_seq * max_batch_size
    if device.type != "cuda":
        return max(per_seq, min(want, 4096))
    bytes_per_block = 2 * c.num_layers * block_size * c.num_kv_heads * c.key_size * 2
    free, _ = torch.cuda.mem_get_info(device)
    budget = int(free * 0.7) - (2 << 30)  # leave room for activations and graphs
    return max(per_seq, min(want, budget // bytes_per_block))


class Engine:
    """Continuous-batching engine over a Grok1 model (CPU runs the plain reference ops).

    `adapters`: the selection of a model carrying n LoRA adapters (grok1.lora,
    grok1.checkpoint.peft.load_adapters); each request names one (add_request's `adapter`,
    1..n; 0: none), and every step tells the model's LoraLinears the adapter of each token.
    Adapted steps run eager (a CUDA graph would keep one step's selection).

    Not thread-safe: call it from one thread.
    """

    def __init__(self, model: Grok1, *, max_batch_size: int = 64, block_size: int = 16,
                 num_blocks: int | None = None, max_model_len: int | None = None,
                 max_num_batched_tokens: int | None = None, use_cuda_graphs: bool = True,
                 record_logits: bool = False, adapters: AdapterSelection | None = None):
        self.model = model.eval()
        self.adapters = adapters
        use_cuda_graphs = use_cuda_graphs and adapters is None
        self.config = model.config
        self.device = model.embed.device
        self.max_model_len = max_model_len or self.config.sequence_len
        if self.max_model_len > self.config.sequence_len:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's "
                             f"sequence_len={self.config.sequence_len}")
        if num_blocks is None:
            num_blocks = default_num_blocks(model, block_size, self.max_model_len,
                                            max_batch_size, self.device)
        if num_blocks * block_size < self.max_model_len:
            raise ValueError(f"num_blocks={num_blocks} x block_size={block_size} holds fewer "
                             f"tokens than max_model_len={self.max_model_len}")
        self.pool = BlockPool(num_blocks, block_size)
        budget = max_num_batched_tokens or max(2048, max_batch_size)
        self.scheduler = Scheduler(self.pool, max_batch_size=max_batch_size,
                                   max_num_batched_tokens=budget)
        self.runner = ModelRunner(model, num_blocks=num_blocks, block_size=block_size,
                                  max_model_len=self.max_model_len,
                                  max_batch_size=max_batch_size, use_cuda_graphs=use_cuda_graphs)
        self._requests: dict[str, _Request] = {}
        self._aborted: list[RequestOutput] = []
        self.record_logits = record_logits
        self.logits_log: dict[str, list[torch.Tensor]] = {}  # request -> logits per sampled token

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, adapter: int = 0) -> None:
        """Queue a request (through LoRA adapter `adapter`, 0: none); ValueError for an empty
        prompt, ids outside the vocabulary, a prompt + max_tokens beyond max_model_len, a
        request id already in use, or an adapter the engine does not hold."""
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        loaded = self.adapters.num_adapters if self.adapters is not None else 0
        if not (isinstance(adapter, int) and 0 <= adapter <= loaded):
            raise ValueError(f"request {request_id!r}: adapter {adapter!r}; this engine holds "
                             f"{loaded} LoRA adapter(s) (0 = none)")
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r}: empty prompt")
        V = self.config.vocab_size
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < V]
        if bad:
            raise ValueError(f"request {request_id!r}: token id {bad[0]!r} outside [0, {V})")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"request {request_id!r}: {len(prompt_token_ids)} prompt tokens + "
                             f"max_tokens={params.max_tokens} exceeds max_model_len="
                             f"{self.max_model_len}")
        seq = Sequence(request_id, list(prompt_token_ids), len(prompt_token_ids),
                       wants_prompt_logits=params.prompt_logprobs is not None, adapter=adapter)
        # a seeded request draws from its own generator (its tokens depend on nothing else);
        # unseeded ones share the default generator, one draw for all their rows a step
        gen = None if params.greedy or params.seed is None else make_generator(params.seed,
                                                                                self.device)
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops.add(self.config.eos_token)
        self._requests[request_id] = _Request(seq, params, gen, frozenset(stops),
                                              [None] if seq.wants_prompt_logits else None)
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        """Free the request's cache blocks now; the next step() reports it finished ("abort").
        No-op for unknown or finished requests."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        self.scheduler.finish(req.seq)
        self._aborted.append(RequestOutput(request_id, [], None, True, "abort",
                                           req.seq.num_prompt_tokens, req.seq.num_generated))

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._aborted)

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(len(s.running), len(s.waiting), self.pool.num_used,
                           self.pool.num_blocks, s.num_preempted_total)

    # ---- before serving ------------------------------------------------------------------
    @torch.no_grad()
    def warmup(self, prefill_sizes: list[int] | None = None) -> WarmupReport:
        """Do up front what the first steps of each shape would otherwise do in the middle of
        serving: on CUDA, Triton compiles a kernel per new launch specialization (tile config
        chosen by token count; integer arguments specialized on divisibility by 16) and the
        runner captures a CUDA graph per decode batch bucket, each stalling every request in
        flight for up to seconds. Captures every decode bucket, then runs eager forwards of
        each size in `prefill_sizes` tokens, as a lone sequence and as a mixed batch (default:
        `warmup_sizes(max_num_batched_tokens)` on CUDA; none on CPU, where nothing compiles).
        Needs an idle engine; leaves the cache as it found it (the forwards use blocks they
        free again)."""
        if self.has_unfinished_requests():
            raise RuntimeError("Engine.warmup: requests are in flight; warm up before serving")
        t0 = time.perf_counter()
        if prefill_sizes is None:
            prefill_sizes = (warmup_sizes(self.scheduler.max_num_batched_tokens)
                             if self.device.type == "cuda" else [])
        graphs = 0
        if self.runner.use_graphs:  # first, largest bucket first: the graphs share one pool
            before = len(self.runner._graphs)
            self.runner.capture_all()
            graphs = len(self.runner._graphs) - before
        gen = torch.Generator().manual_seed(0)
        forwards = 0
        budget = self.scheduler.max_num_batched_tokens
        for m in prefill_sizes:
            if not 1 <= m <= budget:
                raise ValueError(f"Engine.warmup: prefill size {m} outside [1, "
                                 f"max_num_batched_tokens={budget}]")
            for lengths in _warmup_batches(m, self.max_model_len,
                                           self.scheduler.max_batch_size):
                self._warmup_forward(lengths, gen)
                forwards += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return WarmupReport(forwards, graphs, time.perf_counter() - t0)

    def _warmup_forward(self, lengths: list[int], gen: torch.Generator) -> None:
        """One eager forward of sequences of these prompt lengths, on blocks freed afterwards."""
        V = self.config.vocab_size
        chunks, blocks = [], []
        try:
            for i, n in enumerate(lengths):
                ids = torch.randint(3, V, (n,), generator=gen).tolist()
                seq = Sequence(f"warmup-{i}", ids, n)
                seq.block_ids = self.pool.allocate(self.pool.blocks_for(n))
                blocks.append(seq.block_ids)
                chunks.append(ScheduledChunk(seq, 0, n))
            self._execute(chunks)
        finally:
            for ids in blocks:
                self.pool.free(ids)

    # ---- one iteration -------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        outputs, self._aborted = self._aborted, []
        plan = self.scheduler.schedule()
        if not plan.chunks:
            return outputs
        logits = self._execute(plan.chunks)
        sampled = [ch.seq for ch in plan.chunks if ch.needs_sample]
        logits_RV = logits[:len(sampled)]
        self._score_prompts(plan.chunks, logits[len(sampled):])
        for ch in plan.chunks:
            ch.seq.num_computed += ch.num_tokens
        reqs, rows = [], []
        for r, seq in enumerate(sampled):
            req = self._requests[seq.request_id]
            if req.params.max_tokens == 0:  # prompt scored: nothing to generate
                outputs.append(self._finish(req, [], None, "length"))
            else:
                reqs.append(req)
                rows.append(r)
        if not reqs:
            return outputs
        if len(rows) < len(sampled):
            logits_RV = logits_RV[rows_to_device(rows, logits_RV.device)]
        tokens_R, failed = self._sample(self._sampling_logits(logits_RV, reqs), reqs)
        want_lp = [r for r, q in enumerate(reqs) if q.params.logprobs is not None
                   and r not in failed]
        lp = {}
        if want_lp:
            top = max(reqs[r].params.logprobs for r in want_lp)
            rows = rows_to_device(want_lp, logits_RV.device)
            scored = top_logprobs(logits_RV[rows], tokens_R[rows], top)
            for i, r in enumerate(want_lp):
                lp[r] = _token_logprob(scored, i, reqs[r].params.logprobs)
        for r, (req, token) in enumerate(zip(reqs, tokens_R.tolist())):
            seq = req.seq
            if r in failed:
                outputs.append(self._finish(req, [], None, "error", failed[r]))
                continue
            if self.record_logits:
                self.logits_log.setdefault(seq.request_id, []).append(logits_RV[r].cpu().clone())
            if token in req.stops:
                out = self._finish(req, [], None, "stop")
                out.stop_token_logprob = lp.get(r)
                outputs.append(out)
                continue
            seq.token_ids.append(token)
            new_lp = [lp[r]] if r in lp else None
            if seq.num_generated >= req.params.max_tokens or \
                    len(seq.token_ids) >= self.max_model_len:
                outputs.append(self._finish(req, [token], new_lp, "length"))
            else:
                outputs.append(RequestOutput(seq.request_id, [token], new_lp, False, None,
                                             seq.num_prompt_tokens, seq.num_generated,
                                             prompt_logprobs=self._take_prompt_logprobs(req)))
        return outputs

    def _execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """runner.execute, with each token's adapter selected when the model carries them
        (the runner lays tokens out chunk by chunk, in order)."""
        if self.adapters is None:
            return self.runner.execute(chunks)
        ids_M = rows_to_device([ch.seq.adapter for ch in chunks for _ in range(ch.num_tokens)],
                               self.device)
        with self.adapters.select(ids_M):
            return self.runner.execute(chunks)

    def _score_prompts(self, chunks: list[ScheduledChunk], logits_QV: torch.Tensor) -> None:
        """Record the prompt logprobs these prompt-logit rows (runner.prepare's order) give.
        A position recomputed after a preemption is already recorded and is skipped."""
        if not logits_QV.shape[0]:
            return
        owners, next_ids = [], []
        for ch in chunks:
            for p in ch.prompt_logit_positions:
                owners.append((self._requests[ch.seq.request_id], p))
                next_ids.append(ch.seq.token_ids[p + 1])
        top = max(req.params.prompt_logprobs for req, _ in owners)
        scored = top_logprobs(logits_QV, rows_to_device(next_ids, logits_QV.device), top)
        for q, (req, p) in enumerate(owners):
            if req.prompt_logprobs is not None and p + 1 == len(req.prompt_logprobs):
                req.prompt_logprobs.append(_token_logprob(scored, q, req.params.prompt_logprobs))

    def _take_prompt_logprobs(self, req: _Request) -> list[TokenLogprob | None] | None:
        """The request's prompt logprobs, once (its first output), else None."""
        lps, req.prompt_logprobs = req.prompt_logprobs, None
        req.seq.wants_prompt_logits = False  # sent: a recompute after preemption needs none
        return lps

    def _sampling_logits(self, logits_RV: torch.Tensor, reqs: list[_Request]) -> torch.Tensor:
        """The logits to sample from: the model's, changed by the requests' extras (logit_bias,
        penalties, min_tokens, min_p) when any row has them; logprobs use the model's own."""
        if not any(q.params.processes_logits for q in reqs):
            return logits_RV
        prompts = [[] for _ in reqs]
        if any(q.params.penalized for q in reqs):  # only then the histories matter
            for q in reqs:
                if q.prompt_ids is None:
                    q.prompt_ids = rows_to_device(q.seq.token_ids[:q.seq.num_prompt_tokens],
                                                  self.device)
            prompts = [q.prompt_ids for q in reqs]
        return process_logits(
            logits_RV, [q.params for q in reqs], prompts,
            [q.seq.token_ids[q.seq.num_prompt_tokens:] for q in reqs], [q.stops for q in reqs])

    def _sample(self, logits_RV: torch.Tensor,
                reqs: list[_Request]) -> tuple[torch.Tensor, dict[int, str]]:
        """Tokens [R] and the rows whose sampling failed (row -> why). When the batch's sampling
        raises, each row is sampled alone, so that a request whose parameters break the sampler
        fails by itself and the rest of the batch goes on (their seeded draws in this one step
        then differ from an undisturbed run's)."""
        try:
            return sample_rows(logits_RV, [q.params for q in reqs],
                               [q.generator for q in reqs]), {}
        except Exception:  # noqa: BLE001 - retried row by row to find the request(s) at fault
            tokens, failed = [], {}
            for r, q in enumerate(reqs):
                try:
                    tokens.append(sample_rows(logits_RV[r:r + 1], [q.params], [q.generator]))
                except Exception as e:  # noqa: BLE001 - this request's own failure, reported
                    failed[r] = f"sampling failed: {type(e).__name__}: {e}"
                    tokens.append(logits_RV[r:r + 1].argmax(dim=-1))  # a placeholder, unused
            return torch.cat(tokens), failed

    def _finish(self, req: _Request, tokens: list[int], lps, reason: str,
                error: str | None = None) -> RequestOutput:
        seq = req.seq
        self.scheduler.finish(seq)
        del self._requests[seq.request_id]
        return RequestOutput(seq.request_id, tokens, lps, True, reason, seq.num_prompt_tokens,
                             seq.num_generated, error, self._take_prompt_logprobs(req))


def _token_logprob(scored: tuple[torch.Tensor, ...], i: int, k: int) -> TokenLogprob:
    """Row i of sampler.top_logprobs' (chosen ids, logprobs, ranks, top logprobs, top ids),
    with the top k alternatives."""
    ids, chosen, ranks, top_lp, top_ids = scored
    return TokenLogprob(int(ids[i]), float(chosen[i]),
                        list(zip(top_ids[i, :k].tolist(), top_lp[i, :k].tolist())),
                        int(ranks[i]))


@dataclasses.dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]          # generated, without the stop token
    text: str | None              # decoded when the LLM has a tokenizer
    finish_reason: str
    logprobs: list[TokenLogprob] | None


class LLM:
    """Offline batches: generate() queues every prompt and steps the engine until all finish."""

    def __init__(self, model: Grok1, tokenizer: Tokenizer | None = None, **engine_kwargs):
        self.engine = Engine(model, **engine_kwargs)
        self.tokenizer = tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 on_token: Callable[[str, int], None] | None = None) -> list[Completion]:
        """Completions in prompt order; on_token(request_id, token_id) streams each token."""
        params = params or SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        done: dict[str, Completion] = {}
        order = []
        for prompt, p in zip(prompts, params):
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer: LLM(model, tokenizer)")
                prompt = self.tokenizer.encode(prompt)
            rid = f"llm-{next(self._ids)}"
            self.engine.add_request(rid, list(prompt), p)
            order.append(rid)
            done[rid] = Completion(rid, list(prompt), [], None, "", [] if p.logprobs is not None
                                   else None)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                c = done.get(out.request_id)
                if c is None:
                    continue
                c.token_ids += out.new_token_ids
                if out.new_logprobs and c.logprobs is not None:
                    c.logprobs += out.new_logprobs
                if on_token is not None:
                    for t in out.new_token_ids:
                        on_token(out.request_id, t)
                if out.finished:
                    c.finish_reason = out.finish_reason
        if self.tokenizer is not None:
            for c in done.values():
                c.text = self.tokenizer.decode(c.token_ids)
        return [done[r] for r in order]
