"""Weight formats beside the release's int8 (grok1.quant): int4 packing, dequantization twins,
the int4 scale search and fp8."""

import pytest
import torch

from grok1.quant import (
    FP8,
    INT8,
    dequantize,
    dequantize_as,
    dequantize_fp8,
    dequantize_int4,
    int4,
    pack_int4,
    quantize,
    quantize_as,
    quantize_fp8,
    quantize_int4,
    unpack_int4,
    weight_format,
)

BF16 = torch.bfloat16


def _reference(shape, seed=0, heavy_tails=False):
    """A bf16 matrix like a dequantized release one: per-column scales, Gaussian (or t) rows."""
    gen = torch.Generator().manual_seed(seed)
    if heavy_tails:  # Student t, 3 degrees of freedom: occasional large weights
        w = torch.randn(shape, generator=gen) / (
            torch.randn((3, *shape), generator=gen).pow(2).mean(0).sqrt())
    else:
        w = torch.randn(shape, generator=gen)
    col = torch.rand(shape[-1], generator=gen) + 0.5
    return (w * col * 0.02).to(BF16)


def test_pack_int4_round_trips_and_puts_even_rows_in_the_low_nibble():
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(-8, 8, (3, 10, 7), generator=gen, dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 7)
    assert torch.equal(unpack_int4(packed), q)
    two_rows = torch.tensor([[3, -8], [-2, 7]], dtype=torch.int8)  # rows 0, 1 of 2 columns
    # column 0: low = 3 + 8 = 11, high = -2 + 8 = 6 -> 0x6B; column 1: low 0, high 15 -> 0xF0
    assert pack_int4(two_rows).tolist() == [[0x6B, 0xF0]]


def test_dequantize_int4_gives_code_times_its_groups_scale_with_a_short_last_group():
    codes = torch.tensor([[1, -7], [2, 3], [-3, 0], [7, -1], [5, 4], [-6, 2]], dtype=torch.int8)
    scales = torch.tensor([[0.5, 0.25], [3.0, 1.5]], dtype=BF16)  # groups of 4 rows, then 2
    out = dequantize_int4(pack_int4(codes), scales, group_size=4)
    assert out.dtype == BF16
    assert out.float().tolist() == [[0.5, -1.75], [1.0, 0.75], [-1.5, 0.0], [3.5, -0.25],
                                    [15.0, 6.0], [-18.0, 3.0]]


def test_dequantize_int4_rounds_each_product_to_bf16_once():
    # 7 * bf16(1.0078125) = 7.0546875 is exact in f32 and rounds to bf16 7.0625 (8 bits)
    scales = torch.tensor([[1.0078125]], dtype=BF16)
    codes = torch.tensor([[7], [0]], dtype=torch.int8)
    out = dequantize_int4(pack_int4(codes), scales, group_size=2)
    assert out[0, 0].item() == torch.tensor(7 * 1.0078125).to(BF16).item() == 7.0625


@pytest.mark.parametrize("group_size", [128, 64])
def test_int4_error_is_within_rounding_and_clipping_of_each_group(group_size):
    w = _reference((2, 384, 96), seed=2)
    packed, scales = quantize_int4(w, group_size)
    assert packed.shape == (2, 192, 96) and scales.shape == (2, 384 // group_size, 96)
    out = dequantize_int4(packed, scales, group_size)
    wf = w.float()
    absmax = wf.unflatten(-2, (-1, group_size)).abs().amax(-2)
    expand = lambda t: t.repeat_interleave(group_size, dim=-2)  # noqa: E731
    # rounding: half a step, plus the bf16 rounding of the product; clipping (ratio >= 0.7):
    # at most 0.3 of the group's largest magnitude
    bound = expand(scales.float()) * 0.5 + out.float().abs() * 2 ** -8 + 0.3 * expand(absmax)
    assert ((out.float() - wf).abs() <= bound).all()
    rel = (out.float() - wf).norm() / wf.norm()
    assert rel < 0.12  # 4-bit Gaussian groups: ~0.1 relative L2
    swapped = torch.stack((unpack_int4(packed)[..., 1::2, :], unpack_int4(packed)[..., 0::2, :]),
                          dim=-2).flatten(-3, -2)
    wrong_nibbles = dequantize_int4(pack_int4(swapped), scales, group_size).float()
    assert not ((wrong_nibbles - wf).abs() <= bound).all()
    assert (wrong_nibbles - wf).norm() / wf.norm() > 1.0
    halved = scales.repeat_interleave(2, dim=-2)[..., :scales.shape[-2], :]  # groups of g/2
    wrong_group = dequantize_int4(packed, halved, group_size).float()
    assert not ((wrong_group - wf).abs() <= bound).all()


@pytest.mark.parametrize("heavy_tails", [False, True])
def test_int4_scale_search_is_never_worse_than_absmax_in_any_group(heavy_tails):
    w = _reference((256, 200), seed=3, heavy_tails=heavy_tails)
    group_size = 64

    def group_errors(ratios):
        kwargs = {} if ratios is None else {"ratios": ratios}
        out = dequantize_int4(*quantize_int4(w, group_size, **kwargs), group_size)
        return (out.float() - w.float()).pow(2).unflatten(0, (-1, group_size)).sum(1)

    searched, absmax = group_errors(None), group_errors((1.0,))
    assert (searched <= absmax).all()
    # and it earns its keep: 14 % less squared error on Gaussian groups, 10 % with heavy tails
    assert searched.sum() < 0.92 * absmax.sum()


def test_fp8_dequantizes_to_value_times_column_scale():
    values = torch.tensor([[448.0, -0.5], [1.125, 0.015625], [-3.5, 240.0]])
    weight = values.to(torch.float8_e4m3fn)
    assert torch.equal(weight.float(), values)  # all exact in e4m3
    scales = torch.tensor([[0.25, 3.0]], dtype=BF16)
    out = dequantize_fp8(weight, scales)
    assert out.dtype == BF16
    assert out.float().tolist() == [[112.0, -1.5], [0.28125, 0.046875], [-0.875, 720.0]]


def test_fp8_quantization_error_is_within_e4m3_rounding():
    w = _reference((3, 160, 48), seed=4, heavy_tails=True)
    weight, scales = quantize_fp8(w)
    assert weight.dtype == torch.float8_e4m3fn and scales.shape == (3, 1, 48)
    assert weight.float().abs().amax(dim=-2).max() <= 448
    out = dequantize_fp8(weight, scales).float()
    wf = w.float()
    # 3 mantissa bits: half an ulp is 2^-4 relative; subnormals (below 2^-6 * scale) step by
    # 2^-9 * scale; then the bf16 rounding of the product
    bound = wf.abs() * 2 ** -4 + scales.float() * 2 ** -10 + out.abs() * 2 ** -8
    assert ((out - wf).abs() <= bound).all()
    assert (out - wf).norm() / wf.norm() < 0.03


def test_int8_stays_the_release_format():
    w = _reference((2, 64, 24), seed=5)
    assert weight_format("int8") is INT8 and weight_format(None) is None
    q, s = quantize_as(INT8, w, 8)
    q_ref, s_ref = quantize(w, 8)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert torch.equal(dequantize_as(INT8, q, s), dequantize(q, s))
    assert INT8.num_groups(64, 8) == 8 and FP8.num_groups(64, 8) == 1
    assert int4(128).num_groups(344, 8) == 3 and int4(64).weight_shape((8,), 64, 10) == (8, 32, 10)


def test_format_names_and_bad_values_are_refused_with_the_value():
    assert weight_format("int4", 64) == int4(64) and weight_format("fp8") is FP8
    with pytest.raises(ValueError, match="weights='int3'"):
        weight_format("int3")
    with pytest.raises(ValueError, match="not 7"):
        int4(7)
    with pytest.raises(ValueError, match="input dim 5 is odd"):
        int4().weight_shape((), 5, 4)
