import pytest
import torch

from grok1.sampling import SamplingParams, filter_logits, logprobs_of, make_generator, sample


def test_greedy_takes_the_argmax():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    out = sample(logits, [SamplingParams(temperature=0.0)] * 4, [make_generator(0, "cpu")] * 4)
    assert torch.equal(out, logits.argmax(-1))


def test_top_k_keeps_exactly_k_tokens():
    torch.manual_seed(1)
    logits = torch.randn(3, 40)
    x = filter_logits(logits, torch.ones(3), torch.tensor([1, 5, 0]), torch.ones(3))
    assert torch.isfinite(x).sum(-1).tolist() == [1, 5, 40]
    kept = torch.isfinite(x[1])
    assert set(kept.nonzero().flatten().tolist()) == set(logits[1].topk(5).indices.tolist())


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    for p, keep in ((0.5, 1), (0.6, 2), (0.8, 2), (0.81, 3), (0.96, 4), (1.0, 4)):
        x = filter_logits(logits, torch.ones(1), torch.zeros(1, dtype=torch.long), torch.tensor([p]))
        assert int(torch.isfinite(x).sum()) == keep, p


def test_same_seed_same_tokens_and_distribution_is_followed():
    torch.manual_seed(2)
    logits = torch.randn(1, 6) * 2
    params = [SamplingParams(temperature=1.0, seed=7)]
    draws = lambda: [int(sample(logits, params, [g])[0]) for g in [make_generator(7, "cpu")] for _ in range(300)]
    assert draws() == draws()
    gen = make_generator(11, "cpu")
    counts = torch.bincount(torch.stack([sample(logits, params, [gen])[0] for _ in range(4000)]), minlength=6)
    freq = counts.float() / counts.sum()
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.03)  # ~4 sigma at n=4000


def test_temperature_sharpens():
    torch.manual_seed(3)
    logits = torch.randn(1, 8)
    gen = make_generator(3, "cpu")
    cold = [int(sample(logits, [SamplingParams(temperature=0.05)], [gen])[0]) for _ in range(200)]
    assert cold.count(int(logits.argmax())) >= 195


def test_logprobs_are_log_softmax():
    torch.manual_seed(4)
    logits = torch.randn(2, 10)
    chosen, top, ids = logprobs_of(logits, torch.tensor([3, 4]), 2)
    ref = torch.log_softmax(logits, -1)
    assert torch.allclose(chosen, ref[[0, 1], [3, 4]])
    assert torch.allclose(top, ref.topk(2).values) and torch.equal(ids, ref.topk(2).indices)


@pytest.mark.parametrize("field,value", [("max_tokens", -1), ("temperature", -1.0),
                                         ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("logprobs", 21),
                                         ("prompt_logprobs", 21), ("min_tokens", -1),
                                         ("min_p", 1.5), ("repetition_penalty", 0.0)])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"{field}="):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("temperature", [1e-39, 1e-30, 9e-6])
def test_temperature_below_the_threshold_is_greedy_not_token_zero(temperature):
    from grok1.engine.sampler import sample_rows
    from grok1.sampling import MIN_TEMPERATURE

    torch.manual_seed(5)
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=temperature)] * 3
    assert temperature < MIN_TEMPERATURE and params[0].greedy
    want = logits.argmax(-1)
    assert int(want.min()) > 0  # so a row of pad (id 0) cannot pass by chance
    gens = [make_generator(s, "cpu") for s in range(3)]
    assert torch.equal(sample(logits, params, gens), want)
    # the engine's batch sampler, alone and beside a sampled row (its two fast paths)
    assert torch.equal(sample_rows(logits, params, gens), want)
    mixed = params[:2] + [SamplingParams(temperature=1.0, seed=1)]
    assert torch.equal(sample_rows(logits, mixed, gens)[:2], want[:2])


def test_top_k_beyond_the_vocabulary_keeps_every_token_instead_of_overflowing():
    torch.manual_seed(6)
    logits = torch.randn(2, 30)
    huge = [SamplingParams(temperature=1.0, top_k=10**20, top_p=0.9)] * 2
    off = [SamplingParams(temperature=1.0, top_k=0, top_p=0.9)] * 2
    a = sample(logits, huge, [make_generator(s, "cpu") for s in (1, 2)])
    b = sample(logits, off, [make_generator(s, "cpu") for s in (1, 2)])
    assert torch.equal(a, b)


def test_the_race_draws_seeded_rows_from_their_own_generator_and_the_rest_in_one_call():
    from grok1.sampling import exponential_race

    torch.manual_seed(7)
    probs = torch.softmax(torch.randn(4, 64), -1)
    seeds = [3, None, 5, None]
    gens = lambda: [None if s is None else make_generator(s, "cpu") for s in seeds]  # noqa: E731
    torch.manual_seed(8)
    a = exponential_race(probs, gens())
    torch.manual_seed(8)
    b = exponential_race(probs, gens())
    assert torch.equal(a, b)  # unseeded rows follow the default generator
    # a seeded row draws what it drew when each row had its own call: a row-sized draw
    ref = [(probs[r] / torch.empty(64).exponential_(generator=make_generator(seeds[r], "cpu")))
           .argmax() for r in (0, 2)]
    assert a[0] == ref[0] and a[2] == ref[1]


def test_rows_to_device_keeps_values_and_dtypes():
    from grok1.sampling import rows_to_device

    ints, floats = [3, -1, 2**40], [0.1, 2.5, -7.25]
    assert rows_to_device(ints, "cpu").tolist() == ints
    assert torch.equal(rows_to_device(floats, "cpu", torch.float32), torch.tensor(floats))
    assert rows_to_device([], "cpu").shape == (0,)
