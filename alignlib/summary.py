"""Every method of the course side by side, from the stored runs (lecture 07).

The stored runs under ``lectures/results`` were made by the CLI on the default model (SmolLM2-135M-Instruct, LoRA,
CPU). This module reads them into one comparison, computing nothing new:

- **the shared sentiment task** (VADER on 40 held-out movie openings, 2 answers each at temperature 0.7, 16 tokens):
  PPO, RRHF and RAFT for 10 steps each over three seeds (``method_bench.json``), and rewarded soups' positive expert
  and the soup between the positive and neutral experts (``soups.json``, one training per expert). Reward,
  perplexity of the answers under the initial model, distinct-2, seconds in training steps and peak memory.
- **the harmlessness and truthfulness evaluations**: Constitutional AI's three stages (``cai_rl.json``) and
  SELF-ALIGN's four models (``self_align.json``), with their bootstrap intervals.
- **the supervision each method consumed** (counted from the course data files) and **the models each one holds or
  samples from** (as implemented in ``alignlib``).

Intervals: over seeds, the mean and the [min, max] of the three seeds; for a single training, a 95% percentile
bootstrap over the held-out prompts (``evaluation.bootstrap_mean``).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "lectures" / "results"

# What each method holds in memory or samples from, as alignlib implements it with LoRA on one base model. The
# reference policy of PPO and the initial model of RRHF are the base with the adapters switched off: roles, not copies.
MODELS = {
    "PPO": ("policy, reference (adapters off), value head on the policy's trunk, reward", 1),
    "RRHF": ("policy, initial model (adapters off, sampled from), reward", 1),
    "RAFT": ("policy (sampled from and fine-tuned), reward", 1),
    "RS soup": ("one PPO run per reward (each as PPO), then the soup: one model at inference", 1),
    "SL-CAI": ("helpful model (the policy with adapters off), critic (format-tuned, merged copy), policy", 2),
    "RL-CAI": ("SL-CAI model (also the judge and PPO's reference), policy, value head, preference model (MiniLM); "
               "the initial model joins for the evaluation", 1),
    "SELF-ALIGN": ("base (writes, answers), engraved copy (teacher of stage 4), verbose-cloned copy", 3),
}


def load(name: str, results: str | Path | None = None) -> dict:
    """One stored result, ``lectures/results/<name>.json``; if it is missing, the error points to the README's
    timing table, which names the command that writes it."""
    path = Path(results or RESULTS) / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the README's timing table names the command that writes "
                                f"{name}.json; or pass results= a directory that has it.")
    return json.loads(path.read_text())


def _seed_cell(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "low": min(values), "high": max(values), "n": len(values)}


def _boot_cell(values: list[float]) -> dict:
    from .evaluation import bootstrap_mean

    ci = bootstrap_mean(values)
    return {"mean": ci.mean, "low": ci.low, "high": ci.high, "n": len(values)}


def _stored_cell(mean: float, interval: list[float], n: int) -> dict:
    return {"mean": mean, "low": interval[0], "high": interval[1], "n": n}


def sentiment_rows(results: str | Path | None = None) -> list[dict]:
    """The shared sentiment task: one row per method with ``reward``, ``ppl`` and ``distinct2`` (each a cell with
    ``mean``, ``low``, ``high``), ``train_s`` (seconds in training steps, rollouts included; the sum over the
    experts for a soup) and ``peak_mb`` (means over seeds; None where not recorded), and ``trainings`` (the training
    runs behind the row)."""
    bench, soups = load("method_bench", results), load("soups", results)
    runs = [bench["runs"][s] for s in sorted(bench["runs"])]
    first = runs[0]["ppo"]
    rows = [{"method": "initial model", "reward": _seed_cell([first["held_out_before"]]),
             "ppl": _seed_cell([first["ppl_before"]]), "distinct2": _seed_cell([first["distinct2_before"]]),
             "train_s": 0.0, "peak_mb": None, "trainings": 0}]
    for m in ("ppo", "rrhf", "raft"):
        rs = [r[m] for r in runs]
        rows.append({"method": m.upper(), "reward": _seed_cell([r["held_out_after"] for r in rs]),
                     "ppl": _seed_cell([r["ppl_after"] for r in rs]),
                     "distinct2": _seed_cell([r["distinct2_after"] for r in rs]),
                     "train_s": statistics.fmean(sum(h["time/step_s"] for h in r["history"]) for r in rs),
                     "peak_mb": statistics.fmean(r["peak_mb"] for r in rs), "trainings": len(rs)})
    pts, trainings = soups["points"], soups["trainings"]
    samples = soups["config"]["samples"]
    for label, name, experts in (("rs:1.0000,0.0000", "RS expert (positive)", ["expert:positive"]),
                                 ("rs:0.5000,0.5000", "RS soup 0.5 positive + 0.5 neutral",
                                  ["expert:positive", "expert:neutral"])):
        per_answer = pts[label]["rewards"]["positive"]
        per_prompt = [statistics.fmean(per_answer[i:i + samples]) for i in range(0, len(per_answer), samples)]
        rows.append({"method": name, "reward": _boot_cell(per_prompt),
                     "neutral": _boot_cell(pts[label]["rewards"]["neutral"]),
                     "ppl": {"mean": pts[label]["ppl"], "low": None, "high": None, "n": 1},
                     "distinct2": {"mean": pts[label]["distinct2"], "low": None, "high": None, "n": 1},
                     "train_s": sum(trainings[e]["seconds"] for e in experts), "peak_mb": None,
                     "trainings": len(experts)})
    return rows


def alignment_rows(results: str | Path | None = None) -> dict:
    """Constitutional AI's stages (harmless and helpful rates by the hand-label-trained scorer) and SELF-ALIGN's models
    (multiple-choice accuracy by p(True), principle adherence), each a cell with ``mean``, ``low``, ``high``."""
    cai, sa = load("cai_rl", results), load("self_align", results)
    scores = cai["evaluation"]["scores"]                               # {axis: {stage: per-prompt scores}}
    out = {"cai": {stage: {axis: dict(cell, n=len(scores[axis][stage])) for axis, cell in rates.items()}
                   for stage, rates in cai["evaluation"]["rates"].items()},
           "self_align": {}}
    for name, ev in sa["evaluation"].items():
        mc, ad = ev["mc_true"], ev["adherence"]
        out["self_align"][name] = {"mc_true": _stored_cell(mc["accuracy"], mc["interval"], len(mc["hits"])),
                                   "adherence": _stored_cell(ad["rate"], ad["interval"], len(ad["labels"]))}
    cai_s = sum(load("cai_sl", results)["timings"].values()) + sum(cai["timings"].values())
    out["wall_s"] = {"SL-CAI + RL-CAI": cai_s, "SELF-ALIGN": sum(sa["timings"].values())}
    return out


def human_supervision() -> list[dict]:
    """What people wrote or labelled for each method's training signal in the course, counted from the data files
    (evaluation sets are not counted: no method trains on them)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from . import cai
    from . import self_align as sa
    from .data import load_course_dataset

    human = cai.CAIConfig.preset("cpu").human_helpful_pairs   # the helpfulness pairs RL-CAI's preference model uses
    lexicon = len(SentimentIntensityAnalyzer().lexicon)
    pairs = len(load_course_dataset("preference_pairs", "train"))
    con = [cai.load_constitution(s) for s in ("train", "test")]
    data = sa.load_self_align()
    return [
        {"method": "PPO / RRHF / RAFT / RS, VADER reward", "labels": 0,
         "written": f"none for the task; VADER's lexicon ({lexicon} entries) was rated by people once, for any task"},
        {"method": "PPO, learned reward model (lecture 01)", "labels": pairs,
         "written": f"{pairs} human preference pairs (half for the proxy, half for the judge)"},
        {"method": "Constitutional AI", "labels": human,
         "written": f"{sum(len(c.critiques) for c in con)} critique/revision pairs, "
                    f"{sum(len(c.principles) for c in con)} comparison principles, "
                    f"{sum(len(c.few_shot) for c in con)} worked examples; {human} human helpfulness pairs, "
                    "no harmlessness labels"},
        {"method": "SELF-ALIGN", "labels": 0,
         "written": f"{len(data.principles)} principles, {len(data.exemplars)} exemplars, {len(data.seeds)} seeds, "
                    f"{len(data.question_types)} question types, 1 verbose prompt"},
    ]
