"""Cold-start SFT data (DeepSeek-R1 stage 1, v2 §3.2 / B.3): readable chains of thought in the reply format.

R1 collects "thousands" of long-CoT samples from R1-Zero, refined by people; at tiny scale the procedural tasks'
worked solutions play that part. Each SFTSample keeps the raw `prompt` (the SFT loop renders it) and its `response`
is the text that follows `render(template, prompt)` verbatim, `<think>\\n...reasoning...\\n</think>\\n<answer>ANSWER
</answer>` (what `format_reward` accepts); with the chat template the rendered prompt already ends in "<think>\\n", so
the response starts after it. `meta["template"]` records the template.
"""

from __future__ import annotations

from collections.abc import Iterable

from r1moe.data.general import GENERAL_TASKS
from r1moe.data.schema import PromptSample, SFTSample
from r1moe.data.tasks import TASKS
from r1moe.templates import TEMPLATES, format_completion, reply_after


def worked_solution(sample: PromptSample) -> str:
    """The worked solution of a procedural sample (math task or general task)."""
    if sample.task in TASKS:
        return TASKS[sample.task].worked_solution(sample)
    if sample.task in GENERAL_TASKS:
        return GENERAL_TASKS[sample.task].worked_solution(sample)
    known = ", ".join(sorted(TASKS) + sorted(GENERAL_TASKS))
    raise ValueError(f"sample {sample.id}: no worked solution for task {sample.task!r}; known tasks: {known}")


def make_cold_start(samples: Iterable[PromptSample], template: str = "r1_zero") -> list[SFTSample]:
    """One SFT sample per procedural prompt: raw prompt + the worked-solution reply for `template`."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; known templates: {', '.join(sorted(TEMPLATES))}")
    out = []
    for s in samples:
        full = format_completion(worked_solution(s), s.answer)
        out.append(SFTSample(
            prompt=s.prompt, response=reply_after(template, full), id=s.id, kind=s.kind,
            language=s.language,
            meta={"template": template, "task": s.task, "answer": s.answer, "source": "worked_solution"},
        ))
    return out
