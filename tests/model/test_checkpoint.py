"""HF checkpoint directories: bit-exact round trips, sharding, FP8 de-quantization, streaming load, errors that
name what is wrong, and atomic saves. Every checkpoint here is a real safetensors directory on disk."""

import json
import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils._python_dispatch import TorchDispatchMode

from r1moe.model import ModelConfig, build_model, get_preset
from r1moe.model.checkpoint import from_pretrained, save_pretrained
from r1moe.model.hf_io import compute_fp8_dequant, parse_size

MOE = get_preset("tiny-moe").replace(vocab_size=96, hidden_size=64, intermediate_size=192, moe_intermediate_size=32,
                                     num_hidden_layers=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                                     qk_rope_head_dim=8, v_head_dim=16, num_nextn_predict_layers=1)
DENSE = get_preset("tiny-dense").replace(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         tie_word_embeddings=True)


def _model(cfg: ModelConfig, dtype=torch.float32, seed=0):
    model = build_model(cfg, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.01 * torch.randn(b.shape, generator=g))  # not representable in bf16: must stay float32
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return model


def _assert_state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def _rewrite(file, edit):
    """Load one safetensors file, let `edit` change the dict, write it back."""
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("cfg", [MOE, DENSE], ids=["moe-mtp", "dense-tied"])
def test_round_trip_is_bit_exact(cfg, tmp_path):
    model = _model(cfg)
    save_pretrained(model, tmp_path / "ckpt")
    names = set(safe_open(tmp_path / "ckpt" / "model.safetensors", "pt").keys())
    assert names == set(model.state_dict())  # HF names, per-expert tensors, MTP copies; no lm_head when tied
    loaded = from_pretrained(tmp_path / "ckpt")
    _assert_state_equal(model, loaded)
    assert not loaded.training
    if cfg.tie_word_embeddings:
        assert "lm_head.weight" not in names
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    x = torch.randint(0, cfg.vocab_size, (2, 6))
    with torch.no_grad():
        a, b = model.eval()(x, compute_mtp=True), loaded(x, compute_mtp=True)
    assert torch.equal(a.logits, b.logits)
    if cfg.num_nextn_predict_layers:
        assert torch.equal(a.mtp_logits[0], b.mtp_logits[0])
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["architectures"] == [cfg.architecture]
    gen = json.loads((tmp_path / "ckpt" / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (cfg.bos_token_id, cfg.eos_token_id)


def test_bf16_checkpoint_keeps_the_router_bias_float32(tmp_path):
    model = _model(MOE, dtype=torch.bfloat16)
    save_pretrained(model, tmp_path / "ckpt")
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.bfloat16
    loaded = from_pretrained(tmp_path / "ckpt")  # dtype from config.json
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    _assert_state_equal(model, loaded)
    up = from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    assert up.lm_head.weight.dtype == torch.float32
    assert torch.equal(up.lm_head.weight, model.lm_head.weight.float())


def test_save_casts_to_dtype(tmp_path):
    model = _model(DENSE)
    save_pretrained(model, tmp_path / "ckpt", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = from_pretrained(tmp_path / "ckpt")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.bfloat16())
    assert model.lm_head.weight.dtype == torch.float32  # the model itself is untouched


def test_sharded_save_writes_an_index_and_reloads(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = DENSE.replace(tie_word_embeddings=False)
    model = _model(cfg)
    limit = 20_000
    save_pretrained(model, tmp_path / "ckpt", max_shard_size=limit)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (tmp_path / "ckpt" / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(model.state_dict())
    total = 0
    for file in files:
        tensors = load_file(tmp_path / "ckpt" / file)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= limit or len(tensors) == 1  # a tensor larger than the limit gets a shard of its own
        assert all(index["weight_map"][k] == file for k in tensors)
        total += size
    assert index["metadata"]["total_size"] == total
    _assert_state_equal(model, from_pretrained(tmp_path / "ckpt"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    x = torch.randint(0, cfg.vocab_size, (1, 5))
    with torch.no_grad():
        assert (hf(x).logits - model.eval()(x).logits).abs().max() < 1e-4


@pytest.mark.parametrize("size,expected", [
    (123, 123), ("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1.5kb", 1500), ("10 KiB", 10240)])
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["5 parsecs", "GB", 0, -1, "0MB"])
def test_parse_size_rejects(size):
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size(size)


# ---------------------------------------------------------------------------------------------- FP8
def _quantize_blockwise(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3-style block quantization: one float32 scale_inv per block, amax mapped to e4m3's max 448."""
    M, N = w.shape
    s = torch.empty((M + block - 1) // block, (N + block - 1) // block)
    q = torch.empty(M, N, dtype=torch.float8_e4m3fn)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            s[i, j] = blk.abs().max().clamp(min=1e-12) / 448.0
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def _dequant_by_hand(q: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
    out = torch.empty(q.shape)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rows, cols] = q[rows, cols].float() * s[i, j]
    return out


def test_fp8_block_scales_are_dequantized_on_load(tmp_path):
    """The released DeepSeek-V3 layout: float8_e4m3fn weights + float32 `weight_scale_inv`, quantization_config in
    config.json, scales possibly in another shard than their weight. Shapes here span partial 128-blocks
    (192 = 128 + 64 rows, 256 rows = 2 blocks)."""
    model = _model(MOE)
    save_pretrained(model, tmp_path / "ckpt", max_shard_size=60_000)
    ckpt = tmp_path / "ckpt"
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    quantized = ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight",
                 "model.layers.1.self_attn.kv_b_proj.weight", "model.layers.1.mlp.experts.3.up_proj.weight",
                 "model.layers.2.eh_proj.weight"]
    expected = {}
    scale_file = min(index["weight_map"].values())
    for name in quantized:
        file = index["weight_map"][name]
        q, s = _quantize_blockwise(model.state_dict()[name])
        expected[name] = _dequant_by_hand(q, s)
        _rewrite(ckpt / file, lambda t, name=name, q=q: t.update({name: q}))
        # The scale goes into the first shard: the loader must find it across files.
        _rewrite(ckpt / scale_file, lambda t, name=name, s=s: t.update({name + "_scale_inv": s}))
        index["weight_map"][name + "_scale_inv"] = scale_file
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [128, 128]}
    (ckpt / "config.json").write_text(json.dumps(config))
    assert load_file(ckpt / scale_file)["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (2, 1)

    loaded = from_pretrained(ckpt)
    sd = loaded.state_dict()
    assert not any(k.endswith("_scale_inv") for k in sd)
    for name in quantized:
        assert torch.equal(sd[name], expected[name]), name
        # fp8 e4m3 keeps ~3 mantissa bits: the de-quantized weight is close to the original, not equal.
        orig = model.state_dict()[name]
        assert (sd[name] - orig).abs().max() <= 0.07 * orig.abs().max()
        assert not torch.equal(sd[name], orig)
    bf16 = from_pretrained(ckpt, dtype=torch.bfloat16)
    assert torch.equal(bf16.state_dict()[quantized[0]], expected[quantized[0]].bfloat16())


def test_compute_fp8_dequant_checks_the_scale_shape():
    q = torch.zeros(200, 64, dtype=torch.float8_e4m3fn)
    torch.testing.assert_close(compute_fp8_dequant(q, torch.ones(2, 1)), torch.zeros(200, 64))
    with pytest.raises(ValueError, match=r"w\.weight_scale_inv has shape \(1, 1\), expected \(2, 1\)"):
        compute_fp8_dequant(q, torch.ones(1, 1), name="w.weight")


def test_fp8_tensor_without_a_scale_is_an_error(tmp_path):
    save_pretrained(_model(DENSE), tmp_path / "ckpt")
    name = "model.layers.0.mlp.up_proj.weight"
    _rewrite(tmp_path / "ckpt" / "model.safetensors", lambda t: t.update({name: t[name].to(torch.float8_e4m3fn)}))
    with pytest.raises(ValueError, match=f"model.safetensors: tensor '{name}'.*without.*_scale_inv"):
        from_pretrained(tmp_path / "ckpt")


# ---------------------------------------------------------------------------------------------- streaming load
class AllocationSpy(TorchDispatchMode):
    """Records CPU bytes created by allocating ops and any random-init op on a real device."""

    ALLOCATING = ("empty", "empty_like", "empty_strided", "zeros", "zeros_like", "ones", "ones_like", "full",
                  "full_like", "new_empty", "new_zeros", "new_ones", "new_full", "clone")
    RANDOM = ("normal_", "uniform_", "kaiming_uniform_", "randn", "rand", "normal")

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.random_ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        op = func.overloadpacket.__name__
        outs = out if isinstance(out, (list, tuple)) else [out]
        for t in outs:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                if op in self.ALLOCATING:
                    self.bytes += t.numel() * t.element_size()
                if op in self.RANDOM:
                    self.random_ops.append(op)
        return out


def test_load_streams_into_a_meta_built_model(tmp_path):
    """from_pretrained allocates the model once (from the meta device) and never runs a random init on a real
    device: a second, randomly initialised copy would double the allocated bytes."""
    model = _model(MOE)
    save_pretrained(model, tmp_path / "ckpt")
    model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    with AllocationSpy() as spy:
        loaded = from_pretrained(tmp_path / "ckpt")
    assert spy.random_ops == []
    assert model_bytes <= spy.bytes < 1.2 * model_bytes
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    _assert_state_equal(model, loaded)
    # The spy sees a build on a real device, so the bound above can fail.
    with AllocationSpy() as spy:
        build_model(MOE)
    assert spy.random_ops and spy.bytes >= model_bytes


# ---------------------------------------------------------------------------------------------- MTP
def test_checkpoint_without_mtp_loads_with_mtp_disabled(tmp_path):
    model = _model(MOE)
    save_pretrained(model, tmp_path / "ckpt")
    L = MOE.num_hidden_layers
    _rewrite(tmp_path / "ckpt" / "model.safetensors",
             lambda t: [t.pop(k) for k in list(t) if k.startswith(f"model.layers.{L}.")])
    with pytest.warns(UserWarning, match=r"model\.safetensors.*num_nextn_predict_layers=1.*MTP disabled"):
        loaded = from_pretrained(tmp_path / "ckpt")
    assert loaded.cfg.num_nextn_predict_layers == 0
    assert len(loaded.model.layers) == L
    x = torch.randint(0, MOE.vocab_size, (2, 6))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model.eval()(x).logits)


def test_partial_mtp_is_an_error_naming_the_missing_tensor(tmp_path):
    save_pretrained(_model(MOE), tmp_path / "ckpt")
    name = f"model.layers.{MOE.num_hidden_layers}.eh_proj.weight"
    _rewrite(tmp_path / "ckpt" / "model.safetensors", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=f"MTP layers are only partially present; missing tensor '{name}'"):
        from_pretrained(tmp_path / "ckpt")


def test_mtp_copies_of_embed_and_head_are_shape_checked(tmp_path):
    save_pretrained(_model(MOE), tmp_path / "ckpt")
    name = f"model.layers.{MOE.num_hidden_layers}.shared_head.head.weight"
    _rewrite(tmp_path / "ckpt" / "model.safetensors", lambda t: t.update({name: torch.zeros(3, 3)}))
    with pytest.raises(ValueError, match=rf"{name}.*\(3, 3\).*\(96, 64\)"):
        from_pretrained(tmp_path / "ckpt")


# ---------------------------------------------------------------------------------------------- errors
def test_missing_shard_is_named(tmp_path):
    save_pretrained(_model(DENSE), tmp_path / "ckpt", max_shard_size=20_000)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "ckpt" / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        from_pretrained(tmp_path / "ckpt")


def test_missing_weights_file_is_named(tmp_path):
    save_pretrained(_model(DENSE), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(tmp_path / "ckpt")


def test_bad_shape_names_the_tensor_the_file_and_both_shapes(tmp_path):
    save_pretrained(_model(DENSE), tmp_path / "ckpt")
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite(tmp_path / "ckpt" / "model.safetensors", lambda t: t.update({name: torch.zeros(8, 32)}))
    with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{name}': checkpoint shape \(8, 32\) != "
                                         rf"model shape \(16, 32\)"):
        from_pretrained(tmp_path / "ckpt")


def test_unexpected_tensor_is_named_with_its_file(tmp_path):
    save_pretrained(_model(DENSE), tmp_path / "ckpt")
    _rewrite(tmp_path / "ckpt" / "model.safetensors", lambda t: t.update({"model.layers.0.extra.weight": t[
        "model.norm.weight"].clone()}))
    with pytest.raises(ValueError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.0\.extra\.weight'"):
        from_pretrained(tmp_path / "ckpt")


def test_missing_tensor_is_named_with_the_directory(tmp_path):
    save_pretrained(_model(MOE), tmp_path / "ckpt")
    name = "model.layers.1.mlp.experts.5.down_proj.weight"
    _rewrite(tmp_path / "ckpt" / "model.safetensors", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"{tmp_path / 'ckpt'}: checkpoint is missing 1 tensor\(s\).*'{name}'"):
        from_pretrained(tmp_path / "ckpt")


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "unsupported model_type 'gpt2'"),
    (lambda c: c.update(not_a_key=1), "unknown key 'not_a_key'"),
    (lambda c: c.update(torch_dtype="int8"), "torch_dtype='int8'"),
], ids=["architecture", "config-key", "dtype"])
def test_bad_config_names_the_key_and_the_file(tmp_path, edit, match):
    save_pretrained(_model(DENSE), tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_file.read_text())
    edit(config)
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match) as e:
        from_pretrained(tmp_path / "ckpt")
    assert str(config_file) in str(e.value)


def test_missing_config_is_named(tmp_path):
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------- atomic save
def test_failed_save_leaves_nothing_behind(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TypeError, match="extra_files"):
        save_pretrained(_model(DENSE), out / "ckpt", extra_files={"meta.json": {"not": "bytes"}})
    assert os.listdir(out) == []  # no target, no temp dir


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    old = _model(DENSE, seed=0)
    save_pretrained(old, tmp_path / "ckpt", extra_files={"r1moe_meta.json": '{"step": 1}'})
    with pytest.raises(ValueError, match="relative path"):
        save_pretrained(_model(DENSE, seed=1), tmp_path / "ckpt", extra_files={"../escape.json": "{}"})
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert (tmp_path / "ckpt" / "r1moe_meta.json").read_text() == '{"step": 1}'
    _assert_state_equal(old, from_pretrained(tmp_path / "ckpt"))


def test_save_replaces_an_existing_checkpoint(tmp_path):
    save_pretrained(_model(DENSE, seed=0), tmp_path / "ckpt", max_shard_size=20_000,
                    extra_files={"stale.txt": "old"})
    new = _model(DENSE, seed=1)
    save_pretrained(new, tmp_path / "ckpt", extra_files={"r1moe_meta.json": b'{"step": 2}', "sub/notes.txt": "x"})
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no .tmp-* or .old-* left behind
    files = sorted(os.listdir(tmp_path / "ckpt"))
    assert files == ["config.json", "generation_config.json", "model.safetensors", "r1moe_meta.json", "sub"]
    assert (tmp_path / "ckpt" / "sub" / "notes.txt").read_text() == "x"
    _assert_state_equal(new, from_pretrained(tmp_path / "ckpt"))


def test_save_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "train.log").write_text("precious")
    with pytest.raises(FileExistsError, match="not a checkpoint"):
        save_pretrained(_model(DENSE), run_dir)
    assert os.listdir(run_dir) == ["train.log"] and sorted(os.listdir(tmp_path)) == ["run"]
    for core in ("config.json", "model.safetensors", "generation_config.json"):
        with pytest.raises(ValueError, match=f"would overwrite the checkpoint's own {core}"):
            save_pretrained(_model(DENSE), tmp_path / "ckpt", extra_files={core: "{}"})


def test_saved_directory_has_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        save_pretrained(_model(DENSE), tmp_path / "ckpt")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "ckpt").st_mode) == 0o755  # not mkdtemp's 0700


def test_tokenizer_is_saved_into_the_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>"] + [f"w{i}" for i in range(93)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # llama: for model_type qwen2, transformers 5 ignores tokenizer_class and rebuilds a Qwen2 BPE tokenizer.
    cfg = DENSE.replace(model_type="llama", attention_bias=False)
    save_pretrained(_model(cfg), tmp_path / "ckpt", tokenizer=tok)
    tok_cfg = json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"]) == ("<bos>", "<eos>", "<pad>")
    assert Tokenizer.from_file(str(tmp_path / "ckpt" / "tokenizer.json")).encode("w1 w7").ids == [4, 10]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    assert hf_tok("w1 w7").input_ids == [4, 10]
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (2, 0)
    # A caller with a richer tokenizer_config.json (chat template) passes it as an extra file; it wins.
    rich = dict(tok_cfg, chat_template="{{ messages[0]['content'] }}")
    save_pretrained(_model(cfg), tmp_path / "ckpt", tokenizer=tok,
                    extra_files={"tokenizer_config.json": json.dumps(rich)})
    assert json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text()) == rich
