"""ParallelConfig validation and the ModelConfig -> megatron TransformerConfig translation (pure parts, CPU)."""

import pytest
import torch

from r1moe.model import get_preset
from r1moe.parallel import MegatronOptions, ParallelConfig, transformer_config_kwargs
from r1moe.parallel.mcore_config import gpt_model_kwargs


@pytest.mark.parametrize("pcfg,world,cfg_name,match", [
    (ParallelConfig(ep=3), 3, "tiny-moe", r"n_routed_experts=8 is not divisible by ep=3"),
    (ParallelConfig(pp=3), 3, "tiny-moe", r"num_hidden_layers=4 is not divisible by pp=3"),
    (ParallelConfig(pp=2, pp_layers=(1, 2)), 2, "tiny-moe", r"pp_layers=\[1, 2\] sums to 3.*num_hidden_layers=4"),
    (ParallelConfig(tp=8), 8, "tiny-moe", r"num_attention_heads=4 is not divisible by tp=8"),
    (ParallelConfig(tp=4), 4, "tiny-dense", r"num_key_value_heads=2 is not divisible by tp=4"),
    (ParallelConfig(tp=2, pp=2), 6, "tiny-moe", r"world_size=6 is not divisible by tp\*cp\*pp=2\*1\*2=4"),
    (ParallelConfig(tp=1, ep=4), 2, "tiny-moe", r"world_size=2 is not divisible by etp\*ep\*pp=1\*4\*1=4"),
    (ParallelConfig(ep=2), 2, "tiny-dense", r"expert parallelism needs an MoE model"),
    (ParallelConfig(cp=2, ep=2), 4, "tiny-moe", r"cp=2 with ep=2"),
])
def test_bad_layouts_name_the_numbers(pcfg, world, cfg_name, match):
    with pytest.raises(ValueError, match=match):
        pcfg.validate(get_preset(cfg_name), world)


@pytest.mark.parametrize("pcfg,world", [
    (ParallelConfig(), 1),
    (ParallelConfig(tp=2, ep=2, etp=1), 2),  # TP2 and EP2 folded onto the same two GPUs
    (ParallelConfig(pp=2), 2),
    (ParallelConfig(tp=2, pp=2, ep=4, etp=1), 8),
    (ParallelConfig(pp=2, pp_layers=(1, 3)), 4),
])
def test_good_layouts(pcfg, world):
    pcfg.validate(get_preset("tiny-moe"), world)
    assert pcfg.dp(world) * pcfg.tp * pcfg.pp == world
    assert pcfg.edp(world) * pcfg.expert_tp * pcfg.ep * pcfg.pp == world


def test_field_errors():
    with pytest.raises(ValueError, match="tp=0"):
        ParallelConfig(tp=0)
    with pytest.raises(ValueError, match="pp_layers=.*2 entries; pp=3"):
        ParallelConfig(pp=3, pp_layers=(2, 2))
    with pytest.raises(ValueError, match="sequence length 7 is not divisible by 2"):
        ParallelConfig(tp=2).check_sequence(7)


def test_v3_config_sets_every_trap_field_from_the_model():
    cls, kw = transformer_config_kwargs(get_preset("deepseek-v3-671b"), ParallelConfig(tp=8, pp=4, ep=8))
    assert cls == "MLATransformerConfig"
    # MLATransformerConfig defaults would be q_lora_rank=512, mscale_all_dim=0.0
    assert kw["q_lora_rank"] == 1536 and kw["kv_lora_rank"] == 512
    assert (kw["qk_head_dim"], kw["qk_pos_emb_head_dim"], kw["v_head_dim"]) == (128, 64, 128)
    assert kw["rope_type"] == "yarn" and kw["rotary_scaling_factor"] == 40.0
    assert kw["mscale"] == 1.0 and kw["mscale_all_dim"] == 1.0 and kw["original_max_position_embeddings"] == 4096
    assert kw["moe_router_score_function"] == "sigmoid" and kw["moe_router_enable_expert_bias"]
    assert kw["moe_router_topk"] == 8 and kw["moe_router_topk_scaling_factor"] == 2.5
    assert (kw["moe_router_num_groups"], kw["moe_router_group_topk"]) == (8, 4)
    assert kw["moe_layer_freq"] == [0, 0, 0] + [1] * 58
    assert kw["moe_shared_expert_intermediate_size"] == 2048 and kw["moe_ffn_hidden_size"] == 2048
    assert kw["mtp_num_layers"] == 1 and kw["layernorm_epsilon"] == 1e-6
    assert kw["sequence_parallel"] and kw["expert_tensor_parallel_size"] == 8


def test_tiny_moe_plain_rope_and_ungrouped_routing():
    _, kw = transformer_config_kwargs(get_preset("tiny-moe"), ParallelConfig())
    assert kw["rotary_scaling_factor"] == 1.0 and kw["mscale_all_dim"] == 0.0  # exact RoPE, scale d^-0.5
    assert kw["moe_router_num_groups"] is None  # topk_group == n_group: every group selectable
    assert kw["moe_router_load_balancing_type"] == "none" and not kw["sequence_parallel"]


def test_unsupported_architectures_are_refused():
    with pytest.raises(ValueError, match="top-1 experts, DeepSeek-V3 by its top-2"):
        transformer_config_kwargs(get_preset("tiny-moe").replace(n_group=4, topk_group=2), ParallelConfig())
    with pytest.raises(ValueError, match="norm_topk_prob=False"):
        transformer_config_kwargs(get_preset("tiny-moe").replace(norm_topk_prob=False), ParallelConfig())
    with pytest.raises(ValueError, match="fp8='e5m2'"):
        transformer_config_kwargs(get_preset("tiny-moe"), ParallelConfig(), MegatronOptions(fp8="e5m2"))


def test_fp8_recompute_and_dense_students():
    _, kw = transformer_config_kwargs(get_preset("tiny-moe"), ParallelConfig(),
                                      MegatronOptions(fp8="blockwise", recompute="full"))
    assert kw["fp8"] == "e4m3" and kw["fp8_recipe"] == "blockwise"
    assert kw["recompute_granularity"] == "full" and kw["recompute_num_layers"] == 1
    cls, kw = transformer_config_kwargs(get_preset("qwen2.5-7b"), ParallelConfig(tp=4), dtype=torch.bfloat16)
    assert cls == "TransformerConfig" and kw["add_qkv_bias"] and kw["num_query_groups"] == 4
    gk = gpt_model_kwargs(get_preset("llama3.1-8b"), ParallelConfig())
    assert gk["rope_scaling"] and gk["rope_scaling_factor"] == 8.0 and gk["rotary_base"] == 500000.0
    assert gpt_model_kwargs(get_preset("tiny-moe").replace(vocab_size=129), ParallelConfig(tp=2))["vocab_size"] == 130


def test_pipeline_layout_from_explicit_split():
    _, kw = transformer_config_kwargs(get_preset("tiny-moe"), ParallelConfig(pp=2, pp_layers=(1, 3)))
    assert kw["pipeline_model_parallel_layout"] == [["embedding", "decoder"],
                                                    ["decoder"] * 3 + ["mtp", "loss"]]


def test_megatron_accepts_the_translated_config():
    pytest.importorskip("megatron.core", reason="needs megatron-core (GPU image; CPU CI has none)")
    pytest.importorskip("transformer_engine", reason="needs Transformer Engine (MoE/MLA config checks)")
    from r1moe.parallel.mcore_config import build_transformer_config

    tcfg = build_transformer_config(get_preset("deepseek-v3-671b"), ParallelConfig(tp=8, ep=8))
    assert tcfg.q_lora_rank == 1536 and tcfg.mscale_all_dim == 1.0
