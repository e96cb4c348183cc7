"""Preset parameter counts, computed analytically (nothing allocated)."""

import pytest

from r1moe.model import PRESETS, ModelConfig, count_params, get_preset


def test_deepseek_v3_671b_counts_match_the_paper():
    c = count_params(get_preset("deepseek-v3-671b"))
    assert 670.5e9 < c["total_params"] < 671.5e9  # "671B total" (MTP excluded)
    assert 36.5e9 < c["active_params"] < 38.0e9  # "37B activated per token"
    assert 11e9 < c["mtp_params"] < 15e9  # the released checkpoint's 685B includes ~14B of MTP


@pytest.mark.parametrize("name,lo,hi", [
    ("deepseek-v3-16b-a3b", 15.5e9, 16.5e9), ("qwen2.5-1.5b", 1.5e9, 1.6e9), ("qwen2.5-7b", 7.5e9, 7.7e9),
    ("qwen2.5-14b", 14.6e9, 14.9e9), ("qwen2.5-32b", 32.5e9, 33.0e9), ("llama3.1-8b", 8.0e9, 8.1e9),
    ("llama3.3-70b", 70.5e9, 70.6e9), ("tiny-moe", 5e5, 2e7), ("tiny-dense", 1e5, 2e7),
])
def test_preset_totals(name, lo, hi):
    assert lo < count_params(PRESETS[name])["total_params"] < hi


def test_moonlight_shape_activates_about_3b():
    assert 2.5e9 < count_params(PRESETS["deepseek-v3-16b-a3b"])["active_params"] < 3.2e9


def test_dense_presets_activate_everything():
    for name in ("qwen2.5-7b", "llama3.1-8b", "tiny-dense"):
        c = count_params(PRESETS[name])
        assert c["total_params"] == c["active_params"]


def test_hf_config_round_trip_and_errors():
    cfg = get_preset("deepseek-v3-671b")
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    d = cfg.to_hf_dict()
    d["not_a_key"] = 1
    with pytest.raises(ValueError, match="not_a_key"):
        ModelConfig.from_hf_dict(d)
    d = get_preset("qwen2.5-7b").to_hf_dict()
    del d["hidden_size"]
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_hf_dict(d)
    with pytest.raises(ValueError, match="n_group"):
        get_preset("tiny-moe").replace(n_group=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("gpt-5")
