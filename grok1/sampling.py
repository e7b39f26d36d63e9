"""Next-token sampling: temperature, top-k, top-p, per-request seeds (the reference twin).

The reference (SPEC 5) divides bf16 logits by the temperature, keeps the top-p nucleus and draws
with Gumbel noise from JAX's threefry; exact sampled-token parity would need that PRNG, so only
the distribution is the same. We add top-k and greedy (temperature 0), which the reference lacks.
"""

from __future__ import annotations

import array
import dataclasses

import torch

# Below this temperature sampling is greedy. Logits / T overflow float32 long before T reaches
# float32's smallest normal (1.2e-38, below which T itself rounds to 0), and already at T = 1e-5
# a logit gap of 0.001 makes the top token e^100 times likelier: the draw is the argmax anyway.
MIN_TEMPERATURE = 1e-5


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # 0: score the prompt only (prompt_logprobs), generate nothing
    temperature: float = 1.0  # 0 (anything below MIN_TEMPERATURE) = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off; k >= the vocabulary keeps every token
    seed: int | None = None  # same seed, same tokens
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # when False the model's eos_token ends the request
    logprobs: int | None = None  # return the chosen token's logprob and this many top ones
    prompt_logprobs: int | None = None  # the same for each prompt token after the first
    # vLLM's extras, applied by the engine's sampler (grok1.engine.sampler.process_logits)
    min_tokens: int = 0  # stop tokens are masked until this many tokens are generated
    min_p: float = 0.0  # drop tokens less likely than min_p x the likeliest one (0 = off)
    presence_penalty: float = 0.0  # subtracted once from each generated token's logit
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # divides (> 0) or multiplies (< 0) seen tokens' logits
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"max_tokens={self.max_tokens!r}: must be an integer >= 0")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature={self.temperature!r}: must be in [0, 100]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r}: must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r}: must be an integer >= 0 (0 = off)")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens={self.min_tokens!r}: must be an integer >= 0")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p={self.min_p!r}: must be in [0, 1]")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r}: must be > 0")
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b))
                                                     for t, b in self.logit_bias))
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 20:
                raise ValueError(f"{name}={value!r}: must be in [0, 20]")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def processes_logits(self) -> bool:
        """Whether any of vLLM's extras changes the logits before sampling."""
        return bool(self.logit_bias or self.min_tokens or self.min_p or self.penalized)

    @property
    def penalized(self) -> bool:
        """Whether sampling needs the request's token history (penalties)."""
        return bool(self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0)


_ARRAY_CODES = {torch.long: "q", torch.float32: "f"}


def rows_to_device(values, device: torch.device | str,
                   dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A list of ints (or floats: float32) as a 1-D tensor on `device`, without waiting for the
    GPU: torch.tensor(values, device="cuda") copies from pageable memory, which waits for every
    queued kernel; this copies from pinned memory, non-blocking (the caching host allocator
    keeps the buffer until the copy has run). Through array.array: torch.tensor walks a Python
    list element by element, ~6x slower for thousands of values."""
    if not values:
        return torch.empty(0, dtype=dtype, device=device)
    host = torch.frombuffer(array.array(_ARRAY_CODES[dtype], values), dtype=dtype)
    if torch.device(device).type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def temperatures(params: list[SamplingParams], device: torch.device | str) -> torch.Tensor:
    """Each row's temperature [B] as float32, 0 for greedy rows (see MIN_TEMPERATURE)."""
    return rows_to_device([0.0 if p.greedy else p.temperature for p in params], device,
                          torch.float32)


def filter_logits(logits_BV: torch.Tensor, temperature_B: torch.Tensor, top_k_B: torch.Tensor,
                  top_p_B: torch.Tensor) -> torch.Tensor:
    """f32 logits / temperature with everything outside each row's top-k and top-p set to -inf.

    Rows with temperature 0 are left unscaled (their caller takes the argmax).
    """
    x = logits_BV.float() / torch.where(temperature_B > 0, temperature_B, 1.0)[:, None]
    sorted_x, order = x.sort(dim=-1, descending=True)
    rank_V = torch.arange(x.shape[-1], device=x.device)
    drop = (top_k_B[:, None] > 0) & (rank_V[None, :] >= top_k_B[:, None])
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    probs = torch.softmax(sorted_x, dim=-1)
    # keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it < p
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p_B[:, None]
    drop[:, 0] = False  # the most likely token always survives
    return x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))


def sample(logits_BV: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row [B]: argmax for greedy rows, else a draw from the filtered
    softmax using that row's generator (exponential race: argmax p / Exp(1))."""
    device = logits_BV.device
    temperature = temperatures(params, device)
    vocab = logits_BV.shape[-1]  # a larger k keeps every token, and must fit an int64 tensor
    top_k = rows_to_device([min(p.top_k, vocab) for p in params], device)
    top_p = rows_to_device([p.top_p for p in params], device, torch.float32)
    x = filter_logits(logits_BV, temperature, top_k, top_p)
    drawn = exponential_race(torch.softmax(x, dim=-1), generators)
    return torch.where(temperature > 0, drawn, logits_BV.argmax(dim=-1))


def exponential_race(probs_BV: torch.Tensor,
                     generators: list[torch.Generator | None]) -> torch.Tensor:
    """argmax p / Exp(1) per row [B]: a draw from each row's distribution. A row's noise comes
    from its generator (one call per row: torch draws from one generator per call, so seeded
    rows cannot share a call and keep their sequences); rows without one (unseeded, or greedy
    rows whose draw is not used) take theirs from the default generator, in one call."""
    noise = torch.empty_like(probs_BV)
    if any(gen is None for gen in generators):
        noise.exponential_()
    for b, gen in enumerate(generators):
        if gen is not None:
            noise[b].exponential_(generator=gen)
    return (probs_BV / noise).argmax(dim=-1)


def logprobs_of(logits_BV: torch.Tensor, tokens_B: torch.Tensor, top: int) -> tuple[torch.Tensor, ...]:
    """(logprob of each chosen token [B], top logprobs [B, top], their ids [B, top]) under the
    model's own distribution (before temperature and filtering), as OpenAI reports them."""
    logp = torch.log_softmax(logits_BV.float(), dim=-1)
    top_logp, top_ids = logp.topk(top, dim=-1) if top else (logp[:, :0], tokens_B[:, None][:, :0])
    return logp.gather(-1, tokens_B[:, None])[:, 0], top_logp, top_ids


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen
