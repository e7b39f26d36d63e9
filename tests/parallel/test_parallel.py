"""grok1.parallel without processes: the plan table, scale-group slicing, sharded shapes, expert
partial sums and sharded loading, each rank simulated in one process (the collectives are
tested under torchrun in test_parallel_dist.py)."""

import copy

import pytest
import torch

from grok1.config import ConfigError, GrokConfig
from grok1.model import Grok1, moe_ref, route, wide_dtype
from grok1.parallel.expert import expert_partial
from grok1.parallel.tensor import (
    Layout,
    Split,
    local_config,
    local_shapes,
    shard_model_,
    slice_scales,
    slice_weight,
)
from grok1.quant import dequantize, quantize

GROK = GrokConfig.preset("grok-1")


@pytest.mark.parametrize("ranks", [1, 2, 4, 8, 16])
def test_each_rank_holds_whole_query_heads_and_the_kv_heads_they_use(ranks):
    held_q, held_kv = [], []
    for rank in range(ranks):
        s = local_shapes(GROK, Layout(ranks, rank))
        assert all(n // GROK.q_per_kv in s.kv_heads for n in s.q_heads)
        held_q += list(s.q_heads)
        held_kv += list(s.kv_heads)
    assert held_q == list(range(48))  # every query head exactly once, in rank order
    copies = ranks // 8 if ranks > 8 else 1  # 16 ranks: each of the 8 kv heads on 2 ranks
    assert sorted(held_kv) == sorted(list(range(8)) * copies)


@pytest.mark.parametrize("ranks, message", [
    (3, ("--tp 3 must divide num_kv_heads=8, or be a multiple of it dividing num_q_heads=48 "
         "(try 1, 2, 4, 8, 16, 24 or 48)")),
    (32, "--tp 32 must divide num_kv_heads=8, or be a multiple of it dividing num_q_heads=48"),
])
def test_a_tp_size_that_cannot_split_the_heads_names_the_counts(ranks, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        local_shapes(GROK, Layout(ranks, 0))


def test_expert_parallelism_needs_the_rank_count_to_divide_the_experts():
    with pytest.raises(ConfigError, match="--tp 16 must divide num_experts=8"):
        local_shapes(GROK, Layout(16, 0, moe="ep"))
    with pytest.raises(ConfigError, match="moe='xp': expected one of tp, ep, none"):
        Layout(2, 0, moe="xp")


@pytest.mark.parametrize("ranks, groups_each", [(2, 4), (4, 2), (8, 1), (16, 1)])
def test_a_row_split_takes_the_scale_groups_of_its_rows(ranks, groups_each):
    g = torch.Generator().manual_seed(1)
    scales = torch.rand(3, 8, 5, generator=g).to(torch.bfloat16)  # [E, G, out]
    K = 64  # 8 groups of 8 rows
    for rank in range(ranks):
        n = K // ranks
        piece = slice_scales(scales, Split("in", rank * n, (rank + 1) * n), K)
        first = rank * n // 8
        assert piece.shape == (3, groups_each, 5)
        assert torch.equal(piece, scales[:, first:first + groups_each])


def test_one_scale_group_stays_whole_and_a_column_split_cuts_scales_like_the_weight():
    s = torch.rand(1, 12).to(torch.bfloat16)
    assert slice_scales(s, Split("in", 4, 8), 16) is s
    assert torch.equal(slice_scales(s, Split("out", 6, 12), 16), s[:, 6:12])


def test_rows_that_cut_across_a_scale_group_are_refused_with_the_tensor_name():
    s = torch.rand(8, 4).to(torch.bfloat16)
    with pytest.raises(ConfigError, match=r"layers.0.attn.wo.scales: rows 0:12 of 64 cut across"):
        slice_scales(s, Split("in", 0, 12), 64, "layers.0.attn.wo.scales")


@pytest.mark.parametrize("ranks", [2, 4, 16])
def test_dequantized_row_shards_reassemble_the_full_matrix_exactly(ranks):
    g = torch.Generator().manual_seed(2)
    w, s = quantize(torch.randn(64, 24, generator=g), groups=8)
    n = 64 // ranks
    pieces = [dequantize(slice_weight(w, sp), slice_scales(s, sp, 64))
              for sp in (Split("in", r * n, (r + 1) * n) for r in range(ranks))]
    assert torch.equal(torch.cat(pieces, dim=0), dequantize(w, s))


def test_sharding_a_meta_grok1_gives_each_rank_its_local_shapes():
    with torch.device("meta"):
        model = Grok1(GROK.replace(num_layers=2), quantized=True)
    shard_model_(model, Layout(4, 3, moe="tp"))
    layer = model.layers[1]
    assert layer.attn.wq.weight.shape == (6144, 12 * 128)
    assert layer.attn.wk.weight.shape == (6144, 2 * 128) and layer.attn.wk.scales.shape == (1, 256)
    assert layer.attn.wo.weight.shape == (12 * 128, 6144) and layer.attn.wo.scales.shape == (2, 6144)
    assert layer.moe.w_gate.weight.shape == (8, 6144, 8192)
    assert layer.moe.w_down.weight.shape == (8, 8192, 6144)
    assert layer.moe.w_down.scales.shape == (8, 2, 6144)
    assert (layer.attn.config.num_q_heads, layer.attn.config.num_kv_heads) == (12, 2)
    assert model.config.num_q_heads == 48  # the model's config stays global
    assert local_config(GROK, Layout(16, 5)).num_kv_heads == 1  # replicated kv head

    with torch.device("meta"):
        model = Grok1(GROK.replace(num_layers=1), quantized=True)
    shard_model_(model, Layout(4, 1, moe="ep"))
    moe = model.layers[0].moe
    assert moe.w_gate.weight.shape == (2, 6144, 32768)
    assert moe.w_down.scales.shape == (2, 8, 6144)
    assert moe.router.shape == (6144, 8)  # every rank routes over all experts


def _random_moe(config: GrokConfig, seed: int):
    from grok1 import random_weights

    model = random_weights(config.replace(num_layers=1), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(37, config.emb_size, generator=g).to(torch.bfloat16)
    return model, x


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_expert_partials_of_all_ranks_sum_to_one_process_bit_for_bit(tiny_config, ranks):
    model, x = _random_moe(tiny_config, seed=3)
    moe = model.layers[0].moe
    _, gates, ids = route(x, moe.router, moe.top_k)
    ref = moe_ref(x, gates, ids, moe.w_gate, moe.w_up, moe.w_down, out_dtype=wide_dtype(x.device))
    total = torch.zeros_like(ref)
    for rank in range(ranks):
        layout = Layout(ranks, rank, attn="none", moe="ep", unembed="none")
        shard = shard_model_(copy.deepcopy(model), layout).layers[0].moe
        total += expert_partial(x, gates, ids, shard, local_shapes(tiny_config, layout).experts)
    # each token has 2 nonzero terms and addition of two terms is order-free: exact
    assert total.dtype == ref.dtype == wide_dtype(x.device)
    assert torch.equal(total.float().to(torch.bfloat16), ref.float().to(torch.bfloat16))
    assert torch.equal(total, ref)


def test_width_split_expert_partials_sum_to_one_process_within_f32_reordering(tiny_config):
    model, x = _random_moe(tiny_config, seed=4)
    moe = model.layers[0].moe
    _, gates, ids = route(x, moe.router, moe.top_k)
    ref = moe_ref(x, gates, ids, moe.w_gate, moe.w_up, moe.w_down, out_dtype=wide_dtype(x.device))
    total = torch.zeros_like(ref)
    for rank in range(2):
        layout = Layout(2, rank, attn="none", moe="tp", unembed="none")
        shard = shard_model_(copy.deepcopy(model), layout).layers[0].moe
        assert shard.w_down.weight.shape[1] == tiny_config.ffn_size // 2
        total += expert_partial(x, gates, ids, shard, range(8))
    # the same f32 products summed in another order: f32 rounding only (2^-24 relative)
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def golden_full(golden_dir):
    from grok1.checkpoint.xai_pickle import load_xai_checkpoint

    config = GrokConfig.from_json(golden_dir / "config.json")
    return config, load_xai_checkpoint(golden_dir / "checkpoint", config, progress=False)


@pytest.mark.parametrize("ranks, rank, moe, unembed", [
    (2, 0, "tp", "vocab"), (2, 1, "tp", "vocab"), (4, 2, "ep", "vocab"), (4, 3, "tp", "dim"),
    (8, 5, "tp", "vocab"),
])
def test_sharded_load_equals_slicing_the_full_load(golden_dir, golden_full, ranks, rank, moe,
                                                    unembed):
    import grok1

    config, full = golden_full
    layout = Layout(ranks, rank, moe=moe, unembed=unembed)
    loaded = grok1.load(golden_dir / "checkpoint", config=config, layout=layout,
                        progress=False).state_dict()
    sliced = shard_model_(copy.deepcopy(full), layout).state_dict()
    assert loaded.keys() == sliced.keys()
    for key in sliced:
        assert loaded[key].dtype == sliced[key].dtype, key
        assert torch.equal(loaded[key], sliced[key]), key
    wo = loaded["layers.3.attn.wo.scales"]
    assert wo.shape == (8 // ranks, config.emb_size)  # 8 groups over the ranks' rows


def test_parallelize_declares_its_layout_and_keeps_the_models_names(tiny_config):
    """Sharding is data the model declares (Grok1.layout) and modules put in place of the
    plain ones: the classes stay, nothing is attached that a class does not declare, and the
    state-dict names are the unsharded model's (a checkpoint saves and loads the same)."""
    from grok1.model import MoE, PartialSums
    from grok1.parallel.expert import ParallelMoE
    from grok1.parallel.tensor import RowParallelLinear, ShardedUnembedding, parallelize

    model = Grok1(tiny_config, quantized=True)
    names = set(model.state_dict())
    assert model.layout is None and model.local_config == tiny_config
    layout = Layout(1, 0, attn="tp", moe="ep", unembed="vocab")
    parallelize(model, None, layout)
    assert type(model) is Grok1 and model.layout == layout
    assert set(model.state_dict()) == names
    for layer in model.layers:
        assert type(layer.attn.wo) is RowParallelLinear and type(layer.moe) is ParallelMoE
        assert isinstance(layer.moe, torch.nn.Module) and not isinstance(layer.moe, MoE)
    assert type(model.unembedding) is ShardedUnembedding
    with pytest.raises(ValueError, match="already sharded"):
        shard_model_(model, layout)
    x = torch.randn(3, tiny_config.emb_size).to(torch.bfloat16)
    assert isinstance(model.layers[0].moe(x), PartialSums)
    assert isinstance(model.layers[0].attn.wo(x[:, :tiny_config.num_q_heads
                                                   * tiny_config.key_size]), PartialSums)


def test_partial_sums_round_once_and_split_only_the_last_dim():
    from grok1.model import PartialSums, summed
    g = torch.Generator().manual_seed(0)
    terms = torch.randn(3, 5, 2, 8, generator=g)
    p = PartialSums(terms, (0, 2))
    assert torch.equal(p.value(), terms.sum(dim=(0, 2)).to(torch.bfloat16))
    assert torch.equal(summed(p), p.value())
    q = PartialSums(torch.randn(2, 5, 12, generator=g))
    assert q.unflatten(-1, (3, 4)).terms.shape == (2, 5, 3, 4)
    assert torch.equal(q.unflatten(-1, (3, 4)).value(), q.value().unflatten(-1, (3, 4)))
    with pytest.raises(ValueError, match="last, unsummed dim"):
        PartialSums(terms, (0, 3)).unflatten(-1, (2, 4))
