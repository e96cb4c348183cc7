"""The HF <-> megatron name table and its sharding, on CPU: names cover the reference model exactly, the GQA
fused-qkv layout is megatron's, HF -> mcore shard files -> HF is bit-exact for every layout, FP8 de-quantization."""

import json

import pytest
import torch

from r1moe.model import build_model, get_preset
from r1moe.model.hf_io import HFReader, ShardWriter, compute_fp8_dequant
from r1moe.parallel import ParallelConfig, hf_names
from r1moe.parallel.mapping import Entry, shard, stage_entries, unshard
from r1moe.parallel.mcore_files import convert_mcore_files_to_hf, write_mcore_files


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dense", "deepseek-v3-671b", "deepseek-v3-16b-a3b",
                                  "qwen2.5-1.5b", "llama3.1-8b"])
def test_table_covers_the_reference_state_dict_exactly(name):
    cfg = get_preset(name)
    ref = build_model(cfg, device="meta").state_dict()
    names = hf_names(cfg)
    assert len(names) == len(set(names))
    assert set(names) == set(ref)


def test_stage_entries_partition_the_model():
    """Across stages and expert ranks every HF tensor is owned exactly once (copies flagged)."""
    cfg = get_preset("tiny-moe")
    pcfg = ParallelConfig(pp=2, ep=4, pp_layers=(1, 3))
    owned = []
    for pp in range(2):
        for ep in range(4):
            for e in stage_entries(cfg, pcfg, pp, ep):
                if not e.copy and (e.expert or ep == 0):
                    owned += list(e.hf)
    copies = set(hf_names(cfg)) - set(owned)
    assert len(owned) == len(set(owned))
    assert copies == {"model.layers.4.embed_tokens.weight", "model.layers.4.shared_head.head.weight"}
    # the MTP stage (last) carries its own embedding copy; layer 0 (dense) is the only layer of stage 0
    last = {e.mcore: e for e in stage_entries(cfg, pcfg, 1, 0)}
    assert last["embedding.word_embeddings.weight"].copy
    assert "mtp.layers.0.mtp_model_layer.mlp.experts.linear_fc1.weight1" in last
    assert "decoder.layers.2.mlp.router.expert_bias" in last  # HF layer 3 is local layer 2 on stage 1
    first = {e.mcore for e in stage_entries(cfg, pcfg, 0, 0)}
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in first  # dense layer: norm fused into fc1


def test_gqa_fused_qkv_matches_megatrons_split():
    """Emulate SelfAttention.get_query_key_value_tensors: view [ng, (np/ng + 2) hn] per TP rank, split q|k|v."""
    cfg = get_preset("tiny-dense")  # 4 heads, 2 kv heads, head dim 32
    ng, np_, hn, H = 2, 4, 32, cfg.hidden_size
    q, k, v = torch.randn(np_ * hn, H), torch.randn(ng * hn, H), torch.randn(ng * hn, H)
    entry = Entry("self_attention.linear_qkv.weight", ("q", "k", "v"), "col", "qkv", False)
    for tp in (1, 2):
        for rank in range(tp):
            w = shard(entry, [q, k, v], rank, tp, cfg)
            x = torch.randn(3, H)
            mixed = (x @ w.t()).view(3, ng // tp, (np_ // ng + 2) * hn)
            q_, k_, v_ = mixed.split([np_ // ng * hn, hn, hn], dim=-1)
            heads = slice(rank * np_ // tp, (rank + 1) * np_ // tp)
            kv = slice(rank * ng // tp, (rank + 1) * ng // tp)
            torch.testing.assert_close(q_.reshape(3, -1, hn), (x @ q.t()).view(3, np_, hn)[:, heads])
            torch.testing.assert_close(k_.reshape(3, -1, hn), (x @ k.t()).view(3, ng, hn)[:, kv])
            torch.testing.assert_close(v_.reshape(3, -1, hn), (x @ v.t()).view(3, ng, hn)[:, kv])


def test_swiglu_fc1_halves_are_gate_then_up():
    """TEGroupedMLP / MLP chunk fc1's output into (act input, linear input): [gate; up] per TP shard."""
    cfg = get_preset("tiny-moe")
    gate, up = torch.randn(96, 128), torch.randn(96, 128)
    entry = Entry("mlp.linear_fc1.weight", ("g", "u"), "col", "cat", False)
    x = torch.randn(5, 128)
    for rank in range(2):
        a, b = torch.chunk(x @ shard(entry, [gate, up], rank, 2, cfg).t(), 2, dim=-1)
        torch.testing.assert_close(a, (x @ gate.t())[:, rank * 48:(rank + 1) * 48])
        torch.testing.assert_close(b, (x @ up.t())[:, rank * 48:(rank + 1) * 48])


def test_vocab_padding_round_trip():
    cfg = get_preset("tiny-moe").replace(vocab_size=129)
    emb = torch.randn(129, 128)
    entry = Entry("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", "one", False)
    shards = [shard(entry, [emb], r, 2, cfg) for r in range(2)]
    assert shards[0].shape == (65, 128) and torch.all(shards[1][-1] == 0)
    assert torch.equal(unshard(entry, shards, cfg)["model.embed_tokens.weight"], emb)


def _save_hf(model, path):
    w = ShardWriter(path, max_shard_bytes=200_000)  # several shards even for tiny models
    for n, t in model.state_dict().items():
        w.add(n, t)
    w.close()
    (path / "config.json").write_text(json.dumps(model.cfg.to_hf_dict()))


@pytest.mark.parametrize("name,pcfg", [
    ("tiny-moe", ParallelConfig()),
    ("tiny-moe", ParallelConfig(tp=2, ep=2, etp=1)),
    ("tiny-moe", ParallelConfig(tp=2, pp=2, ep=4, etp=2)),
    ("tiny-moe", ParallelConfig(pp=2, pp_layers=(1, 3), ep=2)),
    ("tiny-dense", ParallelConfig(tp=2, pp=2)),
    ("tiny-dense", ParallelConfig(pp=4)),  # tied embeddings with pp > 1: the head copy on the last stage
])
def test_hf_mcore_hf_round_trip_is_bit_exact(tmp_path, name, pcfg):
    cfg = get_preset(name)
    model = build_model(cfg, dtype=torch.bfloat16, seed=0)
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_()  # non-zero, so a dropped bias fails
    _save_hf(model, tmp_path / "hf")
    files = write_mcore_files(cfg, pcfg, HFReader(tmp_path / "hf").__getitem__, tmp_path / "mcore")
    n_expert_files = pcfg.pp * pcfg.ep * pcfg.expert_tp if cfg.is_moe else 0
    assert len(files) == pcfg.pp * pcfg.tp + n_expert_files
    convert_mcore_files_to_hf(tmp_path / "mcore", tmp_path / "back", max_shard_bytes=150_000)
    back = HFReader(tmp_path / "back")
    ref = model.state_dict()
    assert set(back.names()) == set(ref)
    for n, t in ref.items():
        got = back[n]
        assert got.dtype == t.dtype and torch.equal(got, t), n


def test_tools_cli_round_trip(tmp_path):
    import importlib.util
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2]
    mods = {}
    for tool in ("convert_hf_to_mcore", "convert_mcore_to_hf"):
        spec = importlib.util.spec_from_file_location(tool, root / "tools" / f"{tool}.py")
        mods[tool] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods[tool])
    model = build_model(get_preset("tiny-moe"), dtype=torch.bfloat16, seed=1)
    _save_hf(model, tmp_path / "hf")
    assert mods["convert_hf_to_mcore"].main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m"),
                                             "--tp", "2", "--ep", "2", "--etp", "1"]) == 0
    assert mods["convert_mcore_to_hf"].main(["--mcore", str(tmp_path / "m"), "--out", str(tmp_path / "o")]) == 0
    back = HFReader(tmp_path / "o")
    for n, t in model.state_dict().items():
        assert torch.equal(back[n], t), n


def test_fp8_blockwise_dequantization(tmp_path):
    """DeepSeek-V3's checkpoint: float8_e4m3fn weight, float32 weight_scale_inv per 128x128 block (edges partial)."""
    w = torch.randn(300, 200) * 3
    scale = torch.rand(3, 2) + 0.5
    s_full = scale.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    w_fp8 = (w / s_full).to(torch.float8_e4m3fn)
    expect = (w_fp8.float() * s_full).to(torch.bfloat16)
    assert torch.equal(compute_fp8_dequant(w_fp8, scale).to(torch.bfloat16), expect)
    assert (compute_fp8_dequant(w_fp8, scale).to(torch.bfloat16).float() - w).abs().max() < 0.1 * w.abs().max()
    from safetensors.torch import save_file

    save_file({"a.weight": w_fp8, "a.weight_scale_inv": scale, "b.weight": torch.ones(2)},
              str(tmp_path / "model.safetensors"))
    r = HFReader(tmp_path)
    assert torch.equal(r["a.weight"], expect) and r["b.weight"].dtype == torch.bfloat16
