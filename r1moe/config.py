"""The typed config tree: one `JobConfig` of nested dataclasses for every stage (pretrain, sft, grpo, rm, eval).

Loaded as `merge(structured(JobConfig), load(recipe.yaml), from_dotlist(overrides))` then `to_object`, so code gets
real dataclasses and an unknown key or a bad value is an error naming it (torchtitan's JobConfig style). Defaults
are the DeepSeek-R1 paper values where it states them (../shared R1-SETTINGS.md); recipes under `recipes/` say
where they had to choose.

    cfg = load_config("recipes/tiny/r1_zero/grpo.yaml", ["train.steps=10", "rollout.group_size=4"])

A little over 500 lines, kept whole: the tree's sections are one schema (each documents its keys where they are
declared), and a recipe's every key resolves here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from r1moe.atomic import write_text_atomic
from r1moe.parallel.config import ParallelConfig


@dataclass
class ModelSection:
    preset: str = "tiny-moe"
    """Architecture from r1moe.model.PRESETS. With `init`, the checkpoint's config.json builds the model and a preset
    set beside it must describe it (its shape is checked: an error if not)."""
    init: str | None = None
    """HF checkpoint directory to start from; None = random init of `preset` (pretraining)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields changed on top of the preset (e.g. vocab_size, aux_loss_alpha); random init only."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class ParallelSection(ParallelConfig):
    """The layout (tp, pp, ep, etp, cp, pp_layers: r1moe.parallel.ParallelConfig, declared and validated there; e.g.
    DeepSeek-V3's 61 layers over pp=4: pp_layers [16, 16, 16, 13]) plus the backend and its precision settings. It
    is a ParallelConfig, so the megatron backend takes it as is."""

    backend: Literal["reference", "megatron"] = "reference"
    """reference = the pure-PyTorch model (CPU or one GPU); megatron = r1moe.parallel (TP/EP/PP, FP8)."""
    fp8: Literal["delayed", "tensorwise", "blockwise"] | None = None
    recompute: Literal["full", "selective"] | None = None


@dataclass
class DataSection:
    train: str | None = None
    """JSONL: prompts (grpo), prompt+response (sft), text or JSONL (pretrain), preference pairs (rm). With
    `format: indexed`: a PREFIX of PREFIX.bin/.idx (tools/preprocess_data.py, or megatron's for pretrain)."""
    format: Literal["jsonl", "indexed"] = "jsonl"
    """jsonl = read and tokenized whole at start; indexed = pre-tokenized, memory-mapped megatron .bin/.idx, packed
    lazily (pretrain and sft, both backends; r1moe/data/loader.py)."""
    blend: dict[str, float] = field(default_factory=dict)
    """format indexed: several PREFIX -> weight, blended as megatron's BlendedDataset does (instead of `train`)."""
    eval: str | None = None
    """Held-out prompts JSONL for periodic evaluation (a seed not used for training)."""
    template: Literal["r1_zero", "chat", "none"] = "r1_zero"
    """Prompt template: Table 1 of DeepSeek-R1 (r1_zero), the R1 chat template (chat), or raw text (none)."""
    tokenizer: str | None = None
    """tokenizer.json or a directory holding it; None = the init checkpoint's, or a tiny one built from the data."""
    tokenizer_vocab_size: int = 512
    """Vocabulary of a tokenizer built from the data (tiny runs)."""
    seq_len: int = 512
    """Packed sequence length (pretrain/sft/rm)."""
    max_prompt_tokens: int = 256
    train_schedule: dict[int, str] = field(default_factory=dict)
    """grpo: rollout step -> prompts JSONL used from that step on, in place of `train` (one job; resumable across
    the switch). R1 stage 4 adds general prompts only in its last 400 steps: `{82: rl_all_scenario.jsonl}`."""


@dataclass
class TrainSection:
    steps: int = 100
    """Optimizer steps (GRPO: rollout steps). Setting it together with `epochs` is an error (it would have no
    effect)."""
    epochs: float | None = None
    """pretrain / sft / rm: passes over the data; when set, it decides the number of steps. None = `steps`."""
    batch_size: int = 32
    """Sequences per step (pretrain/sft/rm) or questions per step (grpo; R1: 32 questions x 16 outputs)."""
    micro_batch_size: int = 0
    """Sequences per forward/backward (gradient accumulation); 0 = the whole batch at once."""
    seed: int = 0
    device: str = "auto"
    """auto = cuda when available, else cpu."""
    threads: int = 0
    """torch intra-op threads on CPU; 0 = torch's default."""
    mtp_weight: float = 0.0
    """lambda of the MTP loss (V3 eq. 25: 0.3 early, 0.1 late in pretraining). 0 disables MTP."""
    expert_bias_rate: float = 0.001
    """gamma of the aux-loss-free bias update (V3 §4.2: 0.001); 0 freezes the bias. The one name of this rate in
    both backends (megatron: MegatronOptions.expert_bias_rate). GRPO applies it only with algo.update_expert_bias."""
    log_every: int = 1
    eval_every: int = 0
    """Evaluate on data.eval every N steps (and at start and end); 0 = only at the end."""
    max_nonfinite_steps: int = 3
    """A step whose loss or gradient norm is NaN/inf is skipped (no update) and counted; this many in a row stop the
    run (1 = stop at the first). A non-finite checkpoint or final/ is never written."""


@dataclass
class OptimSection:
    lr: float = 3e-6
    """R1-Zero / R1 RL: 3e-6 (R1-SETTINGS §1)."""
    min_lr_ratio: float = 1.0
    """Final LR / peak LR of the schedule (R1 SFT: cosine 5e-5 -> 5e-6 = 0.1)."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    """Clip the gradient norm to this; 0 = no clipping."""


@dataclass
class SGLangSection:
    """The SGLang rollout engine (`rollout.engine: sglang`; r1moe/rollout/sglang_engine.py). One `sglang.Engine`
    runs in the main process of rank 0 on this node's GPUs 0 .. tp*dp-1, next to the training ranks."""

    tp: int = 1
    """SGLang tensor-parallel size (GPUs per model replica)."""
    dp: int = 1
    """SGLang data-parallel replicas; tp * dp GPUs in all, on the node of rank 0. Eval and rejection sampling only:
    GRPO needs dp = 1 (SGLang 0.5.17 takes weight updates and memory releases with one replica)."""
    ep: int = 1
    """SGLang expert-parallel size (MoE); must divide tp (SGLang places experts inside its TP group)."""
    mem_fraction_static: float = 0.5
    """Fraction of GPU memory SGLang takes for weights + KV cache. Colocated with training: what the trainer
    leaves free (SGLang's memory is released while the policy trains, `colocate`)."""
    colocate: bool = True
    """Release SGLang's weights and KV cache while the policy trains, take them back for rollouts."""
    base_gpu_id: int = 0
    """First GPU of this node SGLang runs on (base_gpu_id .. base_gpu_id + tp*dp - 1). Below the number of training
    ranks on the node: on the trainer's GPUs, weights by CUDA IPC. At or past it: on GPUs of its own, weights
    broadcast by rank 0 over NCCL (SGLang's init_weights_update_group / update_weights_from_distributed; dp = 1,
    colocate = false). The dedicated mode has not yet run on GPUs."""
    attention_backend: str = "triton"
    """SGLang attention backend (triton | flashinfer | fa3 | ...); triton serves MLA on every Hopper build."""
    sampling_backend: Literal["pytorch", "flashinfer"] = "pytorch"
    cuda_graph_max_bs: int = 256
    """Largest decode batch captured as a CUDA graph; 0 disables CUDA graphs (faster start, slower decode)."""
    context_length: int = 0
    """Longest prompt + completion SGLang serves; 0 = max_prompt_tokens + max_new_tokens of the stage."""
    max_running_requests: int = 0
    """Requests decoded at once; 0 = SGLang's default from its memory budget."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """SGLang's weights and activations; the trainer's weights are cast on sync."""
    log_level: str = "error"
    quantization: Literal["none", "fp8"] = "none"
    """fp8: SGLang serves the policy in DeepSeek-V3's blockwise FP8 format (float8_e4m3fn weights of the decoder's
    linear projections with a float32 scale per 128x128 block, model/hf_io.py `fp8_quantized`), half the weight
    memory of bf16 (671B: ~0.7 TB, one node of 8 H200s); every weight sync quantizes the trainer's weights, and the
    engine starts from config.json with dummy weights. GPU-tested on an H200 (tests/gpu/test_sglang_engine.py)."""
    weight_bucket_mb: int = 1024
    """Weights handed to SGLang per update call (one flat tensor, one CUDA IPC handle or one NCCL broadcast): the
    extra GPU memory a sync takes. Fewer, larger buckets cost SGLang fewer load passes
    (benchmarks/results/rollout_engines_h200.json measures 256 MB to 4 GB)."""
    weight_loader: Literal["auto", "direct", "sglang"] = "auto"
    """How SGLang takes a weight sync. sglang: its own checkpoint loader (every layout SGLang serves; one Python
    loader call per HF tensor, the sync's bottleneck at thousands of expert tensors). direct: the trainer packs the
    tensors already fused into SGLang's parameters (experts stacked, gate/up and q_a/kv_a concatenated) and
    r1moe/rollout/sglang_weights.py `load_direct` copies them in, one copy per parameter; for the DeepSeek-V3 architecture
    unquantized at tp = ep = 1. auto: direct where it applies, else sglang."""

    @property
    def direct_fits(self) -> bool:
        """What weight_loader=direct needs of these settings: whole parameters (tp = ep = 1), unquantized."""
        return (self.tp, self.ep, self.quantization) == (1, 1, "none")

    def __post_init__(self) -> None:
        for name in ("tp", "dp", "ep", "weight_bucket_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.sglang.{name}={getattr(self, name)} must be >= 1")
        if self.tp % self.ep:
            raise ValueError(f"rollout.sglang.ep={self.ep} must divide rollout.sglang.tp={self.tp}")
        if not 0 < self.mem_fraction_static < 1:
            raise ValueError(f"rollout.sglang.mem_fraction_static={self.mem_fraction_static} must be in (0, 1)")
        for name in ("cuda_graph_max_bs", "context_length", "max_running_requests", "base_gpu_id"):
            if getattr(self, name) < 0:
                raise ValueError(f"rollout.sglang.{name}={getattr(self, name)} must be >= 0")
        if self.weight_loader == "direct" and not self.direct_fits:
            raise ValueError(f"rollout.sglang.weight_loader=direct copies whole parameters: it needs tp=1, ep=1 and "
                             f"quantization=none (got tp={self.tp}, ep={self.ep}, quantization={self.quantization}); "
                             f"use weight_loader: sglang or auto")


@dataclass
class SamplingConfig:
    """How completions are sampled: the settings every sampling section shares (rollout, eval, the eval and
    rejection stages' specs, the engines' SamplingParams), declared and validated here once. A section subclasses
    it, so its keys stay flat in a recipe (`rollout.temperature`); SECTION names it in errors."""

    SECTION: ClassVar[str] = "sampling"
    temperature: float = 1.0
    """Softmax temperature; 0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p; 1 = off."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"{self.SECTION}.temperature={self.temperature} must be >= 0 and finite")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{self.SECTION}.top_p={self.top_p} must be in (0, 1]")


@dataclass
class RolloutSection(SamplingConfig):
    SECTION: ClassVar[str] = "rollout"
    engine: Literal["builtin", "sglang"] = "builtin"
    """builtin = the reference model's batched sampler (CPU or one GPU); sglang = SGLang (GPUs, `rollout.sglang`)."""
    sglang: SGLangSection = field(default_factory=SGLangSection)
    group_size: int = 16
    """G outputs per question (R1: 16)."""
    top_k: int = 0
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=lambda: ["</answer>"])
    """Generation stops at EOS or after any of these strings (kept in the output)."""
    micro_batch_size: int = 0
    """Sequences generated at once; 0 = all of a step's questions x G together."""
    max_new_tokens_schedule: dict[int, int] = field(default_factory=dict)
    """Rollout step -> max_new_tokens from that step on (one job; resumable across the switch). R1-Zero raises
    32,768 to 65,536 at update 8.2k: `{514: 65536}` in rollouts of 16 updates."""
    routing_replay: bool = False
    """MoE routing replay (R3): the engine returns the experts it routed each token to, and the trainer's forwards
    (pi_old, pi_theta, pi_ref) use them instead of routing again, so the engine/trainer log-prob mismatch that
    routing flips cause is gone. MoE policies, both backends (megatron: megatron-core's RouterReplay), both engines."""


@dataclass
class AlgoSection:
    """GRPO (DeepSeek-R1 eq. 1 and 3) and the variants users expect."""

    beta: float = 0.001
    """KL weight (R1: 0.001); 0 skips the reference model entirely."""
    eps_low: float = 0.2
    """Clip epsilon (R1 reasoning RL states 10; R1-Zero n/s). Lower side with clip-higher."""
    eps_high: float | None = None
    """Upper clip (DAPO clip-higher); None = symmetric."""
    agg: Literal["seq_mean_group_mean", "token_mean", "seq_sum_norm"] = "seq_mean_group_mean"
    """Paper (per-sequence mean then group mean) | DAPO token-level | Dr. GRPO constant normaliser."""
    adv_scale: Literal["std", "none"] = "std"
    """Divide by the group std (eq. 3) or not (Dr. GRPO)."""
    norm_const: float | None = None
    """Dr. GRPO normaliser; None = rollout.max_new_tokens."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal (DAPO)."""
    num_minibatches: int = 1
    """Policy updates per rollout batch (R1: 16 mini-batches, 1 epoch)."""
    ref_refresh_every: int = 0
    """Replace pi_ref with the current policy every N steps (R1: 400); 0 = never."""
    update_expert_bias: bool = False
    """Keep updating the aux-loss-free expert bias during RL, at train.expert_bias_rate (off = frozen routing bias)."""


@dataclass
class RewardsSection:
    weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 1.0})
    """Reward name -> weight; names from r1moe.rewards.REWARD_FUNCS (R1-Zero: accuracy + format, eq. 4)."""
    reward_model: str | None = None
    """Bradley-Terry reward model checkpoint scoring `general` prompts (all-scenario RL, stage 4)."""
    reward_model_weight: float = 1.0
    safety_model: str | None = None
    """Safety reward model checkpoint (`r1moe rm` with rm.kind=safety) scoring `general` prompts' whole responses:
    sigmoid(score) = P(safe), added to the helpful R_RM (v2 §3.1, eq. 8)."""
    safety_model_weight: float = 1.0


@dataclass
class RMSection:
    """The reward model `r1moe rm` trains (DeepSeek-R1 v2 §3.1)."""

    kind: Literal["helpful", "safety"] = "helpful"
    """helpful: Bradley-Terry on preference pairs (PreferencePair JSONL), reading the final summary only;
    safety: pointwise safe/unsafe labels (SafetySample JSONL), binary cross-entropy, reading the whole response."""


@dataclass
class EvalSection(SamplingConfig):
    SECTION: ClassVar[str] = "eval"
    temperature: float = 0.6
    top_p: float = 0.95
    samples: int = 4
    """K samples per question (R1: 64 for AIME, 16 MATH); pass@1 = mean accuracy over them."""
    max_new_tokens: int = 0
    """0 = rollout.max_new_tokens."""
    max_questions: int = 0
    """Evaluate on the first N questions only; 0 = all."""


@dataclass
class CheckpointSection:
    every: int = 0
    """Save every N steps (HF dir + trainer state, atomically); 0 = only the final checkpoint."""
    keep: int = 2
    """Intermediate checkpoints kept (the final one is always kept)."""
    resume: bool = False
    """Continue from the run directory's last checkpoint (also `--resume` on the command line)."""
    allow_config_change: list[str] = field(default_factory=list)
    """Keys (or whole sections) a resume may find changed from the run's config.yaml (also
    `--allow-config-change train.steps,logging.wandb`); any other difference stops the resume."""


@dataclass
class LoggingSection:
    run_dir: str = "runs/default"
    project: str = "r1moe"
    wandb: Literal["offline", "online", "disabled"] = "offline"
    plots: bool = True


@dataclass
class JobConfig:
    name: str = "default"
    stage: Literal["pretrain", "sft", "grpo", "rm", "eval"] = "grpo"
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    algo: AlgoSection = field(default_factory=AlgoSection)
    rewards: RewardsSection = field(default_factory=RewardsSection)
    rm: RMSection = field(default_factory=RMSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def __post_init__(self) -> None:
        _finite(self, "")
        _positive(self.train, "train", ["steps", "batch_size", "log_every", "max_nonfinite_steps"])
        _positive(self.rollout, "rollout", ["group_size", "max_new_tokens"])
        _positive(self.eval, "eval", ["samples"])
        _positive(self.data, "data", ["seq_len", "max_prompt_tokens", "tokenizer_vocab_size"])
        _positive(self.checkpoint, "checkpoint", ["keep"])
        _non_negative(self.train, "train", ["micro_batch_size", "threads", "eval_every", "mtp_weight", "expert_bias_rate"])
        _non_negative(self.rollout, "rollout", ["micro_batch_size", "top_k"])
        _non_negative(self.eval, "eval", ["max_new_tokens", "max_questions"])
        _non_negative(self.optim, "optim", ["lr", "warmup_steps", "weight_decay", "grad_clip"])
        _non_negative(self.algo, "algo", ["eps_low", "ref_refresh_every"])
        _non_negative(self.checkpoint, "checkpoint", ["every"])
        if self.train.epochs is not None and self.train.epochs <= 0:
            raise ValueError(f"train.epochs={self.train.epochs} must be > 0 (or null to use train.steps)")
        if not 0 <= self.optim.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio={self.optim.min_lr_ratio} must be in [0, 1]")
        if len(self.optim.betas) != 2 or not all(0 <= b < 1 for b in self.optim.betas):
            raise ValueError(f"optim.betas={self.optim.betas} must be two numbers in [0, 1)")
        for key in self.checkpoint.allow_config_change:
            if not _is_config_key(self, key):
                raise ValueError(f"checkpoint.allow_config_change: {key!r} is not a config key or section "
                                 f"(e.g. train.steps, logging)")
        if self.algo.eps_high is not None and self.algo.eps_high < self.algo.eps_low:
            raise ValueError(f"algo.eps_high={self.algo.eps_high} must be >= algo.eps_low={self.algo.eps_low}")
        if self.algo.num_minibatches < 1 or self.train.batch_size % self.algo.num_minibatches:
            raise ValueError(f"algo.num_minibatches={self.algo.num_minibatches} must divide "
                             f"train.batch_size={self.train.batch_size}")
        for name, sched in (("rollout.max_new_tokens_schedule", self.rollout.max_new_tokens_schedule),
                            ("data.train_schedule", self.data.train_schedule)):
            if sched and self.stage != "grpo":
                raise ValueError(f"{name} is set but stage={self.stage!r}: schedules apply to grpo only")
            for step, value in sched.items():
                if not 2 <= int(step) <= self.train.steps:
                    raise ValueError(f"{name}: step {step} has no effect: it must be in 2..train.steps="
                                     f"{self.train.steps} (step 1 is the recipe's own value)")
                if name.startswith("rollout") and int(value) <= 0:
                    raise ValueError(f"{name}.{step}={value} must be > 0")
        for model_key, weight_key in (("reward_model", "reward_model_weight"), ("safety_model", "safety_model_weight")):
            if getattr(self.rewards, model_key) is None and getattr(self.rewards, weight_key) != 1.0:
                raise ValueError(f"rewards.{weight_key}={getattr(self.rewards, weight_key)} has no effect without "
                                 f"rewards.{model_key}")
        if self.rm != RMSection() and self.stage != "rm":
            raise ValueError(f"rm.kind={self.rm.kind!r} is set but stage={self.stage!r}: it applies to `r1moe rm` only")
        if self.rollout.engine != "sglang" and self.rollout.sglang != SGLangSection():
            changed = [f"rollout.sglang.{f.name}" for f in dataclasses.fields(SGLangSection)
                       if getattr(self.rollout.sglang, f.name) != getattr(SGLangSection(), f.name)]
            raise ValueError(f"{', '.join(changed)} set but rollout.engine={self.rollout.engine!r}: the SGLang "
                             f"settings only apply with rollout.engine=sglang")
        _check_data_format(self)
        if self.algo.beta < 0:
            raise ValueError(f"algo.beta={self.algo.beta} must be >= 0")
        for name, w in self.rewards.weights.items():
            if not isinstance(w, (int, float)):
                raise ValueError(f"rewards.weights.{name}={w!r} must be a number")  # noqa: TRY004 -- a recipe error

    @property
    def run_dir(self) -> Path:
        return Path(self.logging.run_dir)


def _check_data_format(cfg: JobConfig) -> None:
    d = cfg.data
    if d.format == "jsonl":
        if d.blend:
            raise ValueError("data.blend is set but data.format=jsonl: blending reads indexed datasets only; set "
                             "data.format=indexed")
        return
    if cfg.stage not in ("pretrain", "sft"):
        raise ValueError(f"data.format=indexed: only pretrain and sft read indexed datasets; {cfg.stage} reads JSONL")
    if d.blend and d.train is not None:
        raise ValueError(f"data.train={d.train} and data.blend are both set; name the datasets in data.blend only")
    for prefix, w in d.blend.items():
        if not w > 0:
            raise ValueError(f"data.blend.{prefix}={w} must be > 0")


def _positive(section: Any, prefix: str, names: list[str]) -> None:
    for n in names:
        if getattr(section, n) <= 0:
            raise ValueError(f"{prefix}.{n}={getattr(section, n)} must be > 0")


def _non_negative(section: Any, prefix: str, names: list[str]) -> None:
    for n in names:
        if getattr(section, n) < 0:
            raise ValueError(f"{prefix}.{n}={getattr(section, n)} must be >= 0")


def _finite(node: Any, prefix: str) -> None:
    """Every float in the tree is finite: inf/nan (`optim.lr=inf` parses as a float) is an error naming the key."""
    items = ([(f.name, getattr(node, f.name)) for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node)
             else list(node.items()) if isinstance(node, dict) else list(enumerate(node)))
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{key}={v} must be a finite number")
        if dataclasses.is_dataclass(v) or isinstance(v, (dict, list)):
            _finite(v, key)


def _is_config_key(cfg: Any, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if dataclasses.is_dataclass(node) and part in {f.name for f in dataclasses.fields(node)}:
            node = getattr(node, part)
        else:
            return isinstance(node, dict)  # model.overrides.*, rewards.weights.*: free-form keys
    return True


def load_config(recipe: str | Path | None, overrides: list[str] | None = None, stage: str | None = None) -> JobConfig:
    """Recipe YAML + `key=value` overrides -> JobConfig. Errors name the file and the key. `stage`: the run's stage
    (`r1moe STAGE`, a pipeline stage of that kind); a recipe or override naming another is an error, not replaced in
    silence (`r1moe pretrain sft.yaml`)."""
    base = OmegaConf.structured(JobConfig)
    layers = [base]
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise FileNotFoundError(f"recipe not found: {path}")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as e:  # noqa: BLE001 -- yaml's and omegaconf's errors both; they carry line numbers
            raise ValueError(f"{path}: invalid YAML: {e}") from None
        if not OmegaConf.is_dict(layers[-1]) or not layers[-1]:
            raise ValueError(f"{path}: a recipe is a mapping of config sections (model:, data:, ...); this file holds "
                             f"{'nothing' if not layers[-1] else 'a list'}")
    if stage is not None:
        said = [(f"{recipe}: stage", layers[-1].get("stage"))] if recipe is not None else []
        said += [("override stage", o.split("=", 1)[1].strip()) for o in overrides or []
                 if o.split("=", 1)[0].strip() == "stage"]
        for where, value in said:
            if value is not None and value != stage:
                raise ValueError(f"{where}={value!r}, but this runs the {stage} stage: run it with `r1moe {value}` "
                                 f"(or as a pipeline stage of kind {value}), or fix the recipe")
        overrides = [*(overrides or []), f"stage={stage}"]
    try:
        merged = OmegaConf.merge(*layers)
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
            merged = OmegaConf.merge(merged, layers[-1])
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        where = f"{recipe}: " if recipe else ""
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ValueError(f"{where}bad config key {key!r}: {msg}") from None
    _check_steps_or_epochs(cfg, recipe, layers[1:])
    return cfg


EPOCH_STAGES = ("pretrain", "sft", "rm")
"""Stages whose length train.epochs can set; GRPO counts rollout steps only."""


def _check_steps_or_epochs(cfg: JobConfig, recipe: str | Path | None, layers: list[Any]) -> None:
    """A step count that would have no effect is an error: train.steps next to train.epochs, or train.epochs on a
    stage that does not read it. `layers` are the recipe and the overrides, as given."""

    def source(key: str) -> str | None:
        found = None
        for layer, name in zip(layers, ["recipe " + str(recipe)] * (recipe is not None) + ["override"]):
            if OmegaConf.select(layer, key, default=_UNSET) is not _UNSET:
                found = name
        return found

    epochs, steps = cfg.train.epochs, cfg.train.steps
    if epochs is None:
        return
    if cfg.stage not in EPOCH_STAGES:
        raise ValueError(f"train.epochs={epochs} ({source('train.epochs')}) has no effect on a {cfg.stage} run, "
                         f"whose length is train.steps; drop it")
    if (where := source("train.steps")) is not None:
        raise ValueError(f"train.steps={steps} ({where}) has no effect: train.epochs={epochs} "
                         f"({source('train.epochs')}) sets the number of steps; set one of them "
                         f"(add train.epochs=null to count steps instead)")


_UNSET = object()


def save_config(cfg: JobConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically) — a run directory starts with it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
