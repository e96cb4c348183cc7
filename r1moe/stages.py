"""The pipeline recipe's schema (`r1moe pipeline RECIPE`): the stages in order and the spec of each stage that is
not a training run. A training stage (pretrain, sft, grpo, rm) names its own recipe (r1moe.config.JobConfig); a
data stage lists `DataSpec`s; a rejection stage has a `RejectionSpec` (r1moe.train.rejection), an eval stage an
`EvalSpec` (r1moe.train.eval); a report stage reads the pipeline's `report:` keys (r1moe.report).

The specs live here, not in the modules that run them, so a stage module, the pipeline and the report import them
without importing each other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from r1moe.config import SamplingConfig, SGLangSection

T = TypeVar("T")

StageKind = Literal["data", "pretrain", "sft", "grpo", "rm", "rejection", "eval", "report"]


@dataclass
class DataSpec:
    what: Literal["prompts", "corpus", "cold_start", "general", "general_sft", "pairs", "tokenizer"] = "prompts"
    task: str = "arithmetic"
    n: int = 100
    seed: int = 0
    seeds: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6, 7])
    """Splits the pretraining corpus draws from (disjoint from the RL seed 0 and the eval seed 1)."""
    out: str = "data.jsonl"
    """File name inside the stage's output directory (root/<stage name>/); tokenizer: a directory name."""
    difficulty: int = 1
    slip_rate: float = 0.3
    untagged_rate: float = 0.1
    template_rate: float = 0.3
    drill_rate: float = 0.0
    """corpus: fraction of drill records (correct arithmetic steps, one per line; see r1moe/data/corpus.py)."""
    direct_rate: float = 0.0
    """corpus: fraction of solutions that state the answer without working (see r1moe/data/corpus.py)."""
    french_rate: float = 0.0
    """corpus: probability that a line of a solution is in French (language mixing; see r1moe/data/corpus.py)."""
    general_fraction: float = 0.0
    """prompts: this fraction of the n prompts are general (non-reasoning) ones, for all-scenario RL."""
    template: str = "chat"
    """cold_start / general_sft / pairs: the template the responses follow; tokenizer: the template the corpus's
    prompt records are rendered with (the pretraining recipe's data.template)."""
    corpus: str = ""
    """tokenizer: the corpus (an earlier entry's `out`) the tiny BPE tokenizer is trained on, exactly as the pretrain
    stage builds it when it has none (r1moe.train.pretrain.tiny_tokenizer_for). Built here, the stages that need it
    (the base model and a student pretrained with the same tokenizer) can run at the same time."""
    vocab_size: int = 512
    """tokenizer: its vocabulary size (the pretraining recipe's data.tokenizer_vocab_size)."""


DATA_KEYS = {  # what -> the DataSpec keys it reads (besides what / out); any other key set is an error
    "prompts": {"task", "n", "seed", "difficulty", "general_fraction"},
    "corpus": {"task", "n", "seeds", "difficulty", "slip_rate", "untagged_rate", "template_rate", "drill_rate",
               "direct_rate", "french_rate"},
    "cold_start": {"task", "n", "seed", "difficulty", "template"},
    "general": {"n", "seed"},
    "general_sft": {"n", "seed", "template"},
    "pairs": {"n", "seed", "template"},
    "tokenizer": {"corpus", "template", "vocab_size"},
}


def unused_data_keys(spec: DataSpec) -> list[str]:
    """The keys of `spec` set away from their defaults that its `what` does not read."""
    default = DataSpec(what=spec.what)
    return [f.name for f in dataclasses.fields(DataSpec)
            if f.name not in {"what", "out", *DATA_KEYS[spec.what]} and getattr(spec, f.name) != getattr(default, f.name)]


@dataclass
class RejectionSpec(SamplingConfig):
    """Rejection sampling (R1 §2.3.3): N samples per prompt from `checkpoint`, keep correct + readable ones, mix
    with non-reasoning data at `reasoning_ratio`, deduplicate, write JSONL with provenance."""

    SECTION: ClassVar[str] = "rejection"
    checkpoint: str = ""
    prompts: str = ""
    samples_per_prompt: int = 4
    max_new_tokens: int = 128
    template: str = "r1_zero"
    general: str | None = None
    """Non-reasoning SFT records (prompt, response) mixed in."""
    reasoning_ratio: float = 0.75
    """Fraction of reasoning records in the mix (paper: ~600k : ~200k = 0.75)."""
    max_tokens: int = 0
    """Overlong filter: drop responses longer than this many tokens; 0 = only those cut off at max_new_tokens."""
    max_repeat: int = 3
    """Repetition filter: drop responses with a line repeated more than this many times."""
    language: str = "en"
    min_language_consistency: float = 0.99
    max_paragraph_words: int = 300
    """Long-paragraph filter: drop a chain of thought with a paragraph (text between blank lines) of more than this
    many words (a CJK ideograph is one word). The paper names the filter, not a length; 300 is chosen."""
    max_code_blocks: int = 0
    """Code-block filter: drop a chain of thought with more than this many fenced (``` or ~~~) code blocks; 0 drops
    any. Only the chain of thought is checked: a code answer in <answer> is what code prompts ask for."""
    stop: list[str] = field(default_factory=lambda: ["</answer>"])
    seed: int = 0
    engine: Literal["builtin", "sglang"] = "builtin"
    """builtin: one device; sglang: SGLang over `sglang.tp` x `sglang.dp` GPUs of this node."""
    sglang: SGLangSection = field(default_factory=SGLangSection)
    """Only with engine: sglang (set colocate: false: nothing trains next to it)."""
    chunk: int = 64
    """Sequences per engine call, each call seeded by its index (so the records depend on it): larger calls decode
    faster on a CPU, at the cost of memory."""
    shard_samples: int = 4096
    """Samples per shard (a multiple of `chunk`). Each finished shard is kept in out_dir/shards/, so a run that stops is
    resumed shard by shard, and several workers can share the shards."""
    worker: int = 0
    num_workers: int = 1
    """This process generates shards k with k % num_workers == worker (one process per node or per GPU group, same
    out_dir on a shared filesystem); whichever finds every shard done merges them into sft.jsonl."""


@dataclass
class EvalSpec(SamplingConfig):
    SECTION: ClassVar[str] = "eval"
    temperature: float = 0.6
    top_p: float = 0.95
    checkpoints: dict[str, str] = field(default_factory=dict)
    """Label -> HF checkpoint directory."""
    data: str = ""
    benchmark: str | None = None
    """`data` is this benchmark's release file (r1moe.data.benchmarks.BENCHMARKS: its prompt and grader); None =
    our prompts JSONL."""
    contest_dates: list[str] | None = None
    """livecodebench only: [FROM, TO] ISO dates of `contest_date` kept (R1: 2024-08-01, 2025-01-31)."""
    samples: int = 8
    max_new_tokens: int = 128
    chunk: int = 64
    """Sequences generated per engine call (r1moe.evaluate.EvalSettings.chunk): larger batches decode faster on a
    CPU, at the cost of memory."""
    template: str = "r1_zero"
    templates: dict[str, str] = field(default_factory=dict)
    """Per-label template overrides (e.g. R1-Zero checkpoints use r1_zero, R1 stages use chat)."""
    engine: Literal["builtin", "sglang"] = "builtin"
    """builtin: one device; sglang: SGLang over `sglang.tp` x `sglang.dp` GPUs of this node."""
    sglang: SGLangSection = field(default_factory=SGLangSection)
    """Only with engine: sglang (set colocate: false: nothing trains next to it)."""
    workers: int = 1
    """Checkpoints evaluated at once (engine: builtin), each in a process of its own that gets an equal share of
    torch's intra-op threads; the results are those of one worker."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.workers < 1:
            raise ValueError(f"eval.workers={self.workers} must be >= 1")
        if self.workers > 1 and self.engine != "builtin":
            raise ValueError(f"eval.workers={self.workers} applies to engine: builtin (SGLang spreads one checkpoint "
                             f"over sglang.tp x sglang.dp GPUs); set it to 1")


@dataclass
class StageSpec:
    name: str = ""
    kind: StageKind = "data"
    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    make: list[DataSpec] = field(default_factory=list)
    rejection: RejectionSpec | None = None
    eval: EvalSpec | None = None


REPORT_ROLES = ("base", "zero", "zero_language", "language_control", "language_reward", "stage1", "stage2", "stage3",
                "stage4", "distilled", "student_rl")
"""The pipeline's `report:` roles (r1moe.report.check_claims): each names the eval label of the base model, the
R1-Zero run from it (same RL budget as stage 2), that run with the language reward, the language reward's ablation
(`language_control` / `language_reward`: the same RL from a base that mixes languages, without and with the reward;
default: zero / zero_language), the four R1 stages, and the two students (Table 6)."""


def eval_stage_names(report: dict[str, str]) -> list[str]:
    """The eval stages whose results the report reads (`report.eval_stage`, comma-separated; default "eval")."""
    names = [n.strip() for n in report.get("eval_stage", "eval").split(",")]
    if not all(names):
        raise ValueError(f"report.eval_stage={report.get('eval_stage')!r}: an empty stage name")
    return names


@dataclass
class PipelineConfig:
    name: str = "pipeline"
    root: str = "runs/pipeline"
    stages: list[StageSpec] = field(default_factory=list)
    report: dict[str, str] = field(default_factory=dict)
    """Free-form settings for the report stage (see r1moe/report.py)."""
    jobs: int = 1
    """Stages run at once. 1: one after another, in the pipeline's process. N > 1: each stage in a process of its
    own (log: root/logs/<stage>.log), started as soon as the earlier stages it reads from are complete
    (r1moe.pipeline.stage_dependencies), at most N at a time, with 1/N of the cores as torch intra-op threads (a
    training recipe's train.threads, when set, wins)."""

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise ValueError(f"jobs={self.jobs} must be >= 1")


def load_spec(cls: type[T], path: str | Path, overrides: list[str] | None = None, what: str = "recipe") -> T:
    """A spec dataclass from a YAML file (+ key=value overrides); an unknown key or a wrong type is a ValueError
    naming the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        layers = [OmegaConf.structured(cls), OmegaConf.load(path)]
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(OmegaConf.merge(*layers))
    except OmegaConfBaseException as e:
        raise ValueError(f"{path}: bad key {getattr(e, 'full_key', None)!r}: {str(e).splitlines()[0]}") from None


STAGE_KEYS = {"pretrain": ("recipe", "overrides"), "sft": ("recipe", "overrides"), "grpo": ("recipe", "overrides"),
              "rm": ("recipe", "overrides"), "data": ("make",), "rejection": ("rejection",), "eval": ("eval",)}
"""The keys of a pipeline stage each kind reads (besides name and kind); any other one set is an error."""


def load_pipeline(path: str | Path) -> PipelineConfig:
    path = Path(path)
    cfg = load_spec(PipelineConfig, path, what="pipeline recipe")
    if not cfg.stages:
        raise ValueError(f"{path}: no stages: a pipeline recipe lists its stages under `stages:`")
    names = [s.name for s in cfg.stages]
    if len(set(names)) != len(names) or "" in names:
        raise ValueError(f"{path}: stage names must be unique and non-empty, got {names}")
    for s in cfg.stages:
        if s.kind in ("pretrain", "sft", "grpo", "rm") and not s.recipe:
            raise ValueError(f"{path}: stage {s.name!r} ({s.kind}) needs a recipe")
        reads = STAGE_KEYS.get(s.kind, ())
        unused = [f.name for f in dataclasses.fields(s)
                  if f.name not in ("name", "kind", *reads) and getattr(s, f.name)]
        if unused:
            raise ValueError(f"{path}: stage {s.name!r}: {', '.join(unused)} has no effect on a stage of kind "
                             f"{s.kind} (it reads {', '.join(reads) or 'nothing but its name'})")
        for d in s.make:
            if d.what == "tokenizer" and not d.corpus:
                raise ValueError(f"{path}: stage {s.name!r}: a tokenizer entry needs `corpus` (an earlier entry's out)")
            if unused := unused_data_keys(d):
                raise ValueError(f"{path}: stage {s.name!r}, data entry {d.out!r}: {', '.join(unused)} has no effect on "
                                 f"what: {d.what} (it reads {', '.join(sorted(DATA_KEYS[d.what]))})")
        if s.eval is not None and s.eval.benchmark is not None:
            from r1moe.data.benchmarks import check_benchmark_args

            where = f"{path}: stage {s.name!r}"
            check_benchmark_args(s.eval.benchmark, date_pair(where, s.eval.contest_dates), f"{where}: eval")
    unknown = sorted(set(cfg.report) - {"eval_stage", *REPORT_ROLES})
    if unknown:
        raise ValueError(f"{path}: report.{unknown[0]} is not a report key (eval_stage and the roles "
                         f"{', '.join(REPORT_ROLES)})")
    if any(s.kind == "report" for s in cfg.stages):
        stages = {s.name: s for s in cfg.stages}
        labels = set()
        for name in eval_stage_names(cfg.report):
            if name not in stages or stages[name].kind != "eval":
                raise ValueError(f"{path}: report.eval_stage names {name!r}, which is not an eval stage of this "
                                 f"pipeline (eval stages: {[n for n, s in stages.items() if s.kind == 'eval']})")
            labels |= set(stages[name].eval.checkpoints if stages[name].eval else ())
        for role in REPORT_ROLES:
            if role in cfg.report and cfg.report[role] not in labels:
                raise ValueError(f"{path}: report.{role}={cfg.report[role]!r} is no checkpoint label of the report's "
                                 f"eval stages ({', '.join(sorted(labels))})")
    return cfg


def date_pair(where: str, dates: list[str] | None) -> tuple[str, str] | None:
    """eval.contest_dates as (FROM, TO)."""
    if dates is not None and len(dates) != 2:
        raise ValueError(f"{where}: eval.contest_dates={dates} must be [FROM, TO]")
    return (dates[0], dates[1]) if dates is not None else None


def stage_output(p: PipelineConfig, s: StageSpec) -> Path:
    if s.kind in ("pretrain", "sft", "grpo", "rm"):
        from r1moe.config import load_config

        return load_config(s.recipe, s.overrides).run_dir
    return Path(p.root) / s.name
