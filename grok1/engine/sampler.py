"""On-device sampling for a batch of requests, each with its own params and seeded generator.

The math is `grok1.sampling` (the lead's reference twin: temperature, top-k, top-p, exponential
race with the row's generator); this file only adds the fast paths a batch allows: an all-greedy
batch is one argmax, and the sort behind top-k/top-p runs only when some row filters.
Shape letters: R rows (requests sampled this step), V vocab.
"""

from __future__ import annotations

import torch

from grok1.sampling import SamplingParams, logprobs_of, sample, temperatures


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
        noise = torch.empty_like(probs)
        for r, gen in enumerate(generators):
            noise[r].exponential_(generator=gen)
        drawn = (probs / noise).argmax(dim=-1)
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
