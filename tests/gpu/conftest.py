"""GPU tests: Transformer Engine, where installed, loads before any test uses cuDNN (see
r1moe.rollout.sglang_engine._load_transformer_engine_first: TE fails to load after torch has initialized cuDNN, and
an SGLang engine in the same process needs it to unpickle its detokenizer's replies)."""

import importlib.util

if importlib.util.find_spec("torch") is not None and importlib.util.find_spec("sglang") is not None:
    from r1moe.rollout.sglang_engine import _load_transformer_engine_first

    _load_transformer_engine_first()
