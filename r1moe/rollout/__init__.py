"""Rollout engines: the RolloutEngine protocol and the built-in engine over the reference model."""

from .base import FinishReason, Generation, RolloutEngine, SamplingParams
from .builtin import BuiltinEngine

__all__ = ["BuiltinEngine", "FinishReason", "Generation", "RolloutEngine", "SamplingParams"]
