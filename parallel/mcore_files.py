"""Offline megatron checkpoints for a chosen TP/PP/EP layout: one file per distinct shard, written and read
shard by shard (bounded memory). Pure CPU; used by tools/convert_hf_to_mcore.py / convert_mcore_to_hf.py and
loaded onto the GPU model by `load_mcore_files`.

Layout (format "r1moe-mcore-v1"):
    r1moe_mcore.json                  {"format", "hf_config": config.json dict, "parallel": {tp, pp, ep, etp, pp_layers}}
    dense_pp{P:03d}_tp{T:02d}.pt      every non-expert tensor of stage P, TP shard T
    experts_pp{P:03d}_ep{E:03d}_etp{X:02d}.pt   the routed experts of stage P on expert rank E, expert-TP shard X
Dense and expert shards are separate because megatron lays them on different rank grids (tp vs etp x ep): a rank
reads the dense file of its (pp, tp) and the expert file of its (pp, ep, etp). Names are megatron state-dict names
(parallel/mapping.py), so `torch.load` + `model.load_state_dict(strict=False)` also works by hand.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from r1moe.model import ModelConfig
from r1moe.model.hf_io import ShardWriter

from .config import ParallelConfig
from .mapping import hf_to_mcore_state, mcore_to_hf_state

FORMAT = "r1moe-mcore-v1"


def dense_file(pp: int, tp: int) -> str:
    return f"dense_pp{pp:03d}_tp{tp:02d}.pt"


def expert_file(pp: int, ep: int, etp: int) -> str:
    return f"experts_pp{pp:03d}_ep{ep:03d}_etp{etp:02d}.pt"


def write_mcore_files(cfg: ModelConfig, pcfg: ParallelConfig, get_hf: Callable[[str], torch.Tensor],
                      out: str | Path, log: Callable[[str], None] = lambda s: None) -> list[str]:
    """Write every shard file; each is built and saved before the next (memory: one shard + one HF tensor)."""
    pcfg.validate(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for pp in range(pcfg.pp):
        for tp in range(pcfg.tp):
            state = hf_to_mcore_state(cfg, pcfg, get_hf, pp_rank=pp, tp_rank=tp, ep_rank=0, etp_rank=0,
                                      experts=False)
            torch.save(state, out / dense_file(pp, tp))
            written.append(dense_file(pp, tp))
            log(f"{dense_file(pp, tp)}: {len(state)} tensors")
        if cfg.is_moe:
            for ep in range(pcfg.ep):
                for etp in range(pcfg.expert_tp):
                    state = hf_to_mcore_state(cfg, pcfg, get_hf, pp_rank=pp, tp_rank=0, ep_rank=ep, etp_rank=etp,
                                              experts=True)
                    torch.save(state, out / expert_file(pp, ep, etp))
                    written.append(expert_file(pp, ep, etp))
                    log(f"{expert_file(pp, ep, etp)}: {len(state)} tensors")
    meta = {"format": FORMAT, "hf_config": cfg.to_hf_dict(),
            "parallel": {"tp": pcfg.tp, "pp": pcfg.pp, "ep": pcfg.ep, "etp": pcfg.expert_tp,
                         "pp_layers": list(pcfg.pp_layers) if pcfg.pp_layers else None}}
    (out / "r1moe_mcore.json").write_text(json.dumps(meta, indent=1))
    return written


def read_meta(path: str | Path) -> tuple[ModelConfig, ParallelConfig]:
    meta = json.loads((Path(path) / "r1moe_mcore.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    p = meta["parallel"]
    pcfg = ParallelConfig(tp=p["tp"], pp=p["pp"], ep=p["ep"], etp=p["etp"],
                          pp_layers=tuple(p["pp_layers"]) if p["pp_layers"] else None)
    return ModelConfig.from_hf_dict(meta["hf_config"], source=str(path)), pcfg


class _ShardCache:
    """torch.load(mmap=True) of shard files, a few kept open."""

    def __init__(self, root: Path, keep: int = 8):
        self.root, self.keep = root, keep
        self._open: OrderedDict[str, dict] = OrderedDict()

    def get(self, name: str) -> dict:
        if name not in self._open:
            if len(self._open) >= self.keep:
                self._open.popitem(last=False)
            self._open[name] = torch.load(self.root / name, map_location="cpu", mmap=True, weights_only=True)
        self._open.move_to_end(name)
        return self._open[name]


def convert_mcore_files_to_hf(path: str | Path, out: str | Path, max_shard_bytes: int = 5 << 30,
                              log: Callable[[str], None] = lambda s: None) -> int:
    """Merge the shard files back into an HF safetensors directory (+ config.json). Returns bytes written."""
    path = Path(path)
    cfg, pcfg = read_meta(path)
    cache = _ShardCache(path)

    def get_shards(entry, pp: int, ep_rank: int) -> list[torch.Tensor]:
        if entry.expert:
            return [cache.get(expert_file(pp, ep_rank, x))[entry.mcore] for x in range(pcfg.expert_tp)]
        return [cache.get(dense_file(pp, t))[entry.mcore] for t in range(pcfg.tp)]

    writer = ShardWriter(out, max_shard_bytes)
    for name, t in mcore_to_hf_state(cfg, pcfg, get_shards):
        writer.add(name, t)
    writer.close()
    (Path(out) / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=1))
    log(f"wrote {writer.total_bytes / 1e9:.3f} GB to {out}")
    return writer.total_bytes


@torch.no_grad()
def load_mcore_files(models: list[torch.nn.Module], path: str | Path) -> None:
    """Load this rank's dense + expert shard files onto the GPU model (layouts must match the files')."""
    from .model import _local_tensors, rank_coords, unwrap

    c = rank_coords()
    module = unwrap(models[0])
    local = _local_tensors(module)
    state = torch.load(Path(path) / dense_file(c["pp_rank"], c["tp_rank"]), map_location="cpu", mmap=True,
                       weights_only=True)
    expert_path = Path(path) / expert_file(c["pp_rank"], c["ep_rank"], c["etp_rank"])
    if expert_path.exists():
        state.update(torch.load(expert_path, map_location="cpu", mmap=True, weights_only=True))
    if set(state) != set(local):
        raise ValueError(f"{path}: shard names differ from the model: missing {sorted(set(local) - set(state))[:8]}"
                         f", unexpected {sorted(set(state) - set(local))[:8]}")
    for name, t in state.items():
        if tuple(t.shape) != tuple(local[name].shape):
            raise ValueError(f"{name}: file shape {tuple(t.shape)} != model shape {tuple(local[name].shape)}")
        local[name].copy_(t)
