"""Plain generation on the reference model: ragged-batch prefill, then decode through a static KV
cache, with sampling, stop conditions and streaming. The fast path is `grok1.engine`; this one is
its twin and what `grok1 generate` uses on small models."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from grok1.model import Grok1, KVCache
from grok1.sampling import SamplingParams, make_generator, sample


@dataclasses.dataclass
class Generation:
    token_ids: list[int]  # generated tokens, without the prompt and without the stop token
    finish_reason: str  # "stop" (eos or a stop token) or "length" (max_tokens)


@torch.no_grad()
def generate(model: Grok1, prompts: Sequence[Sequence[int]],
             params: SamplingParams | Sequence[SamplingParams] | None = None,
             on_token: Callable[[int, int], None] | None = None) -> list[Generation]:
    """Generate for a batch of token-id prompts of any lengths; `on_token(row, token_id)` is
    called for every generated token as it comes (streaming).

    Raises ValueError for an empty prompt, ids outside the vocabulary, or a prompt plus
    max_tokens longer than the model's sequence_len.
    """
    config = model.config
    device = model.embed.device
    B = len(prompts)
    params = params or SamplingParams()
    params = list(params) if isinstance(params, Sequence) else [params] * B
    if B == 0 or len(params) != B:
        raise ValueError(f"{B} prompts but {len(params)} sampling params")
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        if not prompt:
            raise ValueError(f"prompt {i} is empty")
        if min(prompt) < 0 or max(prompt) >= config.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {config.vocab_size})")
        if len(prompt) + p.max_tokens > config.sequence_len:
            raise ValueError(f"prompt {i}: {len(prompt)} tokens + max_tokens={p.max_tokens} "
                             f"exceeds the context of {config.sequence_len}")
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.full((B, int(lengths.max())), config.pad_token, dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):
        tokens[i, :len(prompt)] = torch.tensor(prompt, device=device)
    max_len = int((lengths + torch.tensor([p.max_tokens for p in params], device=device)).max())
    # a tensor-parallel rank caches only its kv heads (grok1.parallel sets local_config)
    cache = KVCache.allocate(model.local_config, B, max_len, device)
    generators = [make_generator(p.seed, device) for p in params]
    stops = [set(p.stop_token_ids) | (set() if p.ignore_eos else {config.eos_token}) for p in params]

    results = [Generation([], "length") for _ in range(B)]
    active = [True] * B
    logits = model(tokens, cache, lengths_B=lengths, last_only=True)[:, 0]
    while True:
        next_B = sample(logits, params, generators).tolist()
        for b, token in enumerate(next_B):
            if not active[b]:
                continue
            if token in stops[b]:
                results[b].finish_reason, active[b] = "stop", False
                continue
            results[b].token_ids.append(token)
            if on_token is not None:
                on_token(b, token)
            if len(results[b].token_ids) >= params[b].max_tokens:
                active[b] = False
        if not any(active):
            return results
        # finished rows keep decoding in the static batch; their tokens are ignored
        logits = model(torch.tensor(next_B, device=device)[:, None], cache)[:, 0]
