"""The parts of the SGLang engine that need no GPU: what a failed SGLang process does to the call in progress; the
weights SGLang is handed (FP8 serving's V3-format quantization, bucket alignment, the FP8 engine directory)."""

import pytest


def test_a_failed_sglang_process_ends_the_call_with_an_error_not_a_kill():
    """SGLang's failed child sends SIGQUIT; our handler stops SGLang's processes and cancels the call's tasks: the
    engine call raises SGLangFailure (a traceback, an exit code), and later calls refuse at once."""
    import asyncio

    from r1moe.rollout.sglang_engine import SGLangEngine, SGLangFailure

    eng = SGLangEngine.__new__(SGLangEngine)  # the call wrapper only: no SGLang on this machine
    eng.failed = False

    def dies():
        eng.failed = True  # what the SIGQUIT handler sets before cancelling the tasks
        raise asyncio.CancelledError

    with pytest.raises(SGLangFailure, match="failed during dies"):
        eng._call(dies)
    with pytest.raises(SGLangFailure, match="failed earlier"):
        eng._call(lambda: 1)
    ok = SGLangEngine.__new__(SGLangEngine)
    ok.failed = False
    assert ok._call(lambda x: x + 1, 1) == 2
    with pytest.raises(ValueError):  # other errors pass through unchanged
        ok._call(lambda: int("x"))


def test_fp8_weights_are_v3s_release_format_and_dequantize_back(tmp_path):
    """rollout.sglang.quantization=fp8: every projection of the decoder layers becomes float8_e4m3fn + float32
    128x128 block scales (what DeepSeek-V3's FP8 checkpoint holds, and what our own loader reads back); everything
    else keeps its dtype (fp32 matrices in the engine's). Written as a checkpoint, HFReader de-quantizes each
    weight to within e4m3's rounding (half a step at the top of the range: amax / 28, amax of the tensor here)."""
    import json

    import torch
    from safetensors.torch import save_file

    from r1moe.model import build_model, get_preset
    from r1moe.model.hf_io import SCALE_SUFFIX, HFReader, fp8_quantized
    from r1moe.rollout.sglang_engine import FP8_QUANTIZATION_CONFIG, engine_tensors

    cfg = get_preset("tiny-moe")
    sd = build_model(cfg, seed=0).state_dict()
    out = dict(engine_tensors(sd.items(), "bfloat16", cfg.num_hidden_layers))
    quantized = sorted(n for n in sd if fp8_quantized(n, cfg.num_hidden_layers))
    projections = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
                   "down_proj")
    assert quantized == sorted(n for n in sd if n.endswith(".weight") and n.split(".")[-2] in projections
                               and int(n.split(".")[2]) < cfg.num_hidden_layers)
    assert any(".experts." in n for n in quantized) and any("shared_experts" in n for n in quantized)
    assert not any(fp8_quantized(n, cfg.num_hidden_layers) for n in sd if n.split(".")[-2] in ("gate", "embed_tokens")
                   or "norm" in n or n.startswith("lm_head"))
    assert set(out) == set(sd) | {n + SCALE_SUFFIX for n in quantized}
    for name, t in sd.items():
        if name in quantized:
            assert out[name].dtype == torch.float8_e4m3fn and out[name].shape == t.shape
            assert out[name + SCALE_SUFFIX].dtype == torch.float32
            assert out[name + SCALE_SUFFIX].shape == (-(-t.shape[0] // 128), -(-t.shape[1] // 128))
        elif t.dtype == torch.float32 and t.dim() >= 2:
            assert out[name].dtype == torch.bfloat16
        else:
            assert out[name].dtype == t.dtype
    save_file({k: v.contiguous() for k, v in out.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": FP8_QUANTIZATION_CONFIG}))
    reader = HFReader(tmp_path, dtype=torch.float32)
    for name in quantized:
        w, back = sd[name], reader[name]
        assert (back - w).abs().max() <= w.abs().max() / 28 + 1e-12, name


def test_quantization_edges():
    """Partial blocks at the edges get their own scale; an all-zero block has scale 1 and stays zero; the largest
    magnitude of a block maps to e4m3's largest finite value (448) exactly."""
    import torch

    from r1moe.model.hf_io import compute_fp8_dequant, compute_fp8_quant

    w = torch.zeros(130, 260)
    w[:128, :128] = torch.linspace(-3, 3, 128 * 128).view(128, 128)
    w[128:, 256:] = 7.0
    q, s = compute_fp8_quant(w)
    assert s.shape == (2, 3) and q.shape == w.shape
    assert s[0, 1].item() == 1.0 and (q[:128, 128:256].float() == 0).all()
    assert s[0, 0].item() == pytest.approx(3 / 448, rel=1e-6) and s[1, 2].item() == pytest.approx(7 / 448, rel=1e-6)
    assert q[:128, :128].float().abs().max().item() == 448.0
    torch.testing.assert_close(compute_fp8_dequant(q, s)[128:, 256:], w[128:, 256:])
    with pytest.raises(ValueError, match="2-D"):
        compute_fp8_quant(torch.zeros(4))


def test_buckets_keep_every_tensor_aligned_for_sglangs_views():
    """SGLang rebuilds a bucket's tensors as views of its flat bytes: each offset must be a multiple of the
    tensor's element size, whatever order the tensors came in."""
    import torch

    from r1moe.rollout.sglang_engine import aligned_order

    bucket = [("a", torch.zeros(3, dtype=torch.float8_e4m3fn)), ("b", torch.zeros(5, dtype=torch.bfloat16)),
              ("c", torch.zeros(2, dtype=torch.float32)), ("d", torch.zeros(7, dtype=torch.float8_e4m3fn)),
              ("e", torch.zeros(1, dtype=torch.float32))]
    offset = 0
    for _, t in aligned_order(bucket):
        assert offset % t.element_size() == 0
        offset += t.numel() * t.element_size()
    assert sorted(n for n, _ in aligned_order(bucket)) == list("abcde")


def test_fp8_engine_dir_and_setting(tmp_path):
    import json

    from r1moe.config import load_config
    from r1moe.model import ModelConfig, get_preset
    from r1moe.rollout.sglang_engine import write_engine_dir

    cfg = get_preset("tiny-moe")
    d = write_engine_dir(cfg, tmp_path / "fp8", quantization="fp8")
    config = json.loads((d / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128]}
    assert ModelConfig.from_json(d / "config.json").to_hf_dict() == cfg.to_hf_dict()  # our loader reads it as is
    plain = json.loads((write_engine_dir(cfg, tmp_path / "bf16") / "config.json").read_text())
    assert "quantization_config" not in plain
    with pytest.raises(ValueError, match="quantization='int8'"):
        write_engine_dir(cfg, tmp_path / "x", quantization="int8")
    over = ["rollout.engine=sglang", "rollout.sglang.quantization=fp8"]
    assert load_config(None, over).rollout.sglang.quantization == "fp8"
    with pytest.raises(ValueError, match="quantization"):
        load_config(None, ["rollout.engine=sglang", "rollout.sglang.quantization=int8"])
