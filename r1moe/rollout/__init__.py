"""Rollout engines: the RolloutEngine protocol, the built-in engine over the reference model, and SGLang
(r1moe.rollout.sglang_engine, imported on demand: it needs CUDA and the sglang package)."""

from .base import FinishReason, Generation, NonFiniteError, RolloutEngine, SamplingParams
from .builtin import BuiltinEngine

__all__ = ["BuiltinEngine", "FinishReason", "Generation", "NonFiniteError", "RolloutEngine", "SamplingParams"]
