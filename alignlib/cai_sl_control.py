"""SL-CAI's positive control: a principle the 135M critic *can* revise towards, engraved by the SL stage.

Lecture 05's harmlessness run moves nothing at 135M, so it cannot tell a broken method from a broken link. Here the
same SL-CAI chain (Bai et al. 2022, Sec. 3) runs on a one-principle constitution whose revision SmolLM2 carries out
from three labelled few-shot conversations (``data/constitution/summary``: open with "In short:" and a one-sentence
summary):

    y0 ~ pi(. | x)                        the policy's own answer to a helpful prompt x
    c  = critic(x, y0, critique request)  (skipped with ``direct``)
    y1 = critic(x, y0, c, revision request)
    SFT:  max  sum_t log pi_theta(y1_t | x, y1_<t)     (LoRA; the principle never appears in the training text)

and an oracle the chain never sees (``self_align.summary_first``, a regular expression) scores the base and the
SL model's greedy answers on held-out prompts. The effect is the paired difference of pass rates with its bootstrap
interval. Beside it, the True/False judge is asked the same principle about each (revision, initial answer) pair,
so the lecture shows which link of RL-CAI would break: the critic revises, the judge does not read.

Deviations from the paper, named: the critic is the instruct policy prompted with few-shot conversations (no
format tuning); revisions are direct (no critique: ``direct``); revisions that copy a few-shot revision (ROUGE-L >=
``copy_threshold``), say a sentence twice or loop (``loops``) are dropped before SFT (the paper trains on every
revision);
the policy starts from an instruct model, not a pre-trained one.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

from .cai import Constitution, Critic, critique_and_revise, few_shot_prefix, sft_examples
from .data import DATA_DIR, read_jsonl
from .models import DEFAULT_MODEL
from .utils import PresetMixin, check_count

SUMMARY_DIR = DATA_DIR / "constitution" / "summary"
STAGES = ("sls-answers", "sls-revisions", "sls-sft", "sls-evaluation")
"""The stages ``run`` stores in ``<output>/stages/``, in order."""


def load_summary_constitution(data_dir: str | Path | None = None) -> Constitution:
    """The control's constitution: critique/revision requests, the judge's statement and the few-shot
    conversations, each file in the format of ``data/constitution``'s (a malformed line raises
    ``DataFormatError``)."""
    root = Path(data_dir) if data_dir is not None else SUMMARY_DIR
    return Constitution(
        tuple(read_jsonl(root / "critique_revision.jsonl", ("id", "critique_request", "revision_request"))),
        tuple(read_jsonl(root / "comparison_principles.jsonl", ("id", "principle"))),
        tuple(read_jsonl(root / "few_shot.jsonl", ("id", "prompt", "response", "critique_request", "critique",
                                                   "revision"))))


@dataclass
class SLControlConfig(PresetMixin):
    """``python -m alignlib cai-sl-control``: SL-CAI on the summary-first constitution, scored by a regex."""

    model: str = DEFAULT_MODEL
    """The policy, and (base weights, prompted) the critic and the judge."""
    train_prompts: int = 64
    """Helpful prompts (train split) the policy answers and the critic revises."""
    eval_prompts: int = 40
    """Held-out helpful prompts (test split, 40 there) for the oracle's comparison."""
    max_new_tokens: int = 48
    """Answer length (initial answers and the greedy evaluation)."""
    revision_tokens: int = 64
    """Length of a critique or a revision."""
    temperature: float = 0.7
    """Sampling temperature of the initial answers."""
    few_shot: int = 3
    """Worked conversations in the critic's prefix (the first n of few_shot.jsonl; encoded once)."""
    direct: bool = True
    """Revise without a critique. False critiques first, as the paper's default; at 135M the critiques then copy
    the few-shot critiques and the revisions follow them into the examples' topics (measured on 2026-12-08: 37 of
    64 critiqued revisions copied a few-shot revision), so the control revises directly."""
    rounds: int = 1
    """Critique-revision rounds (SFT then trains on every round's revision: ``cai.sft_examples``)."""
    copy_threshold: float = 0.5
    """Drop a revision whose ROUGE-L with any few-shot revision reaches this (the critic copied an example)."""
    epochs: int = 2
    """Epochs of SL-CAI's supervised fine-tuning (LoRA)."""
    lr: float = 2e-4
    """Its learning rate (AdamW)."""
    batch_size: int = 8
    """Pairs per SFT step."""
    n_boot: int = 2000
    """Bootstrap resamples of the intervals (over held-out prompts)."""
    data_dir: str | None = None
    """The constitution's folder (None: ``data/constitution/summary``)."""
    seed: int = 0
    """Seeds the answers, the LoRA initialisation and SFT."""

    PRESETS = {"cpu": {}, "lab-gpu": dict(model="Qwen/Qwen2.5-7B-Instruct", train_prompts=256, max_new_tokens=256,
                                          revision_tokens=256, epochs=1, lr=2e-5, batch_size=32)}

    def __post_init__(self):
        for name in ("few_shot", "train_prompts", "eval_prompts", "max_new_tokens", "revision_tokens", "rounds",
                     "epochs", "batch_size", "n_boot"):
            check_count(getattr(self, name), name, 1, allow_none=False)
        if not 0 < self.copy_threshold <= 1:
            raise ValueError(f"copy_threshold must be in (0, 1], got {self.copy_threshold}; 1 drops only exact "
                             "copies of a few-shot revision.")


def copied_example(text: str, examples: list[str], threshold: float) -> bool:
    """Whether ``text`` reproduces a few-shot revision: ROUGE-L F >= ``threshold`` with any of ``examples``."""
    from .self_align import rouge_l

    return any(rouge_l(text, e) >= threshold for e in examples)


def loops(text: str, n: int = 3, times: int = 3) -> bool:
    """Whether some run of ``n`` words occurs ``times`` times or more in ``text`` ("list, tuple, list, tuple, ..."):
    the loop a small model falls into inside one sentence, which SFT would teach."""
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return any(grams.count(g) >= times for g in set(grams))


def run(config: SLControlConfig | None = None, out: str | Path | None = None, progress: bool = True,
        stop=None) -> dict:
    """The control end to end, resumable stage by stage (``STAGES``) in ``out`` like ``cai.run_sl``. Returns a
    JSON-ready dict: the revisions and their filter, the judge's reading of the principle on (revision, initial
    answer) pairs, the SFT history, and the oracle's pass rates of the base and the SL model on held-out prompts
    with the paired effect and its interval (``out/control.json`` with ``out``)."""
    import json

    from .cai import _stage_store

    config = config or SLControlConfig()
    with _stage_store(out) as store:
        result = _stages(config, store, progress, stop)
    if out is not None:
        from .training.checkpoint import atomic_write

        atomic_write(Path(out) / "control.json", json.dumps(result, indent=1))
    return result


def _stages(config: SLControlConfig, store, progress: bool, stop) -> dict:
    import dataclasses

    from .data import load_prompts
    from .evaluation import bootstrap_mean, paired_difference
    from .feedback import true_false_judge
    from .generation import generate
    from .models import load_model, reference_mode, with_lora
    from .self_align import _stored_model, has_repeated_sentence, relevance, summary_first
    from .sft import SFTConfig, train_sft

    constitution = load_summary_constitution(config.data_dir)
    base, tok = load_model(config.model, seed=config.seed)
    train = load_prompts("helpful_prompts", "train", config.train_prompts)
    held = load_prompts("helpful_prompts", "test", config.eval_prompts)
    examples = [s["revision"] for s in constitution.few_shot[:config.few_shot]]

    def answers():
        t = time.perf_counter()
        initial = generate(base, tok, train, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                           seed=config.seed).responses
        return {"initial": initial, "seconds": time.perf_counter() - t}

    initial = store.run(STAGES[0], answers, stop)["initial"]

    def revise():
        t = time.perf_counter()
        critic = Critic(base, tok, few_shot_prefix(constitution, config.few_shot),
                        max_new_tokens=config.revision_tokens)
        rows = critique_and_revise(critic, train, initial, constitution, config.rounds, config.direct, config.seed)
        for r in rows:       # the filter before SFT: a copied few-shot revision, or a sentence said twice
            r["copied"] = copied_example(r["final"], examples, config.copy_threshold)
            r["repeats"] = has_repeated_sentence(r["final"]) or loops(r["final"])
        # the judge asked the principle about each (final revision, initial answer): p(True) of each
        judge = true_false_judge(base.eval(), tok)
        statement = constitution.principles[0]["principle"]
        read = judge.prefer_first(train, [r["final"] for r in rows], initial, statement)
        s_rev = [summary_first(r["final"]) for r in rows]
        s_init = [summary_first(a) for a in initial]
        differ = [i for i in range(len(rows)) if s_rev[i] != s_init[i]]
        hits = [float((float(read["p"][i]) > 0.5) == s_rev[i]) for i in differ]
        judge_ci = dataclasses.asdict(bootstrap_mean(hits, n_boot=config.n_boot, seed=config.seed)) if hits else None
        return {"rows": rows, "revisions_follow": sum(s_rev) / len(rows), "initial_follow": sum(s_init) / len(rows),
                "copied": sum(r["copied"] for r in rows), "repeats": sum(r["repeats"] for r in rows),
                "kept": sum(not (r["copied"] or r["repeats"]) for r in rows),
                "judge": {"statement": statement, "pairs": len(differ), "accuracy": judge_ci},
                "seconds": time.perf_counter() - t}

    revised = store.run(STAGES[1], revise, stop)
    data = [ex for r in revised["rows"] if not (r["copied"] or r["repeats"]) for ex in sft_examples(r)]
    if not data:
        raise RuntimeError("every revision copied a few-shot example or repeated a sentence: nothing to fine-tune "
                           "on. Raise --copy-threshold or write few-shot conversations less like the prompts.")

    if store.done(STAGES[2]):
        tuned = store.load(STAGES[2])
        policy = _stored_model(base, store, STAGES[2], lora=True)
    else:
        t = time.perf_counter()
        with store.stage(STAGES[2], result_of=lambda: tuned, stop=stop) as folder:
            policy = with_lora(copy.deepcopy(base))
            history = train_sft(policy, tok, [d["prompt"] for d in data], [d["response"] for d in data],
                                SFTConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                                          seed=config.seed), progress=progress)
            tuned = {"history": history, "pairs": len(data), "seconds": time.perf_counter() - t}
            policy.save_pretrained(folder / "adapter")

    def evaluation():
        t = time.perf_counter()
        policy.eval()
        greedy = dict(max_new_tokens=config.max_new_tokens, do_sample=False)
        with reference_mode(policy):
            before = generate(policy, tok, held, **greedy).responses
        after = generate(policy, tok, held, **greedy).responses
        models = {}
        for name, replies in (("base", before), ("sl_cai", after)):
            hits = [float(summary_first(r)) for r in replies]
            models[name] = {"pass_rate": dataclasses.asdict(bootstrap_mean(hits, n_boot=config.n_boot,
                                                                           seed=config.seed)),
                            "hits": hits, "relevance": [relevance(p, r) for p, r in zip(held, replies)],
                            "words": sum(len(r.split()) for r in replies) / len(replies),
                            "distinct": len({r.strip() for r in replies}) / len(replies), "replies": replies}
        diff = lambda key: dataclasses.asdict(paired_difference(models["sl_cai"][key], models["base"][key],  # noqa
                                                                n_boot=config.n_boot, seed=config.seed))
        return {"prompts": held, "models": models, "effect": diff("hits"), "relevance_effect": diff("relevance"),
                "seconds": time.perf_counter() - t}

    evaluated = store.run(STAGES[3], evaluation, stop)
    effect = evaluated["effect"]
    return {"config": {k: getattr(config, k) for k in config.__dataclass_fields__},
            "oracle": "self_align.summary_first (a regular expression: the answer opens with 'In short:')",
            "effect": effect, "effect_excludes_zero": effect["low"] > 0 or effect["high"] < 0,
            "revisions": revised, "sft": tuned, "evaluation": evaluated,
            "timings": {"revisions_s": revised["seconds"], "sft_s": tuned["seconds"],
                        "evaluation_s": evaluated["seconds"]}}
