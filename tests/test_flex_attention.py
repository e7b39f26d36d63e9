"""The opt-in flex attention (grok1.model.attention_flex; Grok1(attention="flex"), `grok1 train
--attention flex`) against the reference's (attention_ref): the same function at its own
rounding. Its scores stay f32 where the reference rounds them to bf16, so the bound is the
reference's own: both against attention_ref in f32 compute from the same bf16 inputs, flex is no
further from it than the bf16 reference is. On the CPU torch runs flex_attention forward only
(eager, and compiled); its backward is a GPU's, so the gradient test is marked gpu."""

import math

import pytest
import torch

import grok1
from grok1.config import ConfigError, GrokConfig
from grok1.golden import rel_l2
from grok1.model import Grok1, attention_flex, attention_ref, flex_block_mask

pytest.importorskip("torch.nn.attention.flex_attention")
# eager flex_attention (torch's reference math, the CPU's) warns that it is not the fused kernel
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA (flex_attention's backward)")


def qkv_mask(seed: int, B: int, T: int, N: int, K: int, H: int, device: str = "cpu"):
    """bf16 q [B, T, N, H], k and v [B, T, K, H], scores of std ~2 (some near the cap's bend),
    and a causal mask with ~10 % pad keys (never the first, so every query sees a key)."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, T, N, H, generator=g) * 2).bfloat16()
    k = (torch.randn(B, T, K, H, generator=g) * 2).bfloat16()
    v = torch.randn(B, T, K, H, generator=g).bfloat16()
    real_BT = torch.rand(B, T, generator=g) > 0.1
    real_BT[:, 0] = True
    t = torch.arange(T)
    mask_BTS = real_BT[:, None, :] & (t[None, :, None] >= t[None, None, :])
    return [x.to(device) for x in (q, k, v, mask_BTS)]


# GQA 6:1 and 3:1 (not powers of 2) and none, lengths off and on the kernel's 128-blocks; H >= 16
# (the GPU kernel's least)
SHAPES = [(2, 16, 6, 1, 16), (1, 77, 6, 2, 16), (2, 130, 12, 2, 32), (1, 256, 4, 4, 64)]


@pytest.mark.parametrize("B, T, N, K, H", SHAPES)
def test_flex_forward_is_within_the_references_own_bf16_error(B, T, N, K, H):
    q, k, v, mask = qkv_mask(T, B, T, N, K, H)
    m = 1 / math.sqrt(H)
    exact = attention_ref(q.float(), k.float(), v.float(), mask, m)  # f32 compute, no rounding
    plain = attention_ref(q, k, v, mask, m)
    flex = attention_flex(q, k, v, flex_block_mask(mask), m)
    assert flex.dtype == plain.dtype == torch.bfloat16 and flex.shape == (B, T, N * H)
    # measured: flex 1.9e-3..2.3e-3 from exact, the reference 3.0e-3..7.4e-3, 3.0e-3..7.7e-3 apart
    assert rel_l2(flex, exact) <= rel_l2(plain, exact)
    assert rel_l2(flex, plain) < 1e-2


def test_flex_temperature_and_no_cap_follow_the_reference():
    """Grok-2's query temperature (after the cap) and a cap of 0 (none) go through score_mod."""
    q, k, v, mask = qkv_mask(3, 2, 40, 6, 2, 16)
    temperature_BT = 1 + torch.rand(2, 40, generator=torch.Generator().manual_seed(4))
    for cap in (30.0, 0.0):
        exact = attention_ref(q.float(), k.float(), v.float(), mask, 0.25, cap, temperature_BT)
        plain = attention_ref(q, k, v, mask, 0.25, cap, temperature_BT)
        flex = attention_flex(q, k, v, flex_block_mask(mask), 0.25, cap, temperature_BT)
        assert rel_l2(flex, exact) <= rel_l2(plain, exact)


def test_compiled_flex_forward_on_the_cpu_matches_the_eager_one_without_recompiling():
    """The compiled path a GPU takes (here inductor's CPU code), with the captured mask; each
    forward makes a new mask and score_mod (new closures), which must not recompile (past
    dynamo's limit it would fall back to the unfused math)."""
    for seed in (5, 6, 7):
        q, k, v, mask = qkv_mask(seed, 1, 64, 6, 2, 16)
        block_mask = flex_block_mask(mask)
        eager = attention_flex(q, k, v, block_mask, 0.25, compiled=False)
        with torch._dynamo.config.patch(error_on_recompile=seed > 5):
            compiled = attention_flex(q, k, v, block_mask, 0.25, compiled=True)
        # the same f32 math summed in another order, each rounded to bf16 (measured 2.6e-3)
        assert rel_l2(compiled, eager) < 4e-3


@gpu
@pytest.mark.parametrize("B, T, N, K, H", SHAPES)
def test_flex_gradients_are_within_the_references_own_bf16_error(B, T, N, K, H):
    q, k, v, mask = qkv_mask(T, B, T, N, K, H, device="cuda")
    m = 1 / math.sqrt(H)
    do = torch.randn(B, T, N * H, generator=torch.Generator().manual_seed(9)).cuda()

    def grads(fn, dtype):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        fn(*leaves).backward(do.to(dtype))
        return [x.grad for x in leaves]

    exact = grads(lambda a, b, c: attention_ref(a, b, c, mask, m), torch.float32)
    plain = grads(lambda a, b, c: attention_ref(a, b, c, mask, m), torch.bfloat16)
    flex = grads(lambda a, b, c: attention_flex(a, b, c, flex_block_mask(mask), m),
                 torch.bfloat16)
    for name, f, p, e in zip("qkv", flex, plain, exact):
        assert rel_l2(f, e) <= rel_l2(p, e), name
        assert rel_l2(f, p) < 2e-2, name


def test_grok1_takes_flex_only_where_asked_and_only_without_a_cache(tiny_config):
    plain = grok1.random_weights(tiny_config, seed=2)
    flex = grok1.random_weights(tiny_config, seed=2)
    flex.attention = "flex"
    tokens = torch.randint(3, tiny_config.vocab_size, (2, 24),
                           generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        a, b = plain(tokens), flex(tokens)
        # another rounding of the same function (measured 3.5e-3 after two layers)
        assert not torch.equal(a, b) and rel_l2(b, a) < 1e-2
        cache_a = grok1.model.KVCache.allocate(tiny_config, 2, 32)
        cache_b = grok1.model.KVCache.allocate(tiny_config, 2, 32)
        assert torch.equal(plain(tokens, cache_a), flex(tokens, cache_b))  # a cache: plain


def test_unknown_attention_kernels_are_refused_naming_the_value(tmp_path):
    from grok1.train.train_config import TrainConfig

    with pytest.raises(ValueError, match="attention='sdpa'"):
        Grok1(GrokConfig.preset("tiny"), attention="sdpa")
    with pytest.raises(ConfigError, match="attention='sdpa'"):
        TrainConfig(data_dir=str(tmp_path), out_dir=str(tmp_path), attention="sdpa")
