"""`r1moe pipeline`: stages run in order, complete stages are skipped on a re-run, a missing previous output is an
error naming it (and complete outputs are never overwritten), the report states the paper's claims as measured;
with jobs > 1 independent stages run at once in processes of their own, and a failed one stops the pipeline."""

import json
from pathlib import Path

import pytest
import yaml

from r1moe import cli
from r1moe.pipeline import run_pipeline, stage_dependencies
from r1moe.report import check_claims
from r1moe.stages import load_pipeline
from r1moe.train.rundir import DONE_FILE


def _write(path, obj):
    path.write_text(yaml.safe_dump(obj))
    return str(path)


@pytest.fixture
def tiny_pipeline(tmp_path):
    root = tmp_path / "root"
    common = {"logging": {"wandb": "disabled", "plots": True}, "train": {"log_every": 1}}
    pre = _write(tmp_path / "pre.yaml", {**common, "name": "p", "stage": "pretrain", "model": {"preset": "tiny-moe"},
                                          "data": {"train": f"{root}/data/corpus.jsonl", "seq_len": 256},
                                          "train": {"steps": 2, "batch_size": 2},
                                          "logging": {"run_dir": f"{root}/pretrain", "wandb": "disabled"}})
    rl = _write(tmp_path / "rl.yaml", {"name": "g", "stage": "grpo", "model": {"init": f"{root}/pretrain/final"},
                                        "data": {"train": f"{root}/data/train.jsonl", "max_prompt_tokens": 160},
                                        "train": {"steps": 1, "batch_size": 2},
                                        "rollout": {"group_size": 2, "max_new_tokens": 8},
                                        "logging": {"run_dir": f"{root}/grpo", "wandb": "disabled"}})
    spec = {"name": "t", "root": str(root),
            "report": {"eval_stage": "eval", "stage1": "base", "stage2": "grpo"},
            "stages": [
                {"name": "data", "kind": "data", "make": [
                    {"what": "prompts", "task": "arithmetic", "n": 16, "seed": 0, "out": "train.jsonl"},
                    {"what": "prompts", "task": "arithmetic", "n": 3, "seed": 1, "out": "eval.jsonl"},
                    {"what": "corpus", "task": "arithmetic", "n": 40, "seeds": [2], "out": "corpus.jsonl"}]},
                {"name": "pretrain", "kind": "pretrain", "recipe": pre},
                {"name": "grpo", "kind": "grpo", "recipe": rl},
                {"name": "eval", "kind": "eval", "eval": {
                    "checkpoints": {"base": f"{root}/pretrain/final", "grpo": f"{root}/grpo/final"},
                    "data": f"{root}/data/eval.jsonl", "samples": 2, "max_new_tokens": 8}},
                {"name": "report", "kind": "report"}]}
    return _write(tmp_path / "pipe.yaml", spec), root


def test_pipeline_runs_then_skips_complete_stages(tiny_pipeline, capsys):
    recipe, root = tiny_pipeline
    assert cli.main(["pipeline", recipe]) == 0
    for stage in ("data", "pretrain", "grpo", "eval", "report"):
        assert (root / stage / DONE_FILE).is_file(), stage
    report = (root / "report" / "report.md").read_text()
    assert "| base |" in report and "| grpo |" in report and "cons@K > pass@1" in report
    assert (root / "report" / "grpo_response_length.png").is_file()
    results = json.loads((root / "eval" / "results.json").read_text())
    assert set(results) == {"base", "grpo"}
    before = (root / "grpo" / "final" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(["pipeline", recipe]) == 0
    out = capsys.readouterr().out
    assert out.count("), skipped") == 5
    assert (root / "grpo" / "final" / "model.safetensors").stat().st_mtime_ns == before


def test_stage_with_missing_previous_output_fails_naming_it(tiny_pipeline, capsys):
    recipe, root = tiny_pipeline
    p = load_pipeline(recipe)
    p.stages = [s for s in p.stages if s.name in ("data", "grpo")]  # pretrain never ran
    with pytest.raises(FileNotFoundError, match="pretrain/final"):
        run_pipeline(p)
    assert not (root / "grpo" / DONE_FILE).exists()


def test_stage_dependencies_are_the_stages_whose_outputs_a_stage_reads():
    deps = stage_dependencies(load_pipeline("recipes/tiny/r1.yaml"))
    assert deps["base"] == deps["student_base"] == {"data"}  # the tokenizer comes from the data stage
    assert deps["zero"] == deps["stage1"] == {"base", "data"}
    assert deps["stage2"] == {"data", "stage1"}
    assert deps["stage3"] == {"base", "rejection"}
    assert deps["stage4"] == {"data", "rm", "stage3"}
    assert deps["student_distilled"] == {"rejection", "student_base"}
    # each checkpoint's eval waits for that checkpoint only
    assert deps["eval_base"] == {"base", "data"} and deps["eval_stage4"] == {"stage4", "data"}
    assert deps["report"] == set(deps) - {"report"}


def test_data_stage_tokenizer_is_the_one_pretraining_builds(tmp_path):
    """`what: tokenizer` writes the tokenizer the pretrain stage would build from the same corpus and template, so a
    base model and a student can start from it at once; a missing corpus is an error naming it."""
    from r1moe.data.tokenizer import load_tokenizer
    from r1moe.pipeline import make_data
    from r1moe.stages import DataSpec
    from r1moe.train.pretrain import read_corpus, tiny_tokenizer_for

    make_data(DataSpec(what="corpus", task="arithmetic", n=60, seeds=[2], template_rate=0.5, out="c.jsonl"), tmp_path)
    path = make_data(DataSpec(what="tokenizer", corpus="c.jsonl", template="r1_zero", vocab_size=400, out="tok"),
                     tmp_path)
    built = tiny_tokenizer_for(read_corpus(tmp_path / "c.jsonl", "r1_zero"), 400)
    loaded = load_tokenizer(path)
    assert loaded.get_vocab() == built.get_vocab() and len(built.get_vocab()) == 400
    text = "<think>\nWe need to compute 12 * 3 + 4.\n12 * 3 = 36\n</think>"
    assert loaded.encode(text).ids == built.encode(text).ids
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        make_data(DataSpec(what="tokenizer", corpus="missing.jsonl", out="tok2"), tmp_path)
    bad = _write(tmp_path / "p.yaml", {"name": "x", "stages": [{"name": "d", "kind": "data", "make": [
        {"what": "tokenizer", "out": "tok"}]}]})
    with pytest.raises(ValueError, match="needs `corpus`"):
        load_pipeline(bad)


def test_data_entry_key_its_kind_does_not_read_is_an_error(tmp_path):
    """A data entry's key that its `what` ignores (french_rate on prompts, a tokenizer's vocab_size on a corpus) stops
    the recipe at load, naming the stage, the entry and the key, instead of doing nothing."""
    for entry, key in (({"what": "prompts", "task": "digits", "n": 5, "french_rate": 0.3, "out": "p.jsonl"},
                        "french_rate"),
                       ({"what": "corpus", "task": "digits", "n": 5, "vocab_size": 300, "out": "c.jsonl"}, "vocab_size"),
                       ({"what": "general", "n": 5, "seed": 1, "task": "digits", "out": "g.jsonl"}, "task")):
        bad = _write(tmp_path / "p.yaml", {"name": "x", "stages": [{"name": "d", "kind": "data", "make": [entry]}]})
        with pytest.raises(ValueError, match=f"stage 'd', data entry '{entry['out']}': {key} has no effect"):
            load_pipeline(bad)


def test_stage_key_its_kind_does_not_read_is_an_error(tmp_path):
    """A stage's key its kind never reads (a recipe on a data stage, `make:` on a pretrain stage) and a pipeline
    without stages are errors at load, naming the stage and the key."""
    make = [{"what": "prompts", "task": "digits", "n": 5, "out": "p.jsonl"}]
    for stage, key in (({"name": "d", "kind": "data", "make": make, "recipe": "recipes/tiny/r1_zero/pretrain.yaml"},
                        "recipe"),
                       ({"name": "d", "kind": "data", "make": make, "overrides": ["train.steps=2"]}, "overrides"),
                       ({"name": "p", "kind": "pretrain", "recipe": "recipes/tiny/r1_zero/pretrain.yaml",
                         "make": make}, "make"),
                       ({"name": "r", "kind": "report", "overrides": ["x=1"]}, "overrides")):
        bad = _write(tmp_path / "p.yaml", {"name": "x", "stages": [stage]})
        with pytest.raises(ValueError, match=f"stage '{stage['name']}': {key} has no effect on a stage of kind"):
            load_pipeline(bad)
    with pytest.raises(ValueError, match="no stages"):
        load_pipeline(_write(tmp_path / "empty.yaml", {"name": "x"}))


def test_a_stage_recipe_of_another_kind_is_an_error(tmp_path):
    """`kind: pretrain` with an SFT recipe would run the recipe as pretraining: the recipe's stage must agree."""
    from r1moe.pipeline import _spec_of

    spec = load_pipeline(_write(tmp_path / "p.yaml", {"name": "x", "stages": [
        {"name": "p", "kind": "pretrain", "recipe": "recipes/tiny/r1/stage1_cold_start.yaml"}]}))
    with pytest.raises(ValueError, match="stage='sft', but this runs the pretrain stage"):
        _spec_of(spec.stages[0])


def test_report_reads_several_eval_stages(tiny_pipeline):
    """Each checkpoint evaluated by a stage of its own (`report.eval_stage: a, b`): the report reads them together;
    a name that is no eval stage is an error when the recipe loads, a label two stages share when the report runs."""
    from r1moe.report import read_eval_results

    recipe, root = tiny_pipeline
    spec = yaml.safe_load(Path(recipe).read_text())
    ev = spec["stages"][3]
    spec["stages"][3:4] = [{"name": "eval_base", "kind": "eval", "eval": {**ev["eval"], "checkpoints": {
                               "base": ev["eval"]["checkpoints"]["base"]}}},
                           {"name": "eval_grpo", "kind": "eval", "eval": {**ev["eval"], "checkpoints": {
                               "grpo": ev["eval"]["checkpoints"]["grpo"]}}}]
    spec["report"]["eval_stage"] = "eval_base, eval_grpo"
    assert cli.main(["pipeline", _write(root.parent / "split.yaml", spec)]) == 0
    report = (root / "report" / "report.md").read_text()
    assert "| base |" in report and "| grpo |" in report
    p = load_pipeline(root.parent / "split.yaml")
    assert set(read_eval_results(p)) == {"base", "grpo"}
    p.report["eval_stage"] = "eval_base, eval_base"
    with pytest.raises(ValueError, match="'base' is evaluated by both"):
        read_eval_results(p)
    spec["report"]["eval_stage"] = "eval_base, pretrain"
    with pytest.raises(ValueError, match="'pretrain', which is not an eval stage"):
        load_pipeline(_write(root.parent / "bad.yaml", spec))


def test_jobs_run_independent_stages_at_once(tiny_pipeline):
    """Two GRPO runs from one base model run at the same time; eval with two workers gives one worker's results."""
    recipe, root = tiny_pipeline
    spec = yaml.safe_load(Path(recipe).read_text())
    rl2 = yaml.safe_load(Path(spec["stages"][2]["recipe"]).read_text())
    rl2["logging"]["run_dir"] = f"{root}/grpo2"
    spec["stages"].insert(3, {"name": "grpo2", "kind": "grpo", "recipe": _write(root.parent / "rl2.yaml", rl2)})
    spec["stages"][4]["eval"]["workers"] = 2
    spec["jobs"] = 2
    recipe = _write(root.parent / "pipe_jobs.yaml", spec)
    assert cli.main(["pipeline", recipe]) == 0
    t = json.loads((root / "pipeline_timings.json").read_text())
    assert t["grpo2"]["started_s"] < t["grpo"]["ended_s"] and t["grpo"]["started_s"] < t["grpo2"]["ended_s"]  # overlap
    assert t["grpo"]["started_s"] >= t["pretrain"]["ended_s"]  # after its base model
    for stage in ("data", "pretrain", "grpo", "grpo2", "eval", "report"):
        assert (root / stage / DONE_FILE).is_file(), stage
        assert (root / "logs" / f"{stage}.log").is_file(), stage
    from r1moe.stages import EvalSpec
    from r1moe.train.eval import run_eval

    one = EvalSpec(**{**spec["stages"][4]["eval"], "workers": 1})
    (root.parent / "eval1").mkdir()
    run_eval(one, root.parent / "eval1")
    assert json.loads((root.parent / "eval1" / "results.json").read_text()) == \
        json.loads((root / "eval" / "results.json").read_text())


def test_jobs_a_failed_stage_stops_the_pipeline_with_its_status(tiny_pipeline, capsys):
    recipe, root = tiny_pipeline
    spec = yaml.safe_load(Path(recipe).read_text())
    pre = yaml.safe_load(Path(spec["stages"][1]["recipe"]).read_text())
    pre["data"]["train"] = f"{root}/data/missing.jsonl"
    _write(Path(spec["stages"][1]["recipe"]), pre)
    assert cli.main(["pipeline", recipe, "--jobs", "2"]) == 2
    err = capsys.readouterr().err
    assert "stage 'pretrain' failed (exit status 2)" in err and "missing.jsonl" in err
    assert (root / "data" / DONE_FILE).is_file() and not (root / "grpo").exists()


def test_unknown_pipeline_key_and_force_name(tmp_path, capsys):
    bad = _write(tmp_path / "bad.yaml", {"name": "x", "stages": [{"name": "a", "kind": "data", "mkae": []}]})
    assert cli.main(["pipeline", bad]) == 2
    assert "mkae" in capsys.readouterr().err


def _claims(results, roles):
    return {c.split(":")[0]: (v, e) for c, v, e in check_claims(results, roles)}


ROLES = {"base": "b", "zero": "z", "zero_language": "zl", "stage1": "s1", "stage2": "s2", "stage3": "s3",
         "stage4": "s4", "distilled": "d", "student_rl": "r"}


def test_claims_are_measured_not_assumed():
    results = {"s1": {"pass@1": 0.5, "cons@4": 0.6}, "s2": {"pass@1": 0.4, "cons@4": 0.3},
               "d": {"pass@1": 0.3, "cons@4": 0.3}, "r": {"pass@1": 0.35, "cons@4": 0.4}}
    claims = {c: v for c, (v, _) in _claims(results, {"stage1": "s1", "stage2": "s2", "distilled": "d",
                                                       "student_rl": "r"}).items()}
    assert claims["reasoning RL improves on its starting checkpoint"] == "FAIL"
    assert claims["majority vote helps (Table 2)"] == "FAIL"  # s2 has cons < pass@1
    assert claims["distillation beats RL on the small student at equal steps (Table 6)"] == "FAIL"
    assert claims["RL on the base raises accuracy (R1-Zero, Fig. 2)"] == "NOT MEASURED"  # no base, no R1-Zero run


def test_claims_within_two_standard_errors_are_reported_as_noise():
    """100 questions: SE(pass@1 = 0.15) <= sqrt(0.15 * 0.85 / 100) = 3.6 points, so 15.1 vs 14.9 decides nothing,
    while 40 vs 15 does."""
    def m(p, cons, language=1.0, fmt=0.9, n=100):
        return {"pass@1": p, "cons@8": cons, "language_consistency": language, "format_rate": fmt,
                "num_questions": n}

    close = _claims({"b": m(0.15, 0.15), "z": m(0.151, 0.15, 0.7), "zl": m(0.149, 0.15, 0.72),
                     "s1": m(0.149, 0.18), "s2": m(0.151, 0.14), "s3": m(0.15, 0.15), "s4": m(0.15, 0.15),
                     "d": m(0.08, 0.08), "r": m(0.091, 0.13)}, ROLES)
    assert close["reasoning RL improves on its starting checkpoint"][0] == "WITHIN NOISE"
    assert "2 SE = 10.1" in close["reasoning RL improves on its starting checkpoint"][1]  # 2 * sqrt(2 * 0.15*0.85/100)
    assert close["majority vote helps (Table 2)"][0] == "WITHIN NOISE"
    assert close["distillation beats RL on the small student at equal steps (Table 6)"][0] == "WITHIN NOISE"
    assert close["no R1 stage falls below the base"][0] == "WITHIN NOISE"
    assert close["the language-consistency reward fixes language mixing"][0] == "WITHIN NOISE"
    assert close["... at a small cost"][0] == "PASS"  # accuracy not below beyond noise
    assert close["cold start + RL is more readable than RL alone"][0] == "PASS"  # 100 vs 70: far beyond noise
    clear = _claims({k: m(p, c, lang, f, n=1000) for k, (p, c, lang, f) in {
        "b": (0.10, 0.2, 0.7, 0.6), "z": (0.25, 0.35, 0.6, 0.6), "zl": (0.25, 0.35, 0.95, 0.6),
        "s1": (0.30, 0.4, 1.0, 0.9), "s2": (0.40, 0.5, 1.0, 0.9), "s3": (0.50, 0.6, 1.0, 0.9),
        "s4": (0.6, 0.7, 1.0, 0.9), "d": (0.30, 0.4, 1.0, 0.9), "r": (0.10, 0.2, 1.0, 0.9)}.items()}, ROLES)
    assert {v for v, _ in clear.values()} == {"PASS"}
    worse = _claims({"b": m(0.40, 0.5), "z": m(0.45, 0.6), "zl": m(0.2, 0.3, 1.0), "s1": m(0.40, 0.5),
                     "s2": m(0.45, 0.6), "s3": m(0.2, 0.3), "s4": m(0.2, 0.3), "d": m(0.3, 0.4),
                     "r": m(0.3, 0.4)}, ROLES)
    assert worse["rejection sampling + SFT keeps improving"][0] == "FAIL"
    assert worse["no R1 stage falls below the base"][0] == "FAIL"
    assert worse["... at a small cost"][0] == "FAIL"
    assert worse["cold start + RL is more readable than RL alone"][0] == "WITHIN NOISE"  # 100% vs 100%: SE 0

def test_language_ablation_roles_and_report_keys_are_checked(tmp_path, tiny_pipeline):
    """`language_control` / `language_reward` name the language reward's ablation (e.g. a student whose base mixes
    languages) apart from R1-Zero; a report key that is no role, or a role naming no evaluated label, is an error when
    the recipe loads (it would silently leave its claims NOT MEASURED)."""
    def m(p, language):
        return {"pass@1": p, "cons@8": p, "language_consistency": language, "format_rate": 0.9, "num_questions": 1000}

    res = {"z": m(0.3, 1.0), "zl": m(0.3, 1.0), "c": m(0.10, 0.6), "l": m(0.11, 0.95)}
    claims = _claims(res, {"zero": "z", "zero_language": "zl", "language_control": "c", "language_reward": "l"})
    assert claims["the language-consistency reward fixes language mixing"][0] == "PASS"  # 95 vs 60, not 100 vs 100
    assert "with the reward 95.0 vs without 60.0" in claims["the language-consistency reward fixes language mixing"][1]
    recipe, _ = tiny_pipeline
    spec = yaml.safe_load(Path(recipe).read_text())
    for report, message in (({"eval_stage": "eval", "zer0": "base"}, "report.zer0 is not a report key"),
                            ({"eval_stage": "eval", "zero": "grpo_typo"}, "report.zero='grpo_typo' is no checkpoint")):
        spec["report"] = report
        with pytest.raises(ValueError, match=message):
            load_pipeline(_write(tmp_path / "bad_report.yaml", spec))


def test_claims_on_the_same_questions_are_compared_question_by_question():
    """500 questions: every question gains 4 points from stage 1 to stage 2. The unpaired bound (2 SE = 5.8 points
    near 30%) cannot tell; paired, every question agrees (SE ~0: PASS). A per-question difference of the same mean
    that is mostly noise stays WITHIN NOISE."""
    n = 500
    ids = [f"q{i}" for i in range(n)]
    base = [(i % 16) / 16 * 0.6 for i in range(n)]  # mean ~0.28

    def m(per_q, cons=None):
        cons = cons if cons is not None else [1.0 if p >= 0.5 else 0.0 for p in per_q]
        return {"pass@1": sum(per_q) / n, "cons@16": sum(cons) / n, "num_questions": n,
                "per_question": {"id": ids, "pass@1": per_q, "cons@16": cons}}

    s1 = m(base)
    s2 = m([p + 0.04 for p in base])
    claims = _claims({"s1": s1, "s2": s2}, {"stage1": "s1", "stage2": "s2"})
    verdict, evidence = claims["reasoning RL improves on its starting checkpoint"]
    assert verdict == "PASS" and "(paired)" in evidence
    noisy = m([p + (0.5 if i % 2 else -0.5) + 0.04 for i, p in enumerate(base)])  # sd 0.5: 2 SE = 4.5
    verdict, evidence = _claims({"s1": s1, "s2": noisy}, {"stage1": "s1", "stage2": "s2"})[
        "reasoning RL improves on its starting checkpoint"]
    assert verdict == "WITHIN NOISE" and "(paired)" in evidence
    # other questions (different ids): no pairing, the unpaired bound
    other = dict(s2, per_question=dict(s2["per_question"], id=[f"x{i}" for i in range(n)]))
    verdict, evidence = _claims({"s1": s1, "s2": other}, {"stage1": "s1", "stage2": "s2"})[
        "reasoning RL improves on its starting checkpoint"]
    assert verdict == "WITHIN NOISE" and "(paired)" not in evidence and "2 SE = 5.8" in evidence
    # cons@K vs pass@1 of one checkpoint: paired over its own questions
    votes = _claims({"s1": m(base, [min(1.0, p + 0.2) for p in base])}, {})["majority vote helps (Table 2)"]
    assert votes[0] == "PASS"
    votes = _claims({"s1": m(base, [max(0.0, p - 0.2) for p in base])}, {})["majority vote helps (Table 2)"]
    assert votes[0] == "FAIL"
