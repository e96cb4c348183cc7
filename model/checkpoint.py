"""HF checkpoint load/save: `from_pretrained(dir)` -> CausalLM, `save_pretrained(model, dir)` -> an HF directory.

A directory is `config.json` + `model.safetensors` (or shards `model-0000i-of-0000N.safetensors` with
`model.safetensors.index.json`), the layout transformers and SGLang read. Tensor names are the HF names the model's
state dict already uses (per-expert `mlp.experts.{e}.gate_proj.weight`, MTP at `model.layers.{L + j}`).

Loading builds the model on the meta device and streams tensors in shard by shard (`safetensors.safe_open` maps
the file; one tensor at a time is read), so a large model is never materialised twice. DeepSeek-V3's released FP8
weights (`float8_e4m3fn` + `<name>_scale_inv`, one float32 scale per 128x128 block) are de-quantized on load
(`hf_io.compute_fp8_dequant`, DeepSeek-V3 `weight_dequant` semantics, in float32), then cast to the model dtype.
The safetensors files themselves (index, shards, de-quantization) are read and written by `hf_io.py`.

Saving writes into a temporary directory next to the target and renames it into place (`r1moe.atomic.atomic_dir`),
so a reader sees either the old checkpoint or the complete new one, never a half-written directory.

    model = from_pretrained("ckpt/", dtype=torch.bfloat16, device="cuda")
    save_pretrained(model, "out/", max_shard_size="5GB", tokenizer=tok, extra_files={"r1moe_meta.json": "{}"})
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from r1moe.atomic import atomic_dir

from .config import ModelConfig
from .hf_io import (
    CONFIG_NAME,
    FP8_DTYPES,
    INDEX_NAME,
    SCALE_SUFFIX,
    SINGLE_FILE,
    ShardWriter,
    compute_fp8_dequant,
    fp8_block_size,
    get_tensor,
    open_safetensors,
    parse_size,
    read_weight_map,
    write_json,
)
from .transformer import CausalLM, build_model, hf_tensor_slot, load_hf_tensor

GENERATION_CONFIG_NAME = "generation_config.json"
_CORE_FILES = (CONFIG_NAME, INDEX_NAME, GENERATION_CONFIG_NAME)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------- load
def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> CausalLM:
    """Load an HF checkpoint directory into a new CausalLM (in eval mode, like transformers).

    dtype None: the checkpoint's `torch_dtype` / `dtype` from config.json, else float32. The router's
    `e_score_correction_bias` stays float32 whatever the dtype. Every error names the tensor or key and the file
    (a truncated or garbled safetensors file, a tensor holding NaN/inf included); nothing is returned half-loaded."""
    path = Path(path)
    config_file = path / CONFIG_NAME
    cfg = ModelConfig.from_json(config_file)
    raw = json.loads(config_file.read_text())
    dtype = dtype if dtype is not None else _config_dtype(raw, config_file)
    block = fp8_block_size(raw, config_file)
    weight_map = read_weight_map(path)

    names = set(weight_map)
    scales = {n for n in names if n.endswith(SCALE_SUFFIX) and n[:-len(SCALE_SUFFIX)] in names}
    L, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    if D and not any(n.startswith(f"model.layers.{L + j}.") for n in names for j in range(D)):
        source = path / INDEX_NAME if (path / INDEX_NAME).exists() else path / SINGLE_FILE
        warnings.warn(f"{source}: config has num_nextn_predict_layers={D} but the checkpoint has no MTP tensors "
                      f"(model.layers.{L}.*; transformers drops them on save); loading with MTP disabled",
                      stacklevel=2)
        cfg = cfg.replace(num_nextn_predict_layers=0)

    model = build_model(cfg, device="meta", dtype=dtype)
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:
        # to_empty re-creates parameters one module at a time, which unties lm_head from embed_tokens.
        model.lm_head.weight = model.model.embed_tokens.weight
    model.__dict__.pop("_hf_slots", None)  # slot cache of the meta tensors, if anything built it

    aliases = _aliases(model)
    expected = list(model.state_dict().keys())
    loaded: set[str] = set()
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    for file, file_names in by_file.items():
        file_path = path / file
        with open_safetensors(file_path) as f:
            present = set(f.keys())
            for name in file_names:
                if name in scales:
                    continue
                if name not in present:
                    raise ValueError(f"{file_path}: tensor {name!r} is listed in {INDEX_NAME} but not in the file")
                main = aliases.get(name)
                if main is not None and main in names:
                    # A stored copy of a shared tensor (MTP embed/head, tied lm_head): the model holds one tensor,
                    # loaded from the main name; the copy's shape is still checked.
                    _check_shape(model, name, f.get_slice(name).get_shape(), file_path)
                    loaded.add(name)
                    continue
                tensor = get_tensor(f, name, file_path)
                scale_name = name + SCALE_SUFFIX
                if (tensor.dtype in FP8_DTYPES) != (scale_name in scales):
                    raise ValueError(f"{file_path}: tensor {name!r} is stored as {tensor.dtype} "
                                     + ("without" if scale_name not in scales else "with")
                                     + f" a {scale_name!r}; only FP8 weights with a block scale are supported")
                if scale_name in scales:
                    scale_file = weight_map[scale_name]
                    if scale_file == file:
                        scale = get_tensor(f, scale_name, file_path)
                    else:
                        with open_safetensors(path / scale_file) as g:
                            scale = get_tensor(g, scale_name, path / scale_file)
                    tensor = compute_fp8_dequant(tensor.to(device), scale.to(device), block, name)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise ValueError(f"{file_path}: tensor {name!r} holds NaN/inf values; the checkpoint is corrupt "
                                     f"or was saved from a diverged run")
                _load_one(model, name, tensor, file_path)
                loaded.add(name)
                if main is not None:
                    loaded.add(main)

    covered = loaded | {a for a, m in aliases.items() if m in loaded}
    missing = [n for n in expected if n not in covered]
    main_missing = [n for n in missing if not _is_mtp(n, L)]
    if main_missing:
        shown = ", ".join(repr(n) for n in main_missing[:5])
        raise ValueError(f"{path}: checkpoint is missing {len(main_missing)} tensor(s) the config requires: {shown}"
                         + (" ..." if len(main_missing) > 5 else ""))
    if missing:  # some MTP tensors present (else MTP was disabled above), some not
        raise ValueError(f"{path}: MTP layers are only partially present; missing tensor {missing[0]!r}"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return model.eval()


def check_checkpoint_files(path: str | os.PathLike) -> None:
    """The cheap part of from_pretrained's checks, before any work: config.json parses, every weight file exists
    and its safetensors header is intact and covers the file (a truncated or garbled file is a ValueError naming
    it). Tensor values (NaN/inf) are checked as from_pretrained reads them."""
    path = Path(path)
    ModelConfig.from_json(path / CONFIG_NAME)
    for file in dict.fromkeys(read_weight_map(path).values()):
        with open_safetensors(path / file):
            pass


def _load_one(model: CausalLM, name: str, tensor: torch.Tensor, file_path: Path) -> None:
    try:
        load_hf_tensor(model, name, tensor)
    except KeyError:
        raise ValueError(f"{file_path}: unexpected tensor {name!r}: a {model.cfg.architecture} with this config has "
                         f"no such tensor") from None
    except ValueError as e:
        raise ValueError(f"{file_path}: {e}") from None


def _check_shape(model: CausalLM, name: str, shape: list[int], file_path: Path) -> None:
    try:
        dst = hf_tensor_slot(model, name)
    except KeyError:
        raise ValueError(f"{file_path}: unexpected tensor {name!r}") from None
    if tuple(dst.shape) != tuple(shape):
        raise ValueError(f"{file_path}: tensor {name!r}: checkpoint shape {tuple(shape)} != model shape "
                         f"{tuple(dst.shape)} from config")


def _aliases(model: CausalLM) -> dict[str, str]:
    """Checkpoint names that are copies of another tensor in this model -> the main name."""
    out = dict(model._mtp_copies())
    if model.cfg.tie_word_embeddings:
        out["lm_head.weight"] = "model.embed_tokens.weight"
    return out


def _is_mtp(name: str, num_hidden_layers: int) -> bool:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return m is not None and int(m.group(1)) >= num_hidden_layers


def _config_dtype(raw: dict[str, Any], source: Path) -> torch.dtype:
    for key in ("torch_dtype", "dtype"):
        value = raw.get(key)
        if value is None:
            continue
        name = str(value).removeprefix("torch.")
        if name not in _DTYPES:
            raise ValueError(f"{source}: {key}={value!r} is not a supported model dtype; expected one of "
                             f"{sorted(_DTYPES)} (pass dtype= to override)")
        return _DTYPES[name]
    return torch.float32


# ---------------------------------------------------------------------------------------------- save
def write_config_files(cfg: ModelConfig, directory: Path, dtype: torch.dtype, extra: dict | None = None) -> None:
    """config.json (HF names, `torch_dtype`, then the `extra` keys) and generation_config.json of a checkpoint
    directory."""
    config = cfg.to_hf_dict()
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config.update(extra or {})
    write_json(directory / CONFIG_NAME, config)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    if cfg.pad_token_id is not None:
        gen["pad_token_id"] = cfg.pad_token_id
    write_json(directory / GENERATION_CONFIG_NAME, gen)


def save_pretrained(model: CausalLM, path: str | os.PathLike, max_shard_size: str | int = "5GB",
                    tokenizer=None, dtype: torch.dtype | None = None,
                    extra_files: dict[str, bytes | str] | None = None) -> Path:
    """Write `model` as an HF checkpoint directory at `path`, atomically; an existing checkpoint there is replaced
    (a non-empty directory without config.json is refused rather than deleted).

    dtype None keeps the model's dtype; `e_score_correction_bias` is always stored float32. `tokenizer`: a
    `tokenizers.Tokenizer` (saved as tokenizer.json + a minimal tokenizer_config.json) or anything with
    `save_pretrained(dir)` (a transformers tokenizer). `extra_files`: relative name -> str/bytes content written last
    into the same directory (e.g. r1moe_meta.json, or a richer tokenizer_config.json with a chat template); it may not
    replace config.json, generation_config.json or weight files. Returns the final path."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise ValueError(f"{path}: name the checkpoint directory itself (it is replaced as a whole)")
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"{path}: exists and is not a directory")
        if any(path.iterdir()) and not (path / CONFIG_NAME).exists():
            raise FileExistsError(f"{path}: exists, is not empty and has no {CONFIG_NAME}; refusing to replace a "
                                  f"directory that is not a checkpoint")
    cfg = model.cfg
    dtype = dtype if dtype is not None else model.lm_head.weight.dtype
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype={dtype}: expected one of {sorted(_DTYPES)}")
    limit = parse_size(max_shard_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(path) as tmp:
        _write_weights(model, tmp, dtype, limit)
        write_config_files(cfg, tmp, dtype)
        if tokenizer is not None:
            _write_tokenizer(tokenizer, tmp)
        for name, content in (extra_files or {}).items():
            _write_extra(tmp, name, content)
    return path


def _tensor_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if name.endswith("e_score_correction_bias") else dtype


def _write_weights(model: CausalLM, out: Path, dtype: torch.dtype, limit: int) -> None:
    writer = ShardWriter(out, limit)
    for name, t in model.state_dict().items():
        writer.add(name, t.detach().to(dtype=_tensor_dtype(name, dtype)))
    writer.close()


def _write_tokenizer(tokenizer, out: Path) -> None:
    if not isinstance(tokenizer, Tokenizer):
        if not hasattr(tokenizer, "save_pretrained"):
            raise TypeError(f"tokenizer: expected a tokenizers.Tokenizer or an object with save_pretrained(), got "
                            f"{type(tokenizer).__name__}")
        tokenizer.save_pretrained(str(out))
        return
    from r1moe.data.tokenizer import build_tokenizer_config

    tokenizer.save(str(out / "tokenizer.json"))
    # the tokenizer's special tokens (those its checkpoint named, see load_tokenizer) and the R1 chat template
    write_json(out / "tokenizer_config.json", build_tokenizer_config(tokenizer))


def _write_extra(out: Path, name: str, content: bytes | str) -> None:
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ValueError(f"extra_files: {name!r} must be a relative path inside the checkpoint directory")
    if isinstance(content, str):
        content = content.encode()
    if not isinstance(content, (bytes, bytearray)):
        raise TypeError(f"extra_files[{name!r}]: expected str or bytes, got {type(content).__name__}")
    target = out / rel
    if target.exists() and (rel.name.endswith(".safetensors") or rel.name in _CORE_FILES):
        raise ValueError(f"extra_files: {name!r} would overwrite the checkpoint's own {rel.name}")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(content)
