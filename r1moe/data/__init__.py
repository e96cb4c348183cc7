"""Data layer: JSONL records and readers, procedural verifiable tasks with seed-disjoint splits, general data and
preference pairs, cold-start SFT data, and the tiny tokenizer."""

from r1moe.data.cold_start import make_cold_start, worked_solution
from r1moe.data.general import GENERAL_TASKS, GeneralTask, make_general, make_preference_pairs
from r1moe.data.schema import (
    KINDS,
    PreferencePair,
    PromptSample,
    SafetySample,
    SFTSample,
    read_pairs,
    read_prompts,
    read_safety,
    read_sft,
    write_jsonl,
)
from r1moe.data.splits import NUM_SPLITS, split_of
from r1moe.data.tasks import TASKS, Task, iter_dataset, make_dataset, parse_number

__all__ = [
    "GENERAL_TASKS",
    "KINDS",
    "NUM_SPLITS",
    "TASKS",
    "GeneralTask",
    "PreferencePair",
    "PromptSample",
    "SFTSample",
    "SafetySample",
    "Task",
    "iter_dataset",
    "make_cold_start",
    "make_dataset",
    "make_general",
    "make_preference_pairs",
    "parse_number",
    "read_pairs",
    "read_prompts",
    "read_safety",
    "read_sft",
    "split_of",
    "worked_solution",
    "write_jsonl",
]
