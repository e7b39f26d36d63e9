"""On-device sampling for a batch of requests, each with its own params (and, when seeded,
its own generator; unseeded rows share the default generator in one draw).

The math is `grok1.sampling` (the lead's reference twin: temperature, top-k, top-p, exponential
race with the row's generator); this file adds the fast paths a batch allows (an all-greedy
batch is one argmax, and the sort behind top-k/top-p runs only when some row filters) and
vLLM's extras in `process_logits`, batch-wide tensor ops on the logits' device: logit_bias as a
sparse add, penalties from per-row token counts, min_tokens by masking stop tokens, min_p as a
threshold. Shape letters: R rows (requests sampled this step), V vocab, L history length.
"""

from __future__ import annotations

import itertools
import math

import torch

from grok1.sampling import (
    SamplingParams,
    exponential_race,
    logprobs_of,
    rows_to_device,
    sample,
    temperatures,
)


def _counts(rows: list[list[int]] | list[torch.Tensor], vocab: int,
            device: torch.device) -> torch.Tensor:
    """[R, V] occurrences of each token per row. Rows of ids already on the device (the
    engine keeps each prompt there: a batch's prompts run to tens of thousands of ids) are
    concatenated; lists go in one flat copy (no [R, L] padded list, no copy per row)."""
    lengths = [len(r) for r in rows]
    if rows and isinstance(rows[0], torch.Tensor):
        ids = torch.cat(rows)
    else:
        ids = rows_to_device(list(itertools.chain.from_iterable(rows)), device)
    row_of = torch.repeat_interleave(torch.arange(len(rows), device=device),
                                     rows_to_device(lengths, device), output_size=sum(lengths))
    counts = torch.zeros(len(rows), vocab, device=device)
    return counts.index_put_((row_of, ids), torch.ones(1, device=device), accumulate=True)


def process_logits(logits_RV: torch.Tensor, params: list[SamplingParams],
                   prompts: list[list[int]] | list[torch.Tensor], outputs: list[list[int]],
                   stops: list[frozenset[int]]) -> torch.Tensor:
    """The logits sampling draws from (f32; the model's own stay for logprobs), in vLLM's
    order: logit_bias; min_tokens (each row's stop tokens at -inf while it has fewer outputs);
    repetition_penalty over prompt and output tokens; presence and frequency penalties over
    output tokens; min_p (tokens under min_p x the top probability at the row's temperature,
    i.e. logit < max + T log min_p, at -inf). `logits_RV` is returned as is when no row asks."""
    R, V = logits_RV.shape
    dev = logits_RV.device
    x = logits_RV.float()
    bias = [(r, t, b) for r, p in enumerate(params) for t, b in p.logit_bias]
    if bias:
        rows, toks, vals = zip(*bias)
        at = rows_to_device(rows + toks, dev).view(2, -1)
        x = x.index_put((at[0], at[1]), rows_to_device(vals, dev, torch.float32),
                        accumulate=True)
    masked = [(r, t) for r, p in enumerate(params) if len(outputs[r]) < p.min_tokens
              for t in stops[r]]
    if masked:
        rows, toks = zip(*masked)
        at = rows_to_device(rows + toks, dev).view(2, -1)
        x = x.index_put((at[0], at[1]), torch.full((), float("-inf"), device=dev))
    if any(p.penalized for p in params):
        out_counts = _counts(outputs, V, dev)
        seen = (out_counts + _counts(prompts, V, dev)) > 0
        # repetition, presence, frequency per row, in one copy
        pen = rows_to_device([p.repetition_penalty for p in params]
                             + [p.presence_penalty for p in params]
                             + [p.frequency_penalty for p in params], dev, torch.float32)
        rep, presence, frequency = pen.view(3, R, 1)
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        x = x - presence * (out_counts > 0) - frequency * out_counts
    use_min_p = [p.min_p > 0 and not p.greedy for p in params]  # greedy: the argmax stays
    if any(use_min_p):
        log_min_p = rows_to_device([math.log(p.min_p) if use else 0.0
                                    for p, use in zip(params, use_min_p)], dev, torch.float32)
        shift = torch.where(rows_to_device(use_min_p, dev).bool(),
                            temperatures(params, dev) * log_min_p, float("-inf"))
        x = x.masked_fill(x < x.max(dim=-1, keepdim=True).values + shift[:, None],
                          float("-inf"))
    return x


def sample_rows(logits_RV: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> torch.Tensor:
    """Token ids [R] on the logits' device."""
    if all(p.greedy for p in params):
        return logits_RV.argmax(dim=-1)
    if all(p.top_k == 0 and p.top_p == 1.0 for p in params):
        # no filtering: softmax of logits / T, then the same exponential race as sample()
        temp_R = temperatures(params, logits_RV.device)
        probs = torch.softmax(logits_RV.float() / torch.where(temp_R > 0, temp_R, 1.0)[:, None],
                              dim=-1)
        drawn = exponential_race(probs, generators)
        return torch.where(temp_R > 0, drawn, logits_RV.argmax(dim=-1))
    return sample(logits_RV, params, generators)


def top_logprobs(logits_RV: torch.Tensor, tokens_R: torch.Tensor, top: int):
    """(tokens [R], their logprobs [R], their ranks [R], top logprobs [R, top], top ids
    [R, top]) under the model's distribution, as grok1.sampling.logprobs_of; a token's rank is
    1 + the number of tokens with a larger logit. One .cpu() for all (a single sync)."""
    chosen_R, top_RK, ids_RK = logprobs_of(logits_RV, tokens_R, top)
    chosen_logit_R = logits_RV.gather(-1, tokens_R[:, None])
    rank_R = (logits_RV > chosen_logit_R).sum(dim=-1) + 1
    return tuple(t.cpu() for t in (tokens_R, chosen_R, rank_R, top_RK, ids_RK))
