"""Named run presets shared by the CLI's method commands: which model, prompts and reward a run uses.

``cpu``: the course's offline task (the default model answers the opening of a movie review in the chat
format; VADER rewards a positive answer) sized for minutes on a 2-core CPU.
``lab-gpu``: a Hub instruct model, hh-rlhf prompts and a Hub reward
model in bf16. Hub names live here only, so a lab can swap them in one place.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..models import DEFAULT_MODEL


@dataclass(frozen=True)
class Task:
    model: str          # policy: a name of alignlib.models, a Hub id or a local directory
    prompts: str        # "course:<set>" (data/) or "hub:<Hub data set>"
    reward: str         # "sentiment" | "length" | "rm:<reward model name, Hub id or directory>"
    chat: bool          # wrap prompts in the chat template
    eval_prompts: int   # held-out prompts for before/after evaluation


TASKS = {
    "cpu": Task(DEFAULT_MODEL, "course:movie_openings", "sentiment", chat=True, eval_prompts=40),
    "lab-gpu": Task("qwen2.5-0.5b-instruct", "hub:Anthropic/hh-rlhf",
                    "rm:OpenAssistant/reward-model-deberta-v3-large-v2", chat=True, eval_prompts=256),
}


def get_task(preset: str) -> Task:
    if preset not in TASKS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(TASKS)}.")
    return TASKS[preset]
