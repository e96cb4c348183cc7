"""Every recipe under recipes/ loads (pipeline recipes, the ones with a top-level `stages:`, through
r1moe.pipeline.load_pipeline; stage recipes through r1moe.config.load_config) and passes the checks its stage makes
before it runs (r1moe.train.checks.validate; rejection sampling's check_spec), so no recipe here is one its stage
would refuse; a mistyped key is an error naming it;
the real-scale recipes (recipes/deepseek-v3/) carry the numbers the DeepSeek-R1 paper states (../shared
R1-SETTINGS.md), and their megatron layouts fit the model on the allocation their launcher asks for.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from r1moe.config import JobConfig, load_config
from r1moe.stages import load_pipeline
from r1moe.train.checks import validate
from r1moe.train.rejection import check_spec

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
V3 = ROOT / "recipes" / "deepseek-v3"
GPUS_PER_NODE = 8


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def is_pipeline(path: Path) -> bool:
    return "stages" in OmegaConf.load(path)


def stage_recipes(under: Path) -> list[Path]:
    return [p for p in RECIPES if p.is_relative_to(under) and not is_pipeline(p)]


def test_recipes_are_found():
    names = {rel(p) for p in RECIPES}
    assert "recipes/tiny/r1_zero/grpo.yaml" in names
    assert "recipes/deepseek-v3/r1/stage2_reasoning_rl.yaml" in names


@pytest.mark.parametrize("path", RECIPES, ids=rel)
def test_recipe_loads(path):
    if is_pipeline(path):
        p = load_pipeline(path)
        assert p.stages
        for s in p.stages:  # the stage recipes a pipeline names load too
            if s.recipe:
                load_config(ROOT / s.recipe, s.overrides)
    else:
        assert isinstance(load_config(path), JobConfig)


def stage_configs(path: Path) -> list[tuple[str, JobConfig]]:
    """(label, config) of every training stage `path` runs: the recipe itself, or each stage recipe a pipeline names,
    with the pipeline's overrides, as r1moe.pipeline.run_stage loads it."""
    if not is_pipeline(path):
        return [(rel(path), load_config(path))]
    return [(f"{rel(path)}:{s.name}", load_config(ROOT / s.recipe, [*s.overrides, f"stage={s.kind}"]))
            for s in load_pipeline(path).stages if s.recipe]


@pytest.mark.parametrize("path", RECIPES, ids=rel)
def test_recipe_passes_its_stages_pre_run_checks(path):
    for label, cfg in stage_configs(path):
        try:
            validate(cfg)
        except ValueError as e:
            pytest.fail(f"{label}: `r1moe {cfg.stage}` would refuse this recipe: {e}")
    if is_pipeline(path):
        for s in load_pipeline(path).stages:
            if s.kind == "rejection":
                check_spec(s.rejection)


@pytest.mark.parametrize("edit, error", [
    ({"model": {"gradient_checkpointing": True}}, r"model\.gradient_checkpointing=true: no effect on the megatron"),
    ({"train": {"mtp_weight": 0.3}}, r"train\.mtp_weight=0\.3: a reward model trains no MTP loss"),
    ({"parallel": {"backend": "reference"}}, r"parallel\.tp=8, .*: no effect with parallel\.backend=reference"),
    ({"data": {"train": None}}, r"data\.train is required for rm"),
    ({"model": {"init": None}}, r"model\.init is required for rm"),
])
def test_the_recipe_check_catches_a_recipe_its_stage_refuses(tmp_path, edit, error):
    """The rm recipe with a key that would have no effect, or without a required one, fails the check."""
    bad = tmp_path / "rm.yaml"
    OmegaConf.save(OmegaConf.merge(OmegaConf.load(V3 / "r1/rm.yaml"), edit), bad)
    with pytest.raises(ValueError, match=error):
        validate(load_config(bad))


@pytest.mark.parametrize("recipe, override, error", [
    ("deepseek-v3/r1/rm.yaml", "model.gradient_checkpointing=true", "no effect on the megatron reward model"),
    ("tiny/r1/rm.yaml", "parallel.ep=2", r"parallel\.ep=2: no effect with parallel\.backend=reference"),
    ("tiny/r1/stage1_cold_start.yaml", "data.train=null", "data.train is required for sft"),
    ("tiny/r1/stage1_cold_start.yaml", "model.init=null", "sft needs a tokenizer"),
    ("tiny/r1_zero/pretrain.yaml", "data.train=null", "data.train is required for pretrain"),
    ("tiny/r1_zero/grpo.yaml", "data.train=null", "data.train is required for grpo"),
    ("tiny/r1_zero/grpo.yaml", "rewards.weights.lenght=1.0", "unknown reward 'lenght'"),
])
def test_the_stages_refuse_what_the_check_refuses(tmp_path, recipe, override, error):
    """Each stage refuses, before creating its run directory, what the recipe check refuses, with the same error."""
    import importlib

    cfg = load_config(ROOT / "recipes" / recipe, [override, f"logging.run_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=error):
        validate(cfg)
    with pytest.raises(ValueError, match=error):
        importlib.import_module(f"r1moe.train.{cfg.stage}").run(cfg)
    assert not (tmp_path / "run").exists()


def test_mistyped_key_in_a_recipe_names_the_key(tmp_path):
    bad = tmp_path / "stage2.yaml"
    text = (V3 / "r1/stage2_reasoning_rl.yaml").read_text()
    assert "  group_size: 16" in text
    bad.write_text(text.replace("  group_size: 16", "  grup_size: 16"))
    with pytest.raises(ValueError, match=r"rollout\.grup_size"):
        load_config(bad)


def test_mistyped_key_in_a_pipeline_recipe_names_the_key(tmp_path):
    bad = tmp_path / "rejection.yaml"
    text = (V3 / "r1/stage3_rejection.yaml").read_text()
    assert "samples_per_prompt:" in text
    bad.write_text(text.replace("samples_per_prompt:", "sample_per_prompt:"))
    with pytest.raises(ValueError, match="sample_per_prompt"):
        load_pipeline(bad)


def test_mistyped_override_names_the_key():
    with pytest.raises(ValueError, match=r"algo\.bta"):
        load_config(V3 / "r1/stage2_reasoning_rl.yaml", ["algo.bta=0.1"])


# ---------------------------------------------------------------------------------------------- paper numbers
def test_stage2_reasoning_rl_carries_the_paper_numbers():
    cfg = load_config(V3 / "r1/stage2_reasoning_rl.yaml")
    assert cfg.stage == "grpo"
    assert cfg.algo.beta == 0.001
    assert cfg.rollout.group_size == 16
    assert cfg.optim.lr == 3e-6
    assert cfg.algo.eps_low == 10 and cfg.algo.eps_high is None
    assert cfg.rollout.temperature == 1.0
    assert cfg.rollout.max_new_tokens == 32768
    # The paper's step is one update on 32 questions x 16 outputs; a rollout makes 8,192 outputs for 16 mini-batches
    # (1 epoch); the reference becomes the policy every 400 updates. Here train.batch_size is questions per rollout.
    assert cfg.train.batch_size // cfg.algo.num_minibatches == 32
    assert cfg.algo.num_minibatches == 16
    assert cfg.train.batch_size * cfg.rollout.group_size == 8192
    assert cfg.algo.ref_refresh_every * cfg.algo.num_minibatches == 400
    assert cfg.rewards.weights == {"accuracy": 1.0, "format": 1.0, "language": 1.0}
    assert cfg.eval.temperature == 0.6 and cfg.eval.top_p == 0.95


def test_r1_zero_and_stage4_carry_the_paper_numbers():
    zero = load_config(V3 / "r1_zero/grpo.yaml")
    assert zero.data.template == "r1_zero"
    assert zero.rewards.weights == {"accuracy": 1.0, "format": 1.0}
    assert zero.train.steps * zero.algo.num_minibatches == 10400
    s4 = load_config(V3 / "r1/stage4_all_scenario_rl.yaml")
    assert s4.rollout.temperature == 0.7
    assert abs(s4.train.steps * s4.algo.num_minibatches - 1700) < s4.algo.num_minibatches
    assert s4.rewards.reward_model
    for cfg in (zero, s4):
        assert (cfg.optim.lr, cfg.algo.beta, cfg.algo.eps_low, cfg.rollout.group_size) == (3e-6, 0.001, 10, 16)
        assert cfg.train.batch_size * cfg.rollout.group_size == 8192 and cfg.algo.num_minibatches == 16
        assert cfg.algo.ref_refresh_every * cfg.algo.num_minibatches == 400
        assert cfg.rollout.max_new_tokens == 32768


@pytest.mark.parametrize("name", ["stage1_cold_start", "stage3_sft"])
def test_r1_sft_stages_carry_the_paper_numbers(name):
    cfg = load_config(V3 / f"r1/{name}.yaml")
    assert cfg.stage == "sft"
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.min_lr_ratio) == (5e-5, "cosine", 0.1)
    assert cfg.train.batch_size == 128 and cfg.data.seq_len == 32768
    assert 2 <= cfg.train.epochs <= 3
    assert cfg.model.init == "checkpoints/DeepSeek-V3-Base"  # paper: stage 3 also starts from the base model


def test_reward_model_carries_the_paper_numbers_and_says_what_runs():
    cfg = load_config(V3 / "r1/rm.yaml")
    assert cfg.stage == "rm"
    assert (cfg.optim.lr, cfg.train.batch_size, cfg.train.epochs, cfg.data.seq_len) == (6e-6, 256, 1, 8192)
    # `r1moe rm` runs the megatron backend with the other 671B stages' layout, on as many GPUs as they ask for
    assert cfg.parallel.backend == "megatron"
    assert "r1moe/train/megatron_rm.py" in (V3 / "r1/rm.yaml").read_text()
    launcher = (ROOT / "slurm" / LAUNCHER["r1/rm"]).read_text()
    assert re.search(r"^#SBATCH --nodes=64$", launcher, flags=re.MULTILINE)
    assert re.search(r"^#SBATCH --gpus-per-node=8$", launcher, flags=re.MULTILINE)


DISTILL_LR = {"qwen2.5-1.5b": 1e-4, "qwen2.5-7b": 8e-5, "qwen2.5-14b": 7e-5, "qwen2.5-32b": 6e-5,
              "llama3.1-8b": 5e-5, "llama3.3-70b": 2e-5}


@pytest.mark.parametrize("student, lr", DISTILL_LR.items())
def test_distillation_recipes_carry_the_paper_numbers(student, lr):
    cfg = load_config(V3 / f"distill/{student}.yaml")
    assert cfg.stage == "sft" and cfg.model.preset == student
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.min_lr_ratio) == (lr, "cosine", 0.1)
    assert cfg.train.batch_size == 64 and cfg.data.seq_len == 32768 and 2 <= cfg.train.epochs <= 3


def test_every_distillation_recipe_is_tested():
    assert {p.stem for p in (V3 / "distill").glob("*.yaml")} == set(DISTILL_LR)


# ---------------------------------------------------------------------------------------------- layouts
# 61 decoder layers do not split evenly into pp=4 stages; the recipes say which split (r1moe.parallel's
# ParallelConfig.pp_layers) the 671B layout needs, since their `parallel:` section cannot express it yet.
V3_PP_LAYERS = (16, 16, 16, 13)
LAUNCHER = {"r1_zero/grpo": "r1_stage2.sh", "r1/stage1_cold_start": "r1_stage1.sh",
            "r1/stage2_reasoning_rl": "r1_stage2.sh", "r1/stage3_sft": "r1_stage3.sh",
            "r1/stage4_all_scenario_rl": "r1_stage4.sh", "r1/rm": "rm.sh"}


def allocated_gpus(recipe: Path) -> int:
    """GPUs of the job that runs `recipe`: the `sbatch --nodes=N` its header suggests, else its launcher's default."""
    suggested = re.search(r"sbatch --nodes=(\d+)", recipe.read_text())
    if suggested:
        return int(suggested.group(1)) * GPUS_PER_NODE
    key = str(recipe.relative_to(V3).with_suffix(""))
    launcher = (ROOT / "slurm" / LAUNCHER[key]).read_text()
    return int(re.search(r"^#SBATCH --nodes=(\d+)", launcher, flags=re.MULTILINE).group(1)) * GPUS_PER_NODE


def megatron_recipes(under: Path) -> list[Path]:
    return [p for p in stage_recipes(under) if load_config(p).parallel.backend == "megatron"]


def test_every_real_scale_stage_runs_on_megatron():
    others = {rel(p) for p in stage_recipes(V3)} - {rel(p) for p in megatron_recipes(V3)}
    assert others == set()


@pytest.mark.parametrize("path", megatron_recipes(V3), ids=rel)
def test_real_scale_layout_fits_model_and_allocation(path):
    from r1moe.model import get_preset
    from r1moe.parallel.config import ParallelConfig

    cfg = load_config(path)
    assert cfg.model.dtype == "bfloat16" and cfg.model.init
    model = get_preset(cfg.model.preset)
    p = cfg.parallel
    pp_layers = None
    if model.num_hidden_layers % p.pp:
        assert model.num_hidden_layers == 61 and str(list(V3_PP_LAYERS)) in path.read_text()
        pp_layers = V3_PP_LAYERS
    layout = ParallelConfig(tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, cp=p.cp, pp_layers=pp_layers)
    world = allocated_gpus(path)
    layout.validate(model, world_size=world)
    dp = layout.dp(world)
    per_update = (cfg.train.batch_size * cfg.rollout.group_size // cfg.algo.num_minibatches if cfg.stage == "grpo"
                  else cfg.train.batch_size)
    assert per_update % dp == 0, f"{per_update} sequences per update do not split over dp={dp}"
