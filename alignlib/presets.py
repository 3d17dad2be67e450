"""Named run presets shared by the CLI's method commands: which model, prompts and reward a run uses.

``cpu``: the course's offline task (the default model answers the opening of a movie review in the chat
format; VADER rewards a positive answer) sized for minutes on a 2-core CPU. ``lab-gpu``: a Hub instruct model, hh-rlhf prompts and a Hub reward
model in bf16. Hub names live here only, so a lab can swap them in one place.
"""
from __future__ import annotations

from dataclasses import dataclass

from .models import DEFAULT_MODEL


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


def load_task_queries(spec: str, split: str = "train", n: int | None = None) -> list[dict]:
    """Rows with a ``prompt`` and, where the data set has them, ``chosen``/``rejected`` responses (RRHF)."""
    from .data import load_course_dataset, load_hub_dataset
    from .utils import check_count

    check_count(n, "n")                                          # -1 would keep all but the last row
    kind, _, name = spec.partition(":")
    if kind == "course":
        ds = load_course_dataset(name, split)
    elif kind == "hub":
        ds = load_hub_dataset(name, split, n=n)
    else:
        raise ValueError(f"prompts spec {spec!r} must start with 'course:' or 'hub:'.")
    keys = [k for k in ("prompt", "chosen", "rejected") if k in ds.column_names]
    columns = [list(ds[k]) for k in keys]                       # column access: far faster than row iteration
    rows = [dict(zip(keys, values)) for values in zip(*columns)]
    return rows[:n] if n else rows


def load_task_prompts(spec: str, split: str = "train", n: int | None = None) -> list[str]:
    """Prompts named by ``course:<set>`` or ``hub:<data set>``."""
    return [row["prompt"] for row in load_task_queries(spec, split, n)]


def build_reward(spec: str, device=None):
    """A reward function from its name: ``sentiment``, ``length`` or ``rm:<model>``."""
    from .rewards import LengthReward, SentimentReward

    if spec == "sentiment":
        return SentimentReward()
    if spec == "length":
        return LengthReward()
    if spec.startswith("rm:"):
        from .reward_model import as_reward_function, load_reward_model

        model, tokenizer = load_reward_model(spec[3:], device=device)
        return as_reward_function(model, tokenizer)
    raise ValueError(f"unknown reward {spec!r}; use 'sentiment', 'length' or 'rm:<model>'.")
