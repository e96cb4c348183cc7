"""r1moe.parallel: the megatron-core + Transformer Engine backend (TP/EP/PP/DP, FP8). Imports megatron lazily."""
