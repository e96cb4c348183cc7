"""The parts of the SGLang engine that need no GPU: what a failed SGLang process does to the call in progress; the
weights SGLang is handed (FP8 serving's V3-format quantization, bucket alignment, the FP8 engine directory)."""

import pytest


def test_a_failed_sglang_process_ends_the_call_with_an_error_not_a_kill():
    """SGLang's failed child sends SIGQUIT; our handler stops SGLang's processes and cancels the call's tasks: the
    engine call raises SGLangFailure (a traceback, an exit code), and later calls refuse at once."""
    import asyncio

    from r1moe.rollout.sglang_engine import SGLangEngine, SGLangFailure

    eng = SGLangEngine.__new__(SGLangEngine)  # the call wrapper only: no SGLang on this machine
    eng.failed = eng.stopped = False

    def dies():
        eng.failed = True  # what the SIGQUIT handler sets before cancelling the tasks
        raise asyncio.CancelledError

    with pytest.raises(SGLangFailure, match="failed during dies"):
        eng._call(dies)
    with pytest.raises(SGLangFailure, match="failed earlier"):
        eng._call(lambda: 1)
    ok = SGLangEngine.__new__(SGLangEngine)
    ok.failed = ok.stopped = False
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
    from r1moe.rollout.sglang_weights import FP8_QUANTIZATION_CONFIG, engine_tensors

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

    from r1moe.rollout.sglang_weights import aligned_order

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
    from r1moe.rollout.sglang_weights import write_engine_dir

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


# ---------------------------------------------------------------- rollout.sglang.weight_loader: direct
def _hf_tensors(q_lora_rank=96):
    import torch

    from r1moe.model import build_model, get_preset

    cfg = get_preset("tiny-moe").replace(q_lora_rank=q_lora_rank)  # 4 layers (1 dense), 8 experts + 1 shared, MTP 1
    torch.manual_seed(0)
    return cfg, dict(build_model(cfg).state_dict())


def _sglang_layout(cfg, sd):
    """What SGLang's DeepSeek-V3 loader builds from these HF tensors at tp = 1, restated from its rules
    (sglang/srt/models/deepseek_common/deepseek_weight_loader.py): the expected parameter values."""
    import torch

    out, L, E = {}, cfg.num_hidden_layers, cfg.n_routed_experts
    for name, t in sd.items():
        parts = name.split(".")
        if parts[:2] == ["model", "layers"] and int(parts[2]) >= L:
            continue  # multi-token prediction layers: not served
        out[name] = t
    for i in range(L):
        p = f"model.layers.{i}."
        if cfg.q_lora_rank is not None:
            out[p + "self_attn.fused_qkv_a_proj_with_mqa.weight"] = torch.cat(
                [out.pop(p + "self_attn.q_a_proj.weight"), out.pop(p + "self_attn.kv_a_proj_with_mqa.weight")])
        for mlp in ("mlp.", "mlp.shared_experts."):
            if p + mlp + "gate_proj.weight" in out:
                out[p + mlp + "gate_up_proj.weight"] = torch.cat(
                    [out.pop(p + mlp + "gate_proj.weight"), out.pop(p + mlp + "up_proj.weight")])
        if p + "mlp.experts.0.down_proj.weight" in out:
            ex = p + "mlp.experts."
            out[ex + "w13_weight"] = torch.stack([torch.cat([out.pop(f"{ex}{e}.gate_proj.weight"),
                                                             out.pop(f"{ex}{e}.up_proj.weight")]) for e in range(E)])
            out[ex + "w2_weight"] = torch.stack([out.pop(f"{ex}{e}.down_proj.weight") for e in range(E)])
    return out


def _receiver(shapes: dict):
    """A module whose parameters carry SGLang's names and shapes (a real nn.Module, as SGLang's model is one), and
    that records the post_load_weights calls SGLang's DeepSeek model answers."""
    import torch
    from torch import nn

    class Receiver(nn.Module):
        def __init__(self):
            super().__init__()
            self.post_loaded = []

        def post_load_weights(self, is_nextn=False, weight_names=None):
            self.post_loaded += list(weight_names)

    root = Receiver()
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        m = root
        for part in path:
            if part not in m._modules:
                m.add_module(part, nn.Module())
            m = m._modules[part]
        m.register_parameter(leaf, nn.Parameter(torch.full(shape, float("nan")), requires_grad=False))
    return root


def _sync(packer_config, named, receiver, bucket_bytes=1 << 20):
    """What SGLangEngine.update_weights does with weight_loader=direct, the receiving half called in-process."""
    import json

    import torch

    from r1moe.rollout.sglang_weights import direct_buckets, load_direct, pack_direct

    sent = 0
    for bucket, first, final in direct_buckets(named, packer_config, "float32", bucket_bytes):
        spec, flat = pack_direct(bucket, torch.device("cpu"))
        spec.update(first=first, final=final)
        load_direct(receiver, [(json.dumps(spec), flat)])
        sent += 1
    return sent


@pytest.mark.parametrize("q_lora_rank", [96, None])
def test_direct_weight_sync_fills_sglangs_parameters_with_its_loaders_layout(q_lora_rank):
    """HF tensors in any order (here shuffled, several buckets) -> every SGLang parameter equal to what SGLang's own
    loader would make of them; MLA's absorbed weights recomputed for every layer's kv_b_proj; the vocabulary padding
    of embedding and head left alone."""
    import random

    import torch

    cfg, sd = _hf_tensors(q_lora_rank)
    expected = _sglang_layout(cfg, sd)
    shapes = {n: tuple(t.shape) for n, t in expected.items()}
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        shapes[n] = (cfg.vocab_size + 64, cfg.hidden_size)  # SGLang pads the vocabulary
    receiver = _receiver(shapes)
    items = list(sd.items())
    random.Random(0).shuffle(items)
    buckets = _sync(cfg.to_hf_dict(), items, receiver, bucket_bytes=64 << 10)
    assert buckets > 3
    got = dict(receiver.named_parameters())
    for name, want in expected.items():
        have = got[name][: want.shape[0]] if name in ("model.embed_tokens.weight", "lm_head.weight") else got[name]
        assert torch.equal(have, want), name
    assert torch.isnan(got["lm_head.weight"][cfg.vocab_size:]).all()
    assert sorted(receiver.post_loaded) == sorted(f"model.layers.{i}.self_attn.kv_b_proj.weight"
                                                  for i in range(cfg.num_hidden_layers))


def test_direct_weight_sync_into_a_fused_shared_expert():
    """SGLang may fuse the shared expert into the routed experts' kernel as expert n_routed: its weights land in
    that last slot of w13/w2."""
    import torch

    cfg, sd = _hf_tensors()
    expected = _sglang_layout(cfg, sd)
    shapes = {}
    for n, t in expected.items():
        if ".mlp.shared_experts." in n:
            continue
        shapes[n] = (t.shape[0] + 1, *t.shape[1:]) if n.endswith(("w13_weight", "w2_weight")) else tuple(t.shape)
    # in the order the state dict has, and with the shared expert's tensors first (another exporter's order)
    for order in (list(sd.items()), sorted(sd.items(), key=lambda nt: ".shared_experts." not in nt[0])):
        receiver = _receiver(shapes)
        _sync(cfg.to_hf_dict(), order, receiver)
        got = dict(receiver.named_parameters())
        for i in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
            p = f"model.layers.{i}.mlp."
            assert torch.equal(got[p + "experts.w13_weight"][:-1], expected[p + "experts.w13_weight"])
            assert torch.equal(got[p + "experts.w13_weight"][-1], expected[p + "shared_experts.gate_up_proj.weight"])
            assert torch.equal(got[p + "experts.w2_weight"][-1], expected[p + "shared_experts.down_proj.weight"])


def test_direct_weight_sync_errors_name_the_parameter():
    import torch

    from r1moe.rollout.sglang_weights import DirectPacker

    cfg, sd = _hf_tensors()
    expected = _sglang_layout(cfg, sd)
    shapes = {n: tuple(t.shape) for n, t in expected.items()}
    # a sync that leaves an expert out: the packer names the parameter it cannot complete
    partial = [(n, t) for n, t in sd.items() if n != "model.layers.2.mlp.experts.5.up_proj.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.experts\.w13_weight: 1 of its 16"):
        _sync(cfg.to_hf_dict(), partial, _receiver(shapes))
    packer = DirectPacker(cfg.to_hf_dict())
    list(packer.add("model.layers.1.mlp.experts.0.down_proj.weight", torch.zeros(128, 96)))
    with pytest.raises(ValueError, match="sent twice"):
        list(packer.add("model.layers.1.mlp.experts.0.down_proj.weight", torch.zeros(128, 96)))
    with pytest.raises(ValueError, match="expert 8 of n_routed_experts=8"):
        list(packer.add("model.layers.1.mlp.experts.8.down_proj.weight", torch.zeros(128, 96)))
    # SGLang's model has a parameter the sync never wrote: it would keep stale weights
    with pytest.raises(RuntimeError, match=r"1 of SGLang's parameters unwritten.*extra\.weight"):
        _sync(cfg.to_hf_dict(), sd.items(), _receiver({**shapes, "extra.weight": (3,)}))
    # the sync sends a name SGLang's model lacks, or a shape that does not fit
    with pytest.raises(KeyError, match="no parameter 'model.norm.weight'"):
        _sync(cfg.to_hf_dict(), sd.items(), _receiver({n: s for n, s in shapes.items() if n != "model.norm.weight"}))
    bad = {**shapes, "model.layers.0.mlp.gate_up_proj.weight": (2 * 384, 64)}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_up_proj\.weight: sent \(768, 128\)"):
        _sync(cfg.to_hf_dict(), sd.items(), _receiver(bad))


def test_pack_direct_lays_parts_row_major_at_aligned_offsets():
    """Each parameter starts at a 256-byte offset; its parts follow each other in row-major order, whatever their
    dtype, element count or strides (a transposed part is packed as the matrix it is, not as its storage)."""
    import torch

    from r1moe.rollout.sglang_weights import ALIGN, Packed, pack_direct

    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, generator=g).to(torch.bfloat16)  # 30 bytes: the next one needs padding
    b = torch.randn(4, 7, generator=g)
    bt = torch.randn(7, 4, generator=g).t()  # non-contiguous
    c = torch.randn(2, 3, generator=g).to(torch.float8_e4m3fn)
    bucket = [Packed("a", (3, 5), [a]), Packed("b", (8, 7), [b, bt]), Packed("c", (2, 3), [c])]
    spec, flat = pack_direct(bucket, torch.device("cpu"))
    assert flat.dtype == torch.uint8
    for (name, dtype, shape, offset), want in zip(spec["tensors"], (a, torch.cat([b, bt]), c)):
        assert offset % ALIGN == 0, name
        n = want.numel() * want.element_size()
        got = flat[offset: offset + n].view(getattr(torch, dtype)).view(shape)
        assert torch.equal(got.float(), want.float()), name
    assert pack_direct([], torch.device("cpu"))[0] == {"tensors": []}


def test_direct_packer_refuses_parts_that_do_not_match():
    import torch

    from r1moe.rollout.sglang_weights import DirectPacker

    cfg, _ = _hf_tensors()
    packer = DirectPacker(cfg.to_hf_dict())
    list(packer.add("model.layers.1.mlp.experts.0.gate_proj.weight", torch.zeros(96, 128)))
    with pytest.raises(ValueError, match=r"experts\.3\.gate_proj\.weight \(96, 64\) torch.float32 differs"):
        list(packer.add("model.layers.1.mlp.experts.3.gate_proj.weight", torch.zeros(96, 64)))
    with pytest.raises(ValueError, match=r"experts\.4\.up_proj\.weight \(96, 128\) torch.bfloat16 differs"):
        list(packer.add("model.layers.1.mlp.experts.4.up_proj.weight", torch.zeros(96, 128, dtype=torch.bfloat16)))
    packer = DirectPacker(cfg.to_hf_dict())  # one expert's up_proj 95 rows instead of 96: the parameter is refused
    names = [f"model.layers.1.mlp.experts.{e}.{proj}.weight" for e in range(8) for proj in ("gate_proj", "up_proj")]
    for name in names[:-1]:
        assert list(packer.add(name, torch.zeros(96, 128))) == []
    with pytest.raises(ValueError, match=r"the experts of model\.layers\.1\.mlp\.experts\.w13_weight differ"):
        list(packer.add(names[-1], torch.zeros(95, 128)))


def test_weight_loader_setting_resolves_or_refuses_by_name():
    from r1moe.config import SGLangSection
    from r1moe.model import get_preset
    from r1moe.rollout.sglang_weights import resolve_direct_loader

    moe = get_preset("tiny-moe").to_hf_dict()
    dense = get_preset("tiny-dense").to_hf_dict()
    assert resolve_direct_loader(SGLangSection(), moe, nccl_sync=False) == moe  # auto: direct where it applies
    assert resolve_direct_loader(SGLangSection(weight_loader="sglang"), moe, nccl_sync=False) is None
    assert resolve_direct_loader(SGLangSection(tp=2), moe, nccl_sync=False) is None
    assert resolve_direct_loader(SGLangSection(), dense, nccl_sync=False) is None
    assert resolve_direct_loader(SGLangSection(), moe, nccl_sync=True) is None
    with pytest.raises(ValueError, match="weight_loader=direct cannot serve model_type"):
        resolve_direct_loader(SGLangSection(weight_loader="direct"), dense, nccl_sync=False)
    with pytest.raises(ValueError, match="weight_loader=direct cannot serve SGLang on GPUs of its own"):
        resolve_direct_loader(SGLangSection(weight_loader="direct", colocate=False), moe, nccl_sync=True)
    with pytest.raises(ValueError, match="weight_loader=direct copies whole parameters: it needs tp=1"):
        SGLangSection(weight_loader="direct", tp=2)



def test_shutdown_stops_the_engines_processes_and_no_other_child():
    """SGLang's own Engine.shutdown kills every child of the calling process (wandb's service, a sandbox, another
    engine: seen on a GPU, where one engine's shutdown killed the next one's scheduler). SGLangEngine.shutdown
    stops the processes the engine started, with their children, and waits for them; the rest live on."""
    import subprocess
    import sys
    import time

    from r1moe.rollout.sglang_engine import SGLangEngine, _children, _process_table

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    # an "engine process" with a child of its own, as SGLang's scheduler has
    script = ("import subprocess, sys, time; "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)")
    ours = subprocess.Popen([sys.executable, "-c", script])
    try:
        for _ in range(100):
            grandchildren = _children(ours.pid)
            if grandchildren:
                break
            time.sleep(0.05)
        assert grandchildren and {other.pid, ours.pid} <= _children()

        class Manager:
            _subprocess_watchdog = None

        class Engine:
            tokenizer_manager = Manager()

        eng = SGLangEngine.__new__(SGLangEngine)
        eng.failed, eng.stopped, eng.engine, eng.pids = False, False, Engine(), [ours.pid]
        eng.shutdown()
        table = _process_table()
        assert all(p not in table or table[p][1] == "Z" for p in [ours.pid, *grandchildren])
        assert other.poll() is None  # the other child lives
        with pytest.raises(RuntimeError, match="shut down"):
            eng._call(lambda: 1)
    finally:
        for p in (other, ours):
            p.kill()
            p.wait()


def test_direct_weight_sync_tied_parameters_and_a_missing_shared_slot():
    """A parameter SGLang ties under two names is written once under either; a fused shared-expert slot that the
    sync never fills is an error at the end of the sync (it would keep stale weights)."""
    import torch

    cfg, sd = _hf_tensors()
    expected = _sglang_layout(cfg, sd)
    shapes = {n: tuple(t.shape) for n, t in expected.items()}
    receiver = _receiver(shapes)
    receiver.lm_head.weight = receiver.model.embed_tokens.weight  # tied: one parameter, two names
    _sync(cfg.to_hf_dict(), [(n, t) for n, t in sd.items() if n != "lm_head.weight"], receiver)
    assert torch.equal(receiver.lm_head.weight, expected["model.embed_tokens.weight"])

    fused = {}
    for n, t in expected.items():
        if ".mlp.shared_experts." not in n:
            fused[n] = (t.shape[0] + 1, *t.shape[1:]) if n.endswith(("w13_weight", "w2_weight")) else tuple(t.shape)
    no_shared = [(n, t) for n, t in sd.items() if ".shared_experts." not in n]
    with pytest.raises(RuntimeError, match=r"w13_weight \(its fused shared-expert slot\)"):
        _sync(cfg.to_hf_dict(), no_shared, _receiver(fused))
