"""ParallelConfig: the TP/PP/EP/ETP/CP layout of the megatron backend, validated before any GPU work.

Megatron-core builds two rank grids over the same world (megatron.core.parallel_state, order "tp-cp-ep-dp-pp"):
dense layers see  world = tp * cp * dp * pp  and routed experts see  world = etp * ep * edp * pp.  Both must
divide the world size; dp and edp are derived. "TP2 with EP2 folded onto two GPUs" is tp=2, ep=2, etp=1:
attention is split across the two GPUs by heads, the experts are split across the same two GPUs by expert.

    pcfg = ParallelConfig(tp=2, ep=2, etp=1)
    pcfg.validate(model_cfg, world_size=2)      # ValueError naming the numbers if the layout cannot work
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from r1moe.model import ModelConfig


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    """Tensor parallel size (attention heads, dense FFN, shared experts, vocabulary)."""
    pp: int = 1
    """Pipeline parallel size (decoder layers split into pp stages; embedding on the first, head on the last)."""
    ep: int = 1
    """Expert parallel size (routed experts split across ep ranks)."""
    etp: int | None = None
    """Expert tensor parallel size (each routed expert's FFN split across etp ranks); None means etp = tp."""
    cp: int = 1
    """Context parallel size (the sequence split across cp ranks)."""
    pp_layers: tuple[int, ...] | None = None
    """Explicit decoder-layer count per pipeline stage (len == pp, sum == num_hidden_layers); None = even split."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep", "cp"):
            if getattr(self, name) < 1:
                raise ValueError(f"ParallelConfig.{name}={getattr(self, name)} must be >= 1")
        if self.etp is not None and self.etp < 1:
            raise ValueError(f"ParallelConfig.etp={self.etp} must be >= 1 (or None for etp = tp)")
        if self.pp_layers is not None:
            object.__setattr__(self, "pp_layers", tuple(int(n) for n in self.pp_layers))
            if len(self.pp_layers) != self.pp:
                raise ValueError(f"pp_layers={list(self.pp_layers)} has {len(self.pp_layers)} entries; pp={self.pp}")
            if any(n < 1 for n in self.pp_layers):
                raise ValueError(f"pp_layers={list(self.pp_layers)}: every stage needs at least one layer")

    # ------------------------------------------------------------------ derived sizes
    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def sequence_parallel(self) -> bool:
        """Megatron requires sequence parallelism for MoE training with TP > 1 (MoELayer.forward raises)."""
        return self.tp > 1

    @property
    def min_world_size(self) -> int:
        """Smallest world on which both the dense and the expert grid fit."""
        return self.pp * math.lcm(self.tp * self.cp, self.expert_tp * self.ep)

    def dp(self, world_size: int) -> int:
        return world_size // (self.tp * self.cp * self.pp)

    def edp(self, world_size: int) -> int:
        return world_size // (self.expert_tp * self.ep * self.pp)

    def stage_layers(self, num_layers: int) -> list[int]:
        """Decoder layers per pipeline stage."""
        if self.pp_layers is not None:
            return list(self.pp_layers)
        return [num_layers // self.pp] * self.pp

    def stage_of_layer(self, num_layers: int) -> list[tuple[int, int]]:
        """For each global decoder layer: (pipeline stage, index within the stage)."""
        out = []
        for stage, n in enumerate(self.stage_layers(num_layers)):
            out += [(stage, i) for i in range(n)]
        return out

    # ------------------------------------------------------------------ validation
    def validate(self, cfg: ModelConfig | None, world_size: int | None = None) -> None:
        """Raise ValueError (naming the numbers) if `cfg` cannot be laid out this way on `world_size` ranks
        (cfg=None checks the world size only)."""
        if cfg is not None:
            self._validate_model(cfg)
        if world_size is not None:
            if world_size % (self.tp * self.cp * self.pp):
                raise ValueError(f"world_size={world_size} is not divisible by tp*cp*pp="
                                 f"{self.tp}*{self.cp}*{self.pp}={self.tp * self.cp * self.pp}")
            if world_size % (self.expert_tp * self.ep * self.pp):
                raise ValueError(f"world_size={world_size} is not divisible by etp*ep*pp="
                                 f"{self.expert_tp}*{self.ep}*{self.pp}={self.expert_tp * self.ep * self.pp}")

    def _validate_model(self, cfg: ModelConfig) -> None:
        L = cfg.num_hidden_layers
        if self.pp_layers is not None:
            if sum(self.pp_layers) != L:
                raise ValueError(f"pp_layers={list(self.pp_layers)} sums to {sum(self.pp_layers)}, "
                                 f"but the model has num_hidden_layers={L}")
        elif L % self.pp:
            raise ValueError(f"num_hidden_layers={L} is not divisible by pp={self.pp}; "
                             f"give an explicit split with pp_layers=(...)")
        if cfg.num_attention_heads % self.tp:
            raise ValueError(f"num_attention_heads={cfg.num_attention_heads} is not divisible by tp={self.tp}")
        if not cfg.is_moe and cfg.num_key_value_heads % self.tp:
            raise ValueError(f"num_key_value_heads={cfg.num_key_value_heads} is not divisible by tp={self.tp} "
                             f"(kv heads are split across TP ranks, never replicated)")
        for name in ("intermediate_size",) + (("moe_intermediate_size",) if cfg.is_moe else ()):
            if getattr(cfg, name) % (self.expert_tp if name == "moe_intermediate_size" else self.tp):
                div = self.expert_tp if name == "moe_intermediate_size" else self.tp
                raise ValueError(f"{name}={getattr(cfg, name)} is not divisible by "
                                 f"{'etp' if name == 'moe_intermediate_size' else 'tp'}={div}")
        if cfg.is_moe:
            if cfg.n_routed_experts % self.ep:
                raise ValueError(f"n_routed_experts={cfg.n_routed_experts} is not divisible by ep={self.ep}")
            if cfg.n_shared_experts and (cfg.moe_intermediate_size * cfg.n_shared_experts) % self.tp:
                raise ValueError(f"shared-expert width {cfg.moe_intermediate_size * cfg.n_shared_experts} is not "
                                 f"divisible by tp={self.tp}")
        elif self.ep > 1 or (self.etp is not None and self.etp != self.tp):
            raise ValueError(f"ep={self.ep}, etp={self.etp}: expert parallelism needs an MoE model "
                             f"(model_type={cfg.model_type!r})")
        if self.cp > 1 and self.ep > 1:
            raise ValueError(f"cp={self.cp} with ep={self.ep}: megatron-core's expert grid has no context "
                             f"parallelism; use cp=1 or ep=1")

    def check_sequence(self, seq_len: int) -> None:
        """Sequence parallelism splits the sequence across TP ranks; CP splits it into 2*cp chunks."""
        div = (self.tp if self.sequence_parallel else 1) * (2 * self.cp if self.cp > 1 else 1)
        if seq_len % div:
            raise ValueError(f"sequence length {seq_len} is not divisible by {div} "
                             f"(tp={self.tp} with sequence parallelism, cp={self.cp})")
