import json

import pytest

from grok1.config import ConfigError, GrokConfig


def test_grok1_preset_has_run_py_values():
    c = GrokConfig.preset("grok-1")
    assert (c.vocab_size, c.emb_size, c.num_layers, c.num_q_heads, c.num_kv_heads) == (
        131072, 6144, 64, 48, 8)
    assert c.ffn_size == 32768 and c.q_per_kv == 6 and c.sequence_len == 8192


def test_golden_config_json_loads(golden_dir):
    c = GrokConfig.from_json(golden_dir / "config.json")
    assert (c.emb_size, c.num_layers, c.ffn_size, c.vocab_size) == (64, 11, 344, 1024)


def test_unknown_field_is_named(tmp_path):
    fields = GrokConfig.preset("tiny").to_dict() | {"num_heads": 4}
    (tmp_path / "c.json").write_text(json.dumps(fields))
    with pytest.raises(ConfigError, match="unknown field.*num_heads"):
        GrokConfig.from_json(tmp_path / "c.json")


def test_missing_field_is_named(tmp_path):
    fields = GrokConfig.preset("tiny").to_dict()
    del fields["key_size"]
    (tmp_path / "c.json").write_text(json.dumps(fields))
    with pytest.raises(ConfigError, match="missing field.*key_size"):
        GrokConfig.from_json(tmp_path / "c.json")


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match="num_q_heads=7 must be a multiple of num_kv_heads=2"):
        GrokConfig.preset("tiny").replace(num_q_heads=7, num_kv_heads=2)
    with pytest.raises(ConfigError, match="emb_size=0"):
        GrokConfig.preset("tiny").replace(emb_size=0)


def test_not_json_and_missing_file(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        GrokConfig.from_json(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="not found"):
        GrokConfig.from_json(tmp_path / "none.json")


def test_resolve_reads_a_preset_a_json_file_or_a_config_then_overrides(tmp_path):
    tiny = GrokConfig.preset("tiny")
    tiny.save_json(tmp_path / "c.json")
    assert GrokConfig.resolve("tiny") is tiny
    assert GrokConfig.resolve(tmp_path / "c.json") == tiny
    assert GrokConfig.resolve(str(tmp_path / "c.json")) == tiny
    assert GrokConfig.resolve(tiny, ["num_layers=4", "widening_factor=2.5"]) == tiny.replace(
        num_layers=4, widening_factor=2.5)


def test_resolve_names_a_bad_preset_override_or_value(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'grok-3'; known: debug, grok-1, tiny"):
        GrokConfig.resolve("grok-3")
    with pytest.raises(ConfigError, match="override 'layers=4': expected field=value"):
        GrokConfig.resolve("tiny", ["layers=4"])
    with pytest.raises(ConfigError, match="override 'num_layers=four': 'four' is not a number"):
        GrokConfig.resolve("tiny", ["num_layers=four"])
    with pytest.raises(ConfigError, match="tiny with num_kv_heads=4: num_q_heads=6 must be a "
                                          "multiple of num_kv_heads=4"):
        GrokConfig.resolve("tiny", ["num_kv_heads=4"])
    with pytest.raises(ConfigError, match="none.json: config file not found"):
        GrokConfig.resolve(tmp_path / "none.json")
