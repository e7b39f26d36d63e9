"""`grok1 info` reproduces SPEC section 9 to the parameter and the byte (and Grok-2's counts,
grok2 SPEC 1, from hand-computed figures)."""

import json
import subprocess
import sys

import pytest

from grok1.config import GrokConfig
from grok1.info import model_size


def test_grok1_preset_counts_match_spec_section_9():
    s = model_size(GrokConfig.preset("grok-1"))
    assert s.total_params == 315_684_820_992
    assert s.non_embedding_params == 314_879_514_624
    assert s.active_params == 83_756_587_008
    assert s.bytes_bf16 == 631_369_641_984
    assert s.bytes_released == 318_239_694_848
    assert s.bytes_int8 == 316_619_632_640
    assert s.kv_bytes_per_token == 262_144


def test_weight_bytes_per_format_count_stored_weights_and_scales():
    from grok1.info import weight_bytes

    c = GrokConfig.preset("grok-1")
    s = model_size(c)
    assert weight_bytes(c, "int8") == s.bytes_int8 == 316_619_632_640
    assert weight_bytes(c, None) == s.bytes_bf16
    # int4: 314,874,789,888 / 2 B of codes + 64 x 38,436,864 bf16 scales (groups of 128:
    # 48 x (6144 + 1024 + 1024 + 6144) + 8 x (48 x 32768 x 2 + 256 x 6144)) + 1,620,062,208 B
    # of bf16 embedding, routers and norms
    assert s.bytes_int4 == 157_437_394_944 + 4_919_918_592 + 1_620_062_208 == 163_977_375_744
    assert weight_bytes(c, "int4", 64) == s.bytes_int4 + 4_919_918_592  # twice the scales
    # fp8: a byte a weight + one bf16 scale per output column (64 x 587,776)
    assert s.bytes_fp8 == 314_874_789_888 + 75_235_328 + 1_620_062_208
    assert s.gpus_needed(141 * 2**30, s.bytes_int4) == 2  # 152.7 GiB on 2 x H200
    assert s.gpus_needed(80 * 2**30, s.bytes_int4) == 3


@pytest.mark.parametrize("weights,group_size", [("int8", 128), ("int4", 128), ("int4", 32),
                                                ("fp8", 128), (None, 128)])
def test_weight_bytes_equal_a_models_state_dict_in_that_format(weights, group_size):
    import torch

    from grok1.info import weight_bytes
    from grok1.model import Grok1
    from grok1.quant import weight_format

    c = GrokConfig.preset("tiny")
    with torch.device("meta"):
        model = Grok1(c, weights=weight_format(weights, group_size))
    # the model keeps norms and routers f32; weight_bytes counts every unquantized tensor bf16
    stored = sum(t.numel() * (2 if t.dtype == torch.float32 else t.element_size())
                 for t in model.state_dict().values())
    assert weight_bytes(c, weights, group_size) == stored


def test_gpus_needed_grows_as_gpus_shrink():
    s = model_size(GrokConfig.preset("grok-1"))
    assert s.gpus_needed(141 * 2**30) == 3  # 317 GB of int8 weights over 0.9 x 141 GiB
    assert s.gpus_needed(80 * 2**30) == 5
    assert s.gpus_needed(80 * 2**30, s.bytes_bf16) == 9


def test_info_command_prints_spec_figures():
    out = subprocess.run([sys.executable, "-m", "grok1", "info"], capture_output=True, text=True,
                         check=True).stdout
    for figure in ("315,684,820,992", "314,879,514,624", "83,756,587,008", "318,239,694,848",
                   "631,369,641,984", "262,144"):
        assert figure in out, figure


def test_info_names_the_tensor_parallel_size_that_holds_the_weights():
    from grok1.info import format_info, tensor_parallel_sizes

    grok = GrokConfig.preset("grok-1")
    assert tensor_parallel_sizes(grok) == [1, 2, 4, 8, 16]
    lines = format_info(grok, gpu_gib=80).splitlines()
    assert "fewest 80 GiB GPUs for int8 weights (90 % of memory): 5, so --tp 8" in lines
    assert "fewest 80 GiB GPUs for bf16 weights (90 % of memory): 9, so --tp 16" in lines
    assert ("tensor-parallel sizes (--tp): 1, 2, 4, 8, 16 (each divides the 8 KV heads or is a "
            "multiple of 8 dividing the 48 query heads, and splits the expert width and "
            "vocabulary evenly)") in lines
    assert ("fewest 141 GiB GPUs for int8 weights (90 % of memory): 3, so --tp 4"
            in format_info(grok, gpu_gib=141).splitlines())
    # bf16 weights need 17 GPUs of 40 GiB, more than the widest split
    assert "more than --tp can split (16)" in format_info(grok, gpu_gib=40)


def test_info_for_one_weight_format():
    # `grok1 info --weights int4 --gpu-gib 131`: int4 Grok-1 (groups 128: 152.7 GiB) on two
    # H200s; groups of 64 carry twice the scales; an unknown format is refused by name
    out = subprocess.run([sys.executable, "-m", "grok1", "info", "--weights", "int4",
                          "--gpu-gib", "131"], capture_output=True, text=True, check=True).stdout
    assert "weights, int4 (groups 128): 163,977,375,744 B (163.98 GB, 152.7 GiB)" in out
    assert "fewest 131 GiB GPUs for int4 (groups 128) weights (90 % of memory): 2, so --tp 2" \
        in out
    assert "for int8 weights" not in out and "for fp8 weights" not in out
    from grok1.info import format_info

    grok = GrokConfig.preset("grok-1")
    assert "weights, int4 (groups 64): 168,897,294,336 B" in format_info(grok, weights="int4",
                                                                          group_size=64)
    assert "fewest 80 GiB GPUs for fp8 weights (90 % of memory): 5, so --tp 8" in \
        format_info(grok, weights="fp8")
    with pytest.raises(ValueError, match="weights='int3'"):
        format_info(grok, weights="int3")


# ---- Grok-2 (grok2 SPEC 1 and 3: 64 layers, D 8192, 64 q / 8 kv heads of 128, 8 experts top-2
# of width 16384, a dense MLP of 32768, vocab 131072, untied head) --------------------------

D2, V2, L2 = 8192, 131072, 64
ATTN2 = D2 * 8192 * 2 + D2 * 1024 * 2  # q, o: 64 x 128 wide; k, v: 8 x 128
EXPERT2 = 3 * D2 * 16384
DENSE2 = 3 * D2 * 32768
SMALL2 = D2 * 8 + 4 * D2  # router, four norms
TOTAL2 = L2 * (ATTN2 + DENSE2 + 8 * EXPERT2 + SMALL2) + 2 * V2 * D2 + D2


def test_grok2_counts_equal_the_hand_computed_ones_and_spec_section_1():
    from grok1.config_grok2 import Grok2Config
    from grok1.info import info_config

    config = info_config("grok-2")
    assert config == Grok2Config()
    s = model_size(config.to_grok_config())
    assert s.total_params == TOTAL2 == 269_515_497_472  # SPEC 1: 269.5 B
    assert s.total_params == config.num_parameters  # Grok2Config's own count agrees
    assert s.active_params == TOTAL2 - L2 * 6 * EXPERT2 == 114_896_674_816  # SPEC 1: 114.9 B
    assert s.active_params == config.active_parameters
    assert s.non_embedding_params == TOTAL2 - 2 * V2 * D2
    assert s.bytes_bf16 == 2 * TOTAL2 == 539_030_994_944  # SPEC 1: 539 GB
    assert s.kv_bytes_per_token == 2 * L2 * 8 * 128 * 2 == config.kv_bytes_per_token()
    # int8: a byte per attention and expert weight, bf16 scales (q, k, v: one row per output
    # column; o and the experts' down: 8 groups), the dense MLP, tables, routers, norms in bf16
    scales = L2 * (8192 + 1024 + 1024 + 8 * D2 + 8 * (16384 * 2 + 8 * D2))
    quantized = L2 * (ATTN2 + 8 * EXPERT2)
    assert s.bytes_int8 == quantized + 2 * scales + 2 * (TOTAL2 - quantized)
    assert s.gpus_needed(80 * 2**30, s.bytes_bf16) == 7  # 502.0 GiB / (0.9 x 80 GiB) = 6.97
    assert s.gpus_needed(141 * 2**30, s.bytes_bf16) == 4  # / (0.9 x 141 GiB) = 3.96


def test_grok2_weight_bytes_equal_a_grok2_models_state_dict():
    import torch

    from grok1.config_grok2 import Grok2Config
    from grok1.info import weight_bytes
    from grok1.model import Grok1
    from grok1.quant import weight_format

    c = Grok2Config(vocab_size=320, emb_size=64, key_size=16, num_q_heads=8, num_kv_heads=2,
                    num_layers=2, expert_width=48, dense_width=96).to_grok_config()
    for weights in ("int8", "int4", "fp8", None):
        with torch.device("meta"):
            model = Grok1(c, weights=weight_format(weights))
        stored = sum(t.numel() * (2 if t.dtype == torch.float32 else t.element_size())
                     for t in model.state_dict().values())
        assert weight_bytes(c, weights) == stored, weights
    assert model_size(c).bytes_bf16 == weight_bytes(c, None)


def test_info_on_grok2_prints_its_figures_and_the_gpus_it_needs(tmp_path):
    from grok1.info import format_info, info_config

    lines = format_info(info_config("grok-2"), gpu_gib=141).splitlines()
    assert lines[0].startswith("Grok-2: layers 64, d_model 8192")
    assert "a dense MLP of width 32768" in lines[0] and "(untied head)" in lines[0]
    assert "parameters, total:          269,515,497,472" in lines
    assert "parameters, active/token:   114,896,674,816" in lines
    assert "weights, as released:       539,030,994,944 B (539.03 GB, 502.0 GiB) (bf16)" in lines
    assert "fewest 141 GiB GPUs for bf16 weights (90 % of memory): 4, so --tp 4" in lines
    out = format_info(info_config("grok-2"), gpu_gib=80).splitlines()
    assert "fewest 80 GiB GPUs for bf16 weights (90 % of memory): 7, so --tp 8" in out
    # Grok-2's config.json (the release's field names) is read as Grok-2's
    config = tmp_path / "config.json"
    golden_like = {"architectures": ["Grok1ForCausalLM"], "vocab_size": 1024, "hidden_size": 128,
                   "intermediate_size": 512, "moe_intermediate_size": 256,
                   "max_position_embeddings": 4096, "num_experts_per_tok": 2,
                   "num_local_experts": 8, "residual_moe": True, "num_attention_heads": 8,
                   "num_key_value_heads": 2, "num_hidden_layers": 4, "head_dim": 16,
                   "rms_norm_eps": 1e-5, "embedding_multiplier_scale": 11.3,
                   "output_multiplier_scale": 0.5, "rope_theta": 208533496}
    config.write_text(json.dumps(golden_like))
    out = subprocess.run([sys.executable, "-m", "grok1", "info", "--config", str(config)],
                         capture_output=True, text=True, check=True).stdout
    c = info_config(config)
    assert f"parameters, total:          {c.num_parameters:,}" in out.splitlines()
    assert c.num_parameters == 4 * (128 * 128 * 2 + 128 * 32 * 2 + 3 * 128 * 512
                                    + 8 * 3 * 128 * 256 + 128 * 8 + 4 * 128) + 2 * 1024 * 128 + 128


def test_lora_memory_plan_equals_the_measured_tensors_of_a_training_step():
    """At reduced size (the tiny preset: Grok-1's ratios, 2 layers), the plan's exact terms are
    the bytes a real step holds: the base as loaded, the adapters, their gradients and AdamW's
    moments, and one layer's dequantized matrices. (The activations and the whole peak are
    measured with the GPU's dtypes in tests/train/test_lora_memory.py.)"""
    import torch

    import grok1
    from grok1.info import LORA_TARGET_DIMS, lora_memory_plan
    from grok1.lora import TARGETS, LoraConfig, apply_lora
    from grok1.train.losses import cross_entropy

    assert LORA_TARGET_DIMS == TARGETS  # info.py is torch-free, so it keeps its own copy
    c = GrokConfig.preset("tiny")
    targets = ("attn.wq", "attn.wv", "moe.w_up", "moe.w_down")
    plan = lora_memory_plan(c, 4, targets, seq_len=16, micro_batch=2)
    model = grok1.random_weights(c, quantized=True, seed=0)
    assert plan.weight_bytes == sum(t.nbytes for t in model.state_dict().values())
    layer = model.layers[0]
    # bf16, but the down-projection's f32 (moe_ref takes its product in f32)
    dequantized = sum(lin.dense().nbytes for lin in (layer.attn.wq, layer.attn.wk,
                                                     layer.attn.wv, layer.attn.wo)) + sum(
        lin.dense(e).nbytes * (2 if lin is layer.moe.w_down else 1)
        for lin in (layer.moe.w_gate, layer.moe.w_up, layer.moe.w_down)
        for e in range(c.num_experts))
    assert plan.layer_bytes == dequantized
    apply_lora(model, LoraConfig(r=4, targets=targets))
    adapters = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(adapters)
    tokens = torch.randint(3, c.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    cross_entropy(model.train()(tokens[:, :-1]), tokens[:, 1:]).backward()
    opt.step()
    assert plan.adapter_params == sum(p.numel() for p in adapters)
    assert plan.adapter_bytes == sum(p.nbytes for p in adapters)
    assert plan.grad_bytes == sum(p.grad.nbytes for p in adapters)
    moments = [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert plan.optimizer_bytes == sum(m.nbytes for m in moments)
    assert plan.tokens == 32


def test_info_prints_the_lora_plan_for_grok1():
    out = subprocess.run([sys.executable, "-m", "grok1", "info", "--lora-rank", "16",
                          "--lora-targets", "all", "--gpu-gib", "141"],
                         capture_output=True, text=True, check=True).stdout
    assert "LoRA rank 16 on attn.wq, attn.wk, attn.wv, attn.wo, moe.w_gate, moe.w_up, " \
           "moe.w_down: 996,147,200 adapter parameters" in out
    # 64 layers x 16 x (attention 2x(6144+6144) + 2x(6144+1024)) + 8 experts x 3 x (6144+32768))
    assert 996_147_200 == 64 * 16 * (2 * (6144 + 6144) + 2 * (6144 + 1024)
                                     + 8 * 3 * (6144 + 32768))
