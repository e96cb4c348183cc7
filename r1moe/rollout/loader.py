"""A rollout engine over a saved HF checkpoint, for evaluation and rejection sampling: the built-in engine on one
device, or SGLang over this node's GPUs (tensor parallel x data parallel).

    engine, tok = load_checkpoint_engine("runs/x/final", engine="sglang", sglang=SGLangSection(dp=8))
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from r1moe.config import SGLangSection

from .base import RolloutEngine


def load_checkpoint_engine(checkpoint: str | Path, engine: str = "builtin", sglang: SGLangSection | None = None,
                           device: str = "auto", context_length: int = 0, seed: int = 0
                           ) -> tuple[RolloutEngine, Tokenizer]:
    """(engine, tokenizer) for `checkpoint`. `context_length`: longest prompt + completion (SGLang sizes its KV
    cache by it; 0 = the model's max_position_embeddings). SGLang settings with the built-in engine are an error."""
    from r1moe.data.tokenizer import load_tokenizer, special_ids
    from r1moe.model import ModelConfig

    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint}: not a checkpoint directory (no config.json)")
    if engine not in ("builtin", "sglang"):
        raise ValueError(f"engine={engine!r}: expected builtin or sglang")
    if engine == "builtin" and sglang is not None and sglang != SGLangSection():
        raise ValueError("SGLang settings given with engine=builtin: they only apply with engine=sglang")
    tok = load_tokenizer(checkpoint)
    pad, _, eos = special_ids(tok, checkpoint)
    mcfg = ModelConfig.from_json(checkpoint / "config.json")
    eos_ids = sorted({eos, *mcfg.eos_ids})
    if engine == "sglang":
        from .sglang_engine import SGLangEngine, check_sglang

        settings = sglang or SGLangSection(colocate=False)
        if device != "auto" and not device.startswith("cuda"):
            raise ValueError(f"engine=sglang runs on GPUs: device={device!r} must be auto or cuda")
        check_sglang("engine=sglang", num_gpus=settings.tp * settings.dp)
        ctx = context_length or min(mcfg.max_position_embeddings, 32768)
        if settings.quantization == "fp8":  # the checkpoint's weights, quantized on their way in
            return _fp8_engine(checkpoint, mcfg, tok, eos_ids, settings, ctx, seed), tok
        return SGLangEngine(checkpoint, tok, eos_ids, settings, context_length=ctx, seed=seed), tok
    from r1moe.model import from_pretrained, resolve_device

    from .builtin import BuiltinEngine

    model = from_pretrained(checkpoint, device=str(resolve_device(device))).eval()
    return BuiltinEngine(model, tok, eos_ids=eos_ids, pad_id=pad), tok


def _fp8_engine(checkpoint: Path, mcfg, tok: Tokenizer, eos_ids: list[int], settings: SGLangSection, ctx: int,
                seed: int) -> RolloutEngine:
    """SGLang serving `checkpoint` in FP8 (rollout.sglang.quantization=fp8): started from its config with dummy
    weights, then the checkpoint's tensors streamed to the GPU one at a time and quantized on the way in."""
    import tempfile

    import torch

    from r1moe.model.hf_io import SCALE_SUFFIX, HFReader

    from .sglang_engine import SGLangEngine
    from .sglang_weights import write_engine_dir

    reader = HFReader(checkpoint, dtype=torch.bfloat16)
    engine_dir = tempfile.TemporaryDirectory(prefix="r1moe-fp8-engine-")  # removed with the engine
    engine = SGLangEngine(write_engine_dir(mcfg, Path(engine_dir.name), quantization="fp8"), tok, eos_ids, settings,
                          context_length=ctx, seed=seed, dummy_weights=True)
    engine.engine_dir = engine_dir
    engine.update_weights((name, reader[name].cuda()) for name in reader.names() if not name.endswith(SCALE_SUFFIX))
    return engine
