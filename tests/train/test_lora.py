"""LoRA as a module swap (grok1/lora.py) and adapters in PEFT's format (grok1/checkpoint/peft.py):
the base stays int8, merged equals unmerged, PEFT reads what grok1 writes and computes the same
delta from it, and bad adapter folders are refused naming the file and the field."""

import json

import pytest
import torch
from torch import nn

import grok1
from grok1.checkpoint.names import CheckpointError
from grok1.checkpoint.peft import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_names,
    fill_adapter,
    hf_module,
    read_adapter,
    save_adapter,
)
from grok1.checkpoint.native import save_native
from grok1.config import ConfigError, GrokConfig
from grok1.lora import (
    EXPERT_TARGETS,
    TARGETS,
    LoraConfig,
    LoraLinear,
    apply_lora,
    lora_modules,
    merge_lora,
)
from grok1.model import Grok1

ALL = LoraConfig(r=4, alpha=8.0, targets=TARGETS)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def lora_model(config: GrokConfig, lora: LoraConfig = ALL, seed: int = 1) -> Grok1:
    """A random int8 model with adapters whose B is random too (a fresh adapter's B is zero)."""
    model = grok1.random_weights(config, quantized=True, seed=seed)
    apply_lora(model, lora, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
    return model


def test_fresh_adapters_leave_the_output_and_the_int8_base_unchanged(tiny_config):
    model = grok1.random_weights(tiny_config, quantized=True, seed=3)
    tokens = torch.randint(3, tiny_config.vocab_size, (2, 9),
                           generator=torch.Generator().manual_seed(0))
    before = model(tokens)
    int8 = {k: v.clone() for k, v in model.state_dict().items()}
    held = model.layers[0].attn.wq.weight, model.layers[1].moe.w_gate.scales
    apply_lora(model, ALL)
    assert torch.equal(model(tokens), before)  # B = 0: PEFT's start
    wq = model.layers[0].attn.wq
    assert isinstance(wq, LoraLinear) and wq.weight.dtype == torch.int8
    # the same tensors, not copies: the base costs no memory twice
    assert wq.weight is held[0] and model.layers[1].moe.w_gate.scales is held[1]
    w_down = model.layers[1].moe.w_down
    assert w_down.lora_A.shape == (1, tiny_config.num_experts, 4, tiny_config.ffn_size)
    assert w_down.lora_B.shape == (1, tiny_config.num_experts, tiny_config.emb_size, 4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    for k, v in int8.items():  # the base tensors keep their names, dtypes and values
        assert torch.equal(model.state_dict()[k], v), k


def test_delta_is_scale_times_B_A_x_on_attention_and_on_each_expert(tiny_config):
    model = lora_model(tiny_config)
    x = torch.randn(7, tiny_config.emb_size, generator=torch.Generator().manual_seed(2))
    wq = model.layers[0].attn.wq
    A, B = wq.lora_A[0].double(), wq.lora_B[0].double()
    want = x.double() @ A.T @ B.T * ALL.scale
    torch.testing.assert_close(wq.delta(x, None, None).double(), want, rtol=1e-5, atol=1e-6)
    w_up = model.layers[1].moe.w_up
    for e in (0, 5):
        A, B = w_up.lora_A[0, e].double(), w_up.lora_B[0, e].double()
        torch.testing.assert_close(w_up.delta(x, e, None).double(),
                                   x.double() @ A.T @ B.T * ALL.scale, rtol=1e-5, atol=1e-6)


def test_merged_and_unmerged_adapters_give_the_same_logits(tiny_config):
    """In float32 compute (no bf16 rounding of activations) the one difference is the merged
    matrices' rounding to bf16(W + scale (B A)^T), 2^-9 relative per weight, so the logits
    agree to well under 1e-2 while the adapter itself moves them by O(1). (In bf16 compute this
    random model turns bf16 noise into a few % through near-tied top-2 routing: README,
    "Faithfulness"; the float32 check is the one that tests the merge.)"""
    model = lora_model(tiny_config)
    model.compute_dtype = torch.float32  # the merged model inherits it
    tokens = torch.randint(3, tiny_config.vocab_size, (3, 11),
                           generator=torch.Generator().manual_seed(4))
    unmerged = model(tokens)
    merged_model = merge_lora(model)
    assert merged_model.weights is None  # dense bf16 matrices
    assert not any(True for _ in lora_modules(merged_model))
    merged = merged_model(tokens)
    base_model = grok1.random_weights(tiny_config, quantized=True, seed=1)
    base_model.compute_dtype = torch.float32
    assert rel(unmerged, base_model(tokens)) > 0.3  # the adapter matters
    assert rel(merged, unmerged) < 0.01
    assert torch.equal(merged.argmax(-1), unmerged.argmax(-1))


def test_merge_matches_unmerged_per_matrix_in_float32(tiny_config):
    """Matrix by matrix, in f32 and before the bf16 rounding of the merged weight, merging is
    exact: x @ merged == x @ W + delta(x) up to f32 sums."""
    model = lora_model(tiny_config)
    x = torch.randn(6, tiny_config.emb_size, generator=torch.Generator().manual_seed(5))
    for name, m in lora_modules(model):
        for e in range(tiny_config.num_experts) if m.weight.dim() == 3 else [None]:
            d_in = m.lora_A.shape[-1]
            xi = x if d_in == x.shape[1] else torch.randn(6, d_in)
            want = xi @ m.dense(e).float() + m.delta(xi, e, None)
            torch.testing.assert_close(xi @ m.merged(0, e), want, rtol=1e-5, atol=1e-5,
                                       msg=name)


def test_merged_model_saves_as_a_grok1_folder_that_loads_to_the_same_logits(tiny_config,
                                                                            tmp_path):
    model = lora_model(tiny_config)
    merged = merge_lora(model)
    save_native(merged, tmp_path / "merged")
    loaded = grok1.load(tmp_path / "merged")
    tokens = torch.randint(3, tiny_config.vocab_size, (2, 8),
                           generator=torch.Generator().manual_seed(6))
    assert torch.equal(loaded(tokens), merged(tokens))


def test_lora_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="r=0"):
        LoraConfig(r=0)
    with pytest.raises(ConfigError, match="dropout=1.5"):
        LoraConfig(dropout=1.5)
    with pytest.raises(ConfigError, match="attn.wz"):
        LoraConfig(targets=("attn.wz",))


# ---- PEFT's format -----------------------------------------------------------------------

@pytest.fixture
def saved(tiny_config, tmp_path):
    model = lora_model(tiny_config)
    out = save_adapter(model, ALL, tmp_path / "adapter", base_model_name_or_path=str(tmp_path))
    return model, out


def test_adapter_tensor_names_follow_peft_scheme_on_the_hpcai_layout(tiny_config, saved):
    from safetensors import safe_open

    _, out = saved
    with safe_open(out / ADAPTER_WEIGHTS, framework="pt") as f:
        keys = set(f.keys())
        a = f.get_tensor("base_model.model.model.layers.1.attn.o_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.0.moe_block.experts.7.linear_1."
                         "lora_B.weight")
    E, L = tiny_config.num_experts, tiny_config.num_layers
    assert len(keys) == 2 * L * (4 + 3 * E)
    assert a.shape == (4, tiny_config.num_q_heads * tiny_config.key_size)  # [r, in]
    assert b.shape == (tiny_config.emb_size, 4)  # [out, r]
    assert "base_model.model.model.layers.0.attn.q_proj.lora_B.weight" in keys
    assert "base_model.model.model.layers.1.moe_block.experts.0.linear_v.lora_A.weight" in keys


def test_peft_reads_the_adapter_config(saved, monkeypatch):
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, out = saved
    config = peft.PeftConfig.from_pretrained(str(out))
    assert config.peft_type == peft.PeftType.LORA
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8.0, 0.0)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "linear",
                                          "linear_v", "linear_1"}


class _HpcaiSkeleton(nn.Module):
    """The hpcai-tech port's module tree, torch Linears [out, in] at its paths (what PEFT wraps)."""

    def prepare_inputs_for_generation(self, *args, **kwargs):  # PEFT's CAUSAL_LM asks for it
        return {}

    def put(self, path: str, module: nn.Module) -> None:
        *parents, leaf = path.split(".")
        node = self
        for p in parents:
            if not hasattr(node, p):
                node.add_module(p, nn.Module())
            node = getattr(node, p)
        node.add_module(leaf, module)


def test_peft_loads_the_adapter_onto_the_hf_layout_with_the_same_names_and_delta(
        tiny_config, saved, monkeypatch):
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, out = saved
    skeleton = _HpcaiSkeleton()
    for i, layer in enumerate(model.layers):
        for t in TARGETS:
            m = layer.get_submodule(t)
            for e in range(tiny_config.num_experts) if t in EXPERT_TARGETS else [None]:
                w = m.dense(e).float()  # [in, out]
                lin = nn.Linear(*w.shape, bias=False)
                lin.weight.data.copy_(w.T)
                skeleton.put(hf_module(t, i, e), lin)
    peft_model = peft.PeftModel.from_pretrained(skeleton, str(out))
    names = set(peft.get_peft_model_state_dict(peft_model))
    assert names == set(adapter_names(tiny_config, TARGETS))
    x = torch.randn(5, tiny_config.emb_size, generator=torch.Generator().manual_seed(7))
    for t, layer, e in (("attn.wv", 1, None), ("moe.w_gate", 0, 3)):
        ours = model.layers[layer].get_submodule(t)
        theirs = peft_model.base_model.model.get_submodule(hf_module(t, layer, e))
        want = x @ ours.dense(e).float() + ours.delta(x, e, None)
        torch.testing.assert_close(theirs(x), want, rtol=1e-5, atol=1e-5)
        assert rel(ours.delta(x, e, None), want) > 0.01  # the delta is in what is compared


def test_read_adapter_round_trips_into_a_fresh_model(tiny_config, saved):
    model, out = saved
    config, tensors = read_adapter(out, tiny_config)
    assert config == ALL
    fresh = grok1.random_weights(tiny_config, quantized=True, seed=1)
    apply_lora(fresh, config, seed=99)
    fill_adapter(fresh, tensors, config)
    for (name, a), (_, b) in zip(lora_modules(model), lora_modules(fresh)):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B), name


def test_bad_adapter_folders_are_refused_naming_file_and_field(tiny_config, saved):
    _, out = saved
    cfg_file = out / ADAPTER_CONFIG
    fields = json.loads(cfg_file.read_text())
    for field, value, match in (("use_dora", True, "use_dora=True"),
                                ("target_modules", ["gate_proj"], "gate_proj"),
                                ("peft_type", "IA3", "IA3"), ("r", -1, "r=-1")):
        cfg_file.write_text(json.dumps({**fields, field: value}))
        with pytest.raises(ConfigError, match=f"{ADAPTER_CONFIG}.*{match}"):
            read_adapter(out, tiny_config)
    cfg_file.write_text(json.dumps({**fields, "r": 8}))  # tensors of rank 4
    with pytest.raises(CheckpointError, match=f"{ADAPTER_WEIGHTS}.*r=8"):
        read_adapter(out, tiny_config)
    cfg_file.write_text(json.dumps(fields))
    with pytest.raises(CheckpointError, match="missing: .*layers.2"):
        read_adapter(out, tiny_config.replace(num_layers=3))


def test_activation_checkpointing_gives_the_adapters_the_same_gradients(tiny_config):
    from grok1.train.fsdp import apply_activation_checkpointing
    from grok1.train.losses import cross_entropy

    tokens = torch.randint(3, tiny_config.vocab_size, (2, 13),
                           generator=torch.Generator().manual_seed(8))
    grads = []
    for checkpointed in (False, True):
        model = lora_model(tiny_config)
        if checkpointed:
            apply_activation_checkpointing(model)
        cross_entropy(model.train()(tokens[:, :-1]), tokens[:, 1:]).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 2 * len(TARGETS)
    for n in grads[0]:
        assert grads[0][n].abs().sum() > 0, n
        assert torch.equal(grads[0][n], grads[1][n]), n


def test_training_steps_move_only_the_adapters_over_an_unchanged_int8_base(tiny_config):
    from grok1.train.losses import cross_entropy

    model = lora_model(tiny_config).train()
    base = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(3, tiny_config.vocab_size, (2, 17),
                           generator=torch.Generator().manual_seed(9))
    losses = []
    for _ in range(4):  # one fixed batch: the adapters alone can fit it
        loss = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    for k, v in model.state_dict().items():
        if ".lora_" not in k:
            assert v.dtype == base[k].dtype and torch.equal(v, base[k]), k
    assert model.layers[0].moe.w_gate.weight.dtype == torch.int8
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, adapters[n]), n
