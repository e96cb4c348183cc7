"""r1moe: DeepSeek-V3-style MoE models through the DeepSeek-R1 recipe (R1-Zero GRPO, cold start, reasoning RL,
rejection sampling + SFT, all-scenario RL, distillation, evaluation)."""

__version__ = "0.1.0"
