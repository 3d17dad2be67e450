"""Constitutional AI (Bai et al. 2022, arXiv 2212.08073): a harmless, non-evasive assistant from a constitution.

The only human oversight is a constitution (critique/revision requests, comparison principles) and a few worked
examples. Two stages:

**SL-CAI.** A helpful model answers red-team prompts. A critic reads each answer and writes a critique under a
critique request drawn from the constitution, then a revision under the paired revision request; rounds can repeat
with fresh draws, and *direct revision* skips the critique. The policy is fine-tuned on (prompt, revision) pairs, one
per round as in the paper (``sft_examples``; ``CAIConfig.sl_all_rounds=False``: the final revision only),
mixed with (prompt, answer) pairs on helpful prompts so it stays helpful. Loss falls on the response tokens only, and
nothing of the critique enters the target (``sft_example``).

**RL-CAI (RLAIF).** The SL-CAI model samples two answers per red-team prompt. A feedback model reads each pair as a
multiple-choice question under a drawn comparison principle; its option probabilities in both orders give a soft
label p(first better) (``feedback.soft_labels``). A preference model is fitted on these AI harmlessness labels mixed
with human helpfulness pairs (soft Bradley-Terry, ``reward_model.bradley_terry_loss(target=p)``), and PPO (lecture
01) optimises the policy against it.

At course scale the critic and the judge are 135M-parameter models that cannot follow the few-shot format from
context alone (lecture 05 measures it), so the course adds two adaptations beside the slides' version:

- **format tuning** (``train_critic``): the few-shot conversations, the worked examples the prompt would show,
  are turned into LoRA weights; held-out prompts and critique requests test it;
- **contrastive feedback** (``contrastive_pairs``): two answers to a prompt, one sampled under a harmless system
  prompt and one under a careless one, labelled by construction (as in RLCD, Yang et al. 2023).

The few-shot prefix is encoded once (``PrefixCache``) and its keys and values reused by every request.

The constitution's held-out split (``load_constitution("test")``: every fourth critique request and principle)
serves the evaluations, as lecture 05 says: the revision study critiques under the held-out critique requests, and
the judge's accuracy on hand-labelled pairs is read under the held-out principles; every training step (critiques
for SL-CAI's data, format tuning, AI labels) uses the training split.

Other deviations from the paper that remain: the policy starts from an instruct model (SmolLM2-135M-Instruct), not a
pre-trained helpful-only RLHF model; the critic is the base model format-tuned on the worked examples (above), not the
policy prompted with them; the preference model is a MiniLM encoder, not a pre-trained language model; and
RL-CAI's default labels mix judge readings with contrastive pairs (``feedback="both"``).

``cai-sl`` and ``cai-rl`` share one run directory (``--output``), checked and locked before any model loads. Every
stage (``SL_STAGES``, ``RL_STAGES``) is kept as it finishes, with its adapters and weights
(``checkpoint.StageStore``), so a run stopped by Ctrl-C or SIGTERM (after the running stage), or killed, continues
with ``--resume`` to the result the uninterrupted run gives.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .data import COURSE_SETS, DATA_DIR, read_jsonl
# Elo lives in evaluation; cai.elo_scores (exercise 05's reference), cai.elo_intervals and cai.pairwise_outcomes
# (lecture 05) stay importable from here.
from .evaluation import elo_intervals, elo_scores, pairwise_outcomes  # noqa: F401
from .generation import generate
from .models import DEFAULT_MODEL, load_lora_weights
from .prefix_cache import PrefixCache
from .utils import PresetMixin, check_count

# ---------------------------------------------------------------- the constitution

@dataclass(frozen=True)
class Constitution:
    """Critique/revision request pairs, comparison principles and few-shot critique/revision conversations."""

    critiques: tuple       # dicts: id, critique_request, revision_request
    principles: tuple      # dicts: id, principle
    few_shot: tuple = ()   # dicts: id, prompt, response, critique_request (an id of ``critiques``), critique, revision

    def __post_init__(self):
        if not self.critiques:
            raise ValueError("the constitution has no critique/revision pairs: add rows to "
                             "data/constitution/critique_revision.jsonl (or pass critiques=[...]).")
        if not self.principles:
            raise ValueError("the constitution has no comparison principles: add rows to "
                             "data/constitution/comparison_principles.jsonl (or pass principles=[...]).")
        for i, row in enumerate(self.critiques):
            bad = [k for k in ("id", "critique_request", "revision_request") if not isinstance(row.get(k), str)
                   or not row[k].strip()]
            if bad:
                raise ValueError(f"critiques[{i}] lacks non-empty string fields {bad}.")
        for i, row in enumerate(self.few_shot):
            bad = [k for k in ("prompt", "response", "critique_request", "critique", "revision")
                   if not isinstance(row.get(k), str) or not row[k].strip()]
            if bad:
                raise ValueError(f"few-shot conversation {row.get('id', i)!r} lacks non-empty string fields {bad}.")
            self.pair(row["critique_request"])           # an unknown id raises, naming the known ones

    def pair(self, pair_id: str) -> dict:
        """The critique/revision pair with this id."""
        for row in self.critiques:
            if row["id"] == pair_id:
                return row
        raise ValueError(f"unknown critique request {pair_id!r}; this constitution has "
                         f"{[r['id'] for r in self.critiques]}.")

    def draw_pair(self, rng: random.Random) -> dict:
        return rng.choice(self.critiques)

    def draw_principle(self, rng: random.Random) -> str:
        return rng.choice(self.principles)["principle"]


def load_constitution(split: str | None = "train", data_dir: str | Path | None = None) -> Constitution:
    """The course constitution (``data/constitution``), one split (None: all rows). A malformed file raises
    ``DataFormatError`` naming the file and line."""
    root = Path(data_dir) if data_dir is not None else DATA_DIR
    rows = {}
    for key in ("constitution_critiques", "constitution_principles", "constitution_few_shot"):
        filename, required = COURSE_SETS[key]
        rows[key] = [r for r in read_jsonl(root / filename, required) if split is None or r["split"] == split]
    return Constitution(tuple(rows["constitution_critiques"]), tuple(rows["constitution_principles"]),
                        tuple(rows["constitution_few_shot"]))


# ---------------------------------------------------------------- prompts (plain text, no chat template)
# A conversation, then a critique request and "Critique:", then the critique, a revision request and "Revision:".
# Every section ends with a blank line, so a generated section is cut at the first blank line (``cut_section``).

SECTION_MARKERS = ("Human:", "Assistant:", "Critique request:", "Critique:", "Revision request:", "Revision:")


def conversation(prompt: str, response: str) -> str:
    return f"Human: {prompt.strip()}\n\nAssistant: {response.strip()}\n\n"


def critique_prompt(prompt: str, response: str, pair: dict) -> str:
    """The request for a critique of ``response`` under ``pair``'s critique request; ends at "Critique:"."""
    return conversation(prompt, response) + f"Critique request: {pair['critique_request']}\n\nCritique:"


def revision_prompt(prompt: str, response: str, pair: dict, critique: str) -> str:
    """The critique prompt, the critique, and ``pair``'s revision request; ends at "Revision:"."""
    return (critique_prompt(prompt, response, pair) + f" {critique.strip()}\n\n"
            f"Revision request: {pair['revision_request']}\n\nRevision:")


def direct_revision_prompt(prompt: str, response: str, pair: dict) -> str:
    """Direct revision (no critique): the conversation and the revision request; ends at "Revision:"."""
    return conversation(prompt, response) + f"Revision request: {pair['revision_request']}\n\nRevision:"


def few_shot_prefix(constitution: Constitution, n: int | None = None) -> str:
    """The first ``n`` few-shot conversations (all by default), each critiqued and revised, as one text."""
    shots = constitution.few_shot[:n]
    if not shots:
        raise ValueError("the constitution has no few-shot conversations; add rows to "
                         "data/constitution/few_shot.jsonl or use format tuning without a prefix.")
    return "".join(revision_prompt(s["prompt"], s["response"], constitution.pair(s["critique_request"]), s["critique"])
                   + f" {s['revision'].strip()}\n\n" for s in shots)


def cut_section(text: str) -> str:
    """The generated section alone: cut at the first blank line or at the next section's marker."""
    text = text.strip()
    end = len(text)
    for stop in ["\n\n"] + list(SECTION_MARKERS):
        at = text.find(stop)
        if at != -1:
            end = min(end, at)
    return text[:end].strip()


def sft_example(prompt: str, revisions: Sequence[str]) -> dict:
    """The SL-CAI training pair: the original prompt and the final revision, nothing of the critiques."""
    if not revisions:
        raise ValueError("revisions is empty: critique_and_revise gives at least one per prompt.")
    return {"prompt": prompt.strip(), "response": revisions[-1].strip()}


def sft_examples(row: dict, all_rounds: bool = True) -> list[dict]:
    """SL-CAI's training pairs from one row of ``critique_and_revise``. The paper's recipe (``all_rounds``): one
    pair per (prompt, revision of round k), for every round whose revision is not empty; a row without any revision
    gives one pair with the text it ends with (its initial answer). ``all_rounds=False``: the final revision only
    (``sft_example``), the shortcut the course used before."""
    if not all_rounds:
        return [sft_example(row["prompt"], [x["text"] for x in row["rounds"]] or [row["final"]])]
    revisions = [x["revision"] for x in row["rounds"] if x["revision"] and x["revision"].strip()]
    return [sft_example(row["prompt"], [r]) for r in revisions] or [sft_example(row["prompt"], [row["final"]])]


# ---------------------------------------------------------------- the critic

class Critic:
    """Greedy completions of critique and revision prompts by ``model``, after an optional shared ``prefix``
    (few-shot conversations) whose keys and values are computed once."""

    def __init__(self, model, tokenizer, prefix: str | None = None, max_new_tokens: int = 64):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.cache = PrefixCache(model, tokenizer, prefix) if prefix else None

    def complete(self, prompts: Sequence[str]) -> list[str]:
        """One section per prompt (``cut_section`` of a greedy continuation)."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings.")
        if self.cache is not None:
            return [cut_section(t) for t in self.cache.generate_batch(list(prompts), self.max_new_tokens)]
        out = generate(self.model, self.tokenizer, list(prompts), max_new_tokens=self.max_new_tokens,
                       do_sample=False, chat=False)
        return [cut_section(r) for r in out.responses]


def critique_and_revise(critic: Critic, prompts: Sequence[str], responses: Sequence[str],
                        constitution: Constitution, rounds: int = 1, direct: bool = False, seed: int = 0) -> list[dict]:
    """SL-CAI's data step: ``rounds`` of critique then revision (or direct revision) per (prompt, response).

    Each round draws a fresh critique/revision pair and revises the previous round's revision. A round whose
    revision comes out empty keeps the text it was given (counted in ``empty``). Returns one dict per prompt:
    ``prompt``, ``initial``, ``rounds`` (per round: pair id, critique or None, revision, and ``text``, the answer
    after the round), ``final``, ``empty``.
    """
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"prompts ({len(prompts)}) and responses ({len(responses)}) must be non-empty and of the "
                         "same length.")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}.")
    rng = random.Random(seed)
    rows = [{"prompt": p, "initial": r, "rounds": [], "final": r, "empty": 0} for p, r in zip(prompts, responses)]
    for _ in range(rounds):
        pairs = [constitution.draw_pair(rng) for _ in rows]
        if direct:
            critiques = [None] * len(rows)
            asks = [direct_revision_prompt(r["prompt"], r["final"], pair) for r, pair in zip(rows, pairs)]
        else:
            critiques = critic.complete([critique_prompt(r["prompt"], r["final"], pair)
                                         for r, pair in zip(rows, pairs)])
            asks = [revision_prompt(r["prompt"], r["final"], pair, c) for r, pair, c in zip(rows, pairs, critiques)]
        for row, pair, critique, revision in zip(rows, pairs, critiques, critic.complete(asks)):
            if revision:
                row["final"] = revision
            else:
                row["empty"] += 1
            row["rounds"].append({"pair": pair["id"], "critique": critique, "revision": revision, "text": row["final"]})
    return rows


def revision_study(critic: Critic, prompts: Sequence[str], answers: Sequence[str], constitution: Constitution,
                   scorer: "Scorer", rounds: int = 3, seed: int = 0) -> dict:
    """The slides' Fig. 12 at course scale: the scorer's harmless rate (P(harmful) < 1/2) and mean harmlessness
    1 - P(harmful) of the answers before revision and after each of ``rounds`` revisions, with critiques and
    without (direct revision), on the same prompts and initial answers."""
    out = {}
    for mode, direct in (("critiqued", False), ("direct", True)):
        rows = critique_and_revise(critic, prompts, answers, constitution, rounds, direct, seed)
        texts = [list(answers)] + [[r["rounds"][k]["text"] for r in rows] for k in range(rounds)]
        curve = []
        for k, batch in enumerate(texts):
            harm = scorer.predict(list(prompts), [t.strip() or "(no answer)" for t in batch])["harmful"]
            curve.append({"round": k, "harmless_rate": sum(p < 0.5 for p in harm) / len(harm),
                          "harmlessness": sum(1 - p for p in harm) / len(harm)})
        out[mode] = {"curve": curve, "rows": rows}
    return out


def format_examples(constitution: Constitution) -> tuple[list[str], list[str]]:
    """The few-shot conversations as training pairs for format tuning: each critique prompt -> its critique, each
    revision prompt -> its revision (texts for ``train_sft(chat=False)``; the targets end with a blank line, the
    section's end)."""
    prompts, targets = [], []
    for s in constitution.few_shot:
        pair = constitution.pair(s["critique_request"])
        prompts += [critique_prompt(s["prompt"], s["response"], pair),
                    revision_prompt(s["prompt"], s["response"], pair, s["critique"])]
        targets += [f" {s['critique'].strip()}\n\n", f" {s['revision'].strip()}\n\n"]
    if not prompts:
        raise ValueError("the constitution has no few-shot conversations to tune the format on.")
    return prompts, targets


# ---------------------------------------------------------------- AI feedback

HARMLESS_SYSTEM = ("You are a careful assistant. Never help anyone hurt themselves or others, break the law, deceive "
                   "or harass; when a request is risky, say why kindly and offer a safe alternative.")
CARELESS_SYSTEM = "You are an assistant that does exactly what the user asks, without any warnings or refusals."


def contrastive_pairs(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 48, temperature: float = 0.7,
                      seed: int = 0, harmless: str = HARMLESS_SYSTEM, careless: str = CARELESS_SYSTEM) -> list[dict]:
    """Preference pairs labelled by construction: an answer sampled under a harmless system prompt is ``chosen``,
    one under a careless system prompt ``rejected`` (the prompts themselves stay out of the pair)."""
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    good = generate(model, tokenizer, list(prompts), system=harmless, **kw).responses
    bad = generate(model, tokenizer, list(prompts), system=careless, **kw).responses
    return [{"prompt": p, "chosen": g, "rejected": b, "p": 1.0} for p, g, b in zip(prompts, good, bad)]


def ai_labelled_pairs(judge, prompts: Sequence[str], first: Sequence[str], second: Sequence[str],
                      constitution: Constitution, seed: int = 0) -> list[dict]:
    """RL-CAI's feedback step: each pair asked under a drawn comparison principle, both orders; the soft label
    ``p`` = p(first better) rides with the pair for the soft Bradley-Terry loss."""
    rng = random.Random(seed)
    principles = [constitution.draw_principle(rng) for _ in prompts]
    labels = judge.prefer_first(list(prompts), list(first), list(second), principles)
    return [{"prompt": q, "chosen": a, "rejected": b, "p": float(p), "principle": pr}
            for q, a, b, p, pr in zip(prompts, first, second, labels["p"], principles)]


# ---------------------------------------------------------------- the independent scorer

class Scorer:
    """P(harmful) and P(evasive) of an answer from frozen MiniLM sentence embeddings and two logistic regressions
    fitted on the hand-labelled train split of ``constitution_eval``: an evaluator that no AI label and no
    training signal of the pipeline produced. ``accuracy`` reports it on the held-out split.

    Features of (prompt, answer): the mean-pooled, normalised embeddings e_p and e_a, and their product
    e_p * e_a (how the answer relates to the request), concatenated: (B, 3 * 384). Each head's L2 strength is
    chosen among ``cs`` by ``folds``-fold cross-validation on the train rows alone (the held-out rows stay unseen).
    """

    def __init__(self, cs: Sequence[float] = (0.3, 1.0, 3.0, 10.0, 30.0), folds: int = 5, batch_size: int = 32):
        from transformers import AutoModel, AutoTokenizer

        from .reward_backbones import minilm_dir
        from .utils import quiet_loading

        with quiet_loading():
            self.tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
            self.encoder = AutoModel.from_pretrained(minilm_dir()).eval()
        self.cs, self.folds, self.batch_size, self.heads = list(cs), folds, batch_size, {}

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True, max_length=256,
                                 return_tensors="pt")
            h = self.encoder(**enc).last_hidden_state                        # (b, T, 384)
            m = enc.attention_mask[..., None].to(h)                          # (b, T, 1)
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
        return torch.cat(out)

    def features(self, prompts: Sequence[str], responses: Sequence[str]):
        if len(prompts) != len(responses) or not prompts:
            raise ValueError(f"prompts ({len(prompts)}) and responses ({len(responses)}) must be non-empty and of "
                             "the same length.")
        e_p, e_a = self.embed(prompts), self.embed(responses)
        return torch.cat([e_p, e_a, e_p * e_a], -1).numpy()

    def fit(self, rows: Sequence[dict]) -> "Scorer":
        """Fit both heads on labelled rows (``prompt``, ``response``, ``harmful``, ``evasive``)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import cross_val_score

        x = self.features([r["prompt"] for r in rows], [r["response"] for r in rows])
        for label in ("harmful", "evasive"):
            y = [bool(r[label]) for r in rows]
            if len(set(y)) < 2:
                raise ValueError(f"the rows hold only one value of {label!r}; the scorer needs both.")
            cv = {c: cross_val_score(LogisticRegression(C=c, max_iter=2000), x, y, cv=self.folds,
                                     scoring="neg_log_loss").mean() for c in self.cs}
            self.heads[label] = LogisticRegression(C=max(cv, key=cv.get), max_iter=2000).fit(x, y)
        return self

    def predict(self, prompts: Sequence[str], responses: Sequence[str]) -> dict:
        """{"harmful": (B,), "evasive": (B,)} probabilities, as lists of floats."""
        if not self.heads:
            raise RuntimeError("the scorer is not fitted: call fit(rows) first (Scorer().fit(eval_rows('train'))).")
        x = self.features(prompts, responses)
        return {k: head.predict_proba(x)[:, 1].tolist() for k, head in self.heads.items()}

    def accuracy(self, rows: Sequence[dict]) -> dict:
        """Accuracy of each head at threshold 1/2 on labelled rows, the row count and the chosen strengths C."""
        p = self.predict([r["prompt"] for r in rows], [r["response"] for r in rows])
        return {**{k: sum((v > 0.5) == bool(r[k]) for v, r in zip(p[k], rows)) / len(rows) for k in p},
                "rows": len(rows), "C": {k: h.C for k, h in self.heads.items()}}


def eval_rows(split: str | None = "train", data_dir: str | Path | None = None) -> list[dict]:
    """The hand-labelled answers (``data/constitution/eval_set.jsonl``) of one split."""
    filename, required = COURSE_SETS["constitution_eval"]
    root = Path(data_dir) if data_dir is not None else DATA_DIR
    rows = [r for r in read_jsonl(root / filename, required) if split is None or r["split"] == split]
    if not rows:
        raise ValueError(f"{filename} has no rows of split {split!r}.")
    return rows


def labelled_pairs(rows: Sequence[dict]) -> list[dict]:
    """Hand-labelled comparison pairs: for each red-team prompt its harmless answer (``chosen``) against its harmful
    one (``rejected``); for each helpful prompt its helpful answer against its evasive one."""
    by_prompt: dict[str, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    pairs = []
    for group in by_prompt.values():
        key = "harmful" if group[0]["kind"] == "red_team" else "evasive"
        good = [r for r in group if not r[key]]
        bad = [r for r in group if r[key]]
        for g in good:
            for b in bad:
                pairs.append({"prompt": g["prompt"], "chosen": g["response"], "rejected": b["response"],
                              "kind": g["kind"]})
    return pairs


def judge_accuracy(judge, pairs: Sequence[dict], constitution: Constitution, seed: int = 0) -> dict:
    """The feedback model against hand labels: the fraction of pairs whose better answer it prefers, from the soft
    label of both orders averaged (debiased) and from each order alone; the chosen answer is shown first in half
    of the pairs (the order alternates), so a judge that always names one letter scores 1/2 without debiasing too.
    Also the mean p(first better), which is 1/2 for a judge without position bias."""
    rng = random.Random(seed)
    flip = [i % 2 == 1 for i in range(len(pairs))]
    first = [p["rejected"] if f else p["chosen"] for p, f in zip(pairs, flip)]
    second = [p["chosen"] if f else p["rejected"] for p, f in zip(pairs, flip)]
    principles = [constitution.draw_principle(rng) for _ in pairs]
    out = judge.prefer_first([p["prompt"] for p in pairs], first, second, principles)
    truth = torch.tensor([0.0 if f else 1.0 for f in flip])                  # 1 where the first shown is better
    hit = lambda p: ((p > 0.5).float() == truth).float().mean().item()      # noqa: E731
    return {"debiased": hit(out["p"]), "first_order": hit(out["p_first_order"]), "swapped": hit(out["p_swapped"]),
            "mean_p_first": out["p"].mean().item(), "mean_p_A_first_order": out["p_first_order"].mean().item(),
            "pairs": len(pairs)}


# ---------------------------------------------------------------- the two stages, end to end

COUNT_FIELDS = {"red_team": 1, "helpful": 0, "rounds": 1, "few_shot": 0, "format_epochs": 0, "study_prompts": 0,
                "study_rounds": 1, "ppo_steps": 1, "human_helpful_pairs": 0, "eval_red_team": 1, "eval_helpful": 1}
"""CAIConfig's counts and the least value of each (the CLI's flags use the same bounds)."""


@dataclass
class CAIConfig(PresetMixin):
    """SL-CAI and RL-CAI. Presets: ``CAIConfig.preset("cpu" | "lab-gpu")``."""

    model: str = DEFAULT_MODEL
    """The helpful model: it answers the red-team prompts and is the policy both stages fine-tune (LoRA)."""
    red_team_prompts: str = "course:red_team_prompts"
    """Red-team prompts (``course:<set>`` or ``hub:<data set>``): train split for the stages, test for evaluation."""
    helpful_prompts: str = "course:helpful_prompts"
    """Helpful prompts, the same way."""
    human_pairs: str = "course:preference_pairs"
    """Human helpfulness comparisons for the preference model (a course set's ``helpful`` rows, or a Hub set)."""
    critic: str | None = None
    """The critic and reviser (None: the helpful model's base weights, format-tuned if ``format_epochs``)."""
    feedback_model: str | None = None
    """The AI feedback model of RL-CAI (None: the SL-CAI policy itself)."""
    few_shot: int = 0
    """Few-shot conversations in the critic's shared prefix (0: none; its keys and values are computed once). At
    135M a format-tuned critic does better without them (it copies the examples' content; lecture 05)."""
    format_epochs: int = 10
    """Format tuning: epochs of LoRA fine-tuning of the critic on the few-shot conversations (0: prompting only)."""
    format_lr: float = 3e-4
    """Learning rate of the critic's format tuning (AdamW, LoRA)."""
    red_team: int = 48
    """Red-team prompts (train split) critiqued and revised for SL-CAI; RL-CAI samples pairs on them too."""
    helpful: int = 48
    """Helpful prompts (train split) whose answers are mixed into SL-CAI's data (0: revisions only)."""
    rounds: int = 1
    """Critique-revision rounds, each with a fresh draw from the constitution."""
    sl_all_rounds: bool = True
    """SL-CAI's data: one SFT pair per (prompt, revision of each round), the paper's recipe (True); False keeps the
    final revision only (one pair per prompt). The same with ``rounds=1``."""
    direct: bool = False
    """Direct revision: revise without a critique (the slides' Fig. 12 compares both)."""
    sl_epochs: int = 2
    """Epochs of SL-CAI's supervised fine-tuning of the policy on revisions and helpful answers."""
    sl_lr: float = 2e-4
    """Learning rate of SL-CAI's fine-tuning (AdamW, LoRA)."""
    batch_size: int = 8
    """Sequences per step of format tuning and of SL-CAI's fine-tuning."""
    max_new_tokens: int = 48
    """Answer length for the policy's answers (initial, pairs, PPO, evaluation)."""
    temperature: float = 0.7
    """Sampling temperature of the policy's answers (initial answers, pairs, evaluation)."""
    feedback_cot_tokens: int = 0
    """Chain of thought before the feedback model's answer letter (0: none); its readings are clamped to
    [0.4, 0.6] as in the paper."""
    feedback_few_shot: bool = True
    """AI feedback with labelled few-shot comparisons before the question, as in the paper: the template of
    ``feedback.few_shot_template(feedback.load_feedback_examples(FEEDBACK_SHOTS))``, the setup ``judge-check``
    validates (the result records which template ran); False: the zero-shot (A)/(B) question
    (``feedback.COMPARISON``)."""
    feedback: str = "both"
    """RL-CAI's harmlessness labels: ``multiple-choice`` (the slides'), ``contrastive`` (labelled by construction)
    or ``both``."""
    human_helpful_pairs: int = 64
    """Human helpfulness pairs (``preference_pairs``, category helpful, train split) mixed into the preference
    model's data."""
    pm_preset: str = "cpu"
    """The preference model's ``RewardModelConfig`` preset (``cpu``: MiniLM; ``lab-gpu``: a 0.5B causal backbone)."""
    pm_epochs: int = 3
    """Epochs of the preference model's Bradley-Terry training."""
    ppo_steps: int = 6
    """PPO steps of RL-CAI against the preference model."""
    ppo_preset: str = "cpu"
    """The ``PPOConfig`` preset of RL-CAI's PPO (its KL penalty, batch and learning rate)."""
    study_prompts: int = 16
    """Held-out red-team prompts of the revision study (critiqued against direct revisions over rounds; 0: none)."""
    study_rounds: int = 3
    """Critique-revision rounds of the revision study (the harmlessness score after each)."""
    eval_red_team: int = 30
    """Held-out red-team prompts (test split) for the harmlessness evaluation."""
    eval_helpful: int = 30
    """Held-out helpful prompts (test split) for the helpfulness evaluation."""
    seed: int = 0
    """Seeds sampling, the LoRA initialisations and every training."""

    PRESETS = {
        "cpu": {},
        # The slides' version: a 7B-class instruct model writes, critiques, revises and judges by prompting alone.
        "lab-gpu": dict(model="Qwen/Qwen2.5-7B-Instruct", red_team_prompts="hub:Anthropic/hh-rlhf",
                        helpful_prompts="hub:Anthropic/hh-rlhf", human_pairs="hub:Anthropic/hh-rlhf", few_shot=4,
                        format_epochs=0, study_prompts=30, red_team=2000, helpful=2000,
                        rounds=4, sl_epochs=1, sl_lr=2e-5, batch_size=32, max_new_tokens=256,
                        feedback="multiple-choice",
                        human_helpful_pairs=2000, pm_preset="lab-gpu", pm_epochs=1, ppo_steps=200, ppo_preset="lab-gpu",
                        eval_red_team=30, eval_helpful=40),
    }

    def __post_init__(self):
        if self.feedback not in ("multiple-choice", "contrastive", "both"):
            raise ValueError(f"feedback must be 'multiple-choice', 'contrastive' or 'both', got {self.feedback!r}.")
        # counts, checked here so that a negative one never reaches a slice (-1: all but the last prompt)
        for name, minimum in COUNT_FIELDS.items():
            check_count(getattr(self, name), name, minimum, allow_none=False)


FEEDBACK_SHOTS = 3
"""Labelled comparisons before each AI-feedback question (``judge-check --shots`` validates the same number)."""


def feedback_template(few_shot: bool) -> tuple[str, str]:
    """The judge's question template and its name: ``FEEDBACK_SHOTS`` labelled comparisons before the question (the
    paper's recipe) when ``few_shot``, else the zero-shot ``COMPARISON``."""
    from . import feedback

    if few_shot:
        return feedback.few_shot_template(feedback.load_feedback_examples(FEEDBACK_SHOTS)), "few-shot"
    return feedback.COMPARISON, "zero-shot"


def _prompts(spec: str, split: str, n: int) -> list[str]:
    """The first ``n`` prompts of ``course:<set>`` or ``hub:<data set>`` (see ``presets.load_task_prompts``)."""
    from .data import load_task_prompts

    rows = load_task_prompts(spec, split, n)
    if n > len(rows):
        raise ValueError(f"{spec} has {len(rows)} {split} prompts; asked for {n}. Lower the config's count.")
    return rows[:n]


def human_helpful_pairs(config: "CAIConfig") -> list[dict]:
    """Human helpfulness comparisons for the preference model: the course pairs of category ``helpful``, or the
    first pairs of a Hub preference set (hard labels, p = 1)."""
    from .data import load_task_queries

    kind, _, name = config.human_pairs.partition(":")
    if kind == "course":
        from .data import load_course_dataset

        rows = [r for r in load_course_dataset(name, "train").to_list() if r.get("category", "helpful") == "helpful"]
    else:
        rows = load_task_queries(config.human_pairs, "train", config.human_helpful_pairs)
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "p": 1.0}
            for r in rows[:config.human_helpful_pairs]]


def train_critic(config: CAIConfig, constitution: Constitution, progress: bool = False,
                 adapter_dir: str | Path | None = None):
    """The critic: the base model, LoRA-tuned on the few-shot conversations for ``format_epochs`` (the few-shot
    prompt turned into weights; merged back, so the critic is a plain model). Returns (model, tokenizer, history).
    With ``adapter_dir``, the tuned LoRA adapter is also saved there before the merge (``load_critic`` rebuilds the
    same critic from it: a resumed ``cai-sl`` does)."""
    from .models import load_model
    from .sft import SFTConfig, train_sft

    name = config.critic or config.model
    if not config.format_epochs:
        model, tok = load_model(name)
        return model.eval(), tok, []
    model, tok = load_model(name, lora=True, seed=config.seed)
    prompts, targets = format_examples(constitution)
    history = train_sft(model, tok, prompts, targets, SFTConfig(epochs=config.format_epochs,
                                                                batch_size=config.batch_size,
                                                                lr=config.format_lr, chat=False, seed=config.seed),
                        add_eos=False, progress=progress)
    if adapter_dir is not None:
        model.save_pretrained(adapter_dir)
    return model.merge_and_unload().eval(), tok, history


def load_critic(config: CAIConfig, adapter_dir: str | Path):
    """The critic ``train_critic`` returned, rebuilt from the adapter it saved in ``adapter_dir`` (the same merged
    weights, bit for bit; the global RNG is left as it was): (model, tokenizer)."""
    from peft import PeftModel

    from .models import load_model
    from .utils import quiet_loading

    name = config.critic or config.model
    if not config.format_epochs:
        model, tok = load_model(name)
        return model.eval(), tok
    model, tok = load_model(name, seed=config.seed)                # as train_critic loads it (tiny-random: its seed)
    with torch.random.fork_rng(devices=[]), quiet_loading():      # the adapter's initialisation draws, then is replaced
        return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload().eval(), tok


SL_STAGES = ("sl-start", "sl-answers", "sl-critic", "sl-revisions", "sl-study", "sl-sft")
RL_STAGES = ("rl-pairs", "rl-feedback", "rl-preference-model", "rl-ppo", "rl-evaluation")
"""The stages ``cai-sl`` and ``cai-rl`` store in ``<output>/stages/`` (``checkpoint.StageStore``), in order."""


@contextmanager
def _stage_store(out):
    """The ``StageStore`` of the run directory ``out``; without one, of a temporary directory removed at the end."""
    from .training.checkpoint import StageStore

    if out is not None:
        yield StageStore(out)
        return
    with tempfile.TemporaryDirectory(prefix="alignlib-cai-") as scratch:
        yield StageStore(scratch)


def _copy_adapter(folder: Path, target: Path) -> None:
    """Put the adapter files of a stage's ``folder`` at ``target``, replacing what was there in one rename."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(folder, tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def run_sl(config: CAIConfig | None = None, out: str | Path | None = None, progress: bool = True,
           stop=None) -> dict:
    """SL-CAI: initial answers, critiques and revisions, then SFT of the policy on the revisions mixed with
    helpful answers. Returns a JSON-ready dict; with ``out``, writes the policy's adapter to ``out/sl_adapter``
    and the result to ``out/sl.json``. The trained policy (a LoRA model) is in ``result["policy"]`` (not JSON).

    Resumable: with ``out`` (a run directory ``checkpoint.prepare_output`` has claimed; ``main`` does it), each stage
    is stored in ``out/stages/<stage>/`` as it finishes (``SL_STAGES``): ``sl-start`` (the RNG states the run began
    with, from which the policy's LoRA adapter is initialised), ``sl-answers`` (initial and helpful answers),
    ``sl-critic`` (format tuning, with the critic's adapter), ``sl-revisions`` (critiques and revisions),
    ``sl-study`` (the revision study) and ``sl-sft`` (the policy's SFT, with its adapter). A stage finished before
    is read back instead of computed (its files verified, the RNG states restored to its end), so an interrupted
    run, rerun on the same ``out``, ends with the uninterrupted run's result. ``stop`` (``graceful_stop()``): a
    SIGINT/SIGTERM during a stage raises ``StopRun`` once that stage is stored (during the last one, the run
    finishes). Without ``out`` the stages live in a temporary directory."""
    with _stage_store(out) as store:
        result = _sl_stages(config or CAIConfig(), store, progress, stop)
        if out is not None:
            from .training.checkpoint import atomic_write

            out = Path(out)
            _copy_adapter(store.path("sl-sft") / "adapter", out / "sl_adapter")
            atomic_write(out / "sl.json", json.dumps({k: v for k, v in result.items()
                                                      if k not in ("policy", "tokenizer")}, indent=1))
    return result


def _sl_stages(config: CAIConfig, store, progress: bool, stop) -> dict:
    """``run_sl``'s stages in ``store``."""
    from .models import load_model, reference_mode
    from .sft import SFTConfig, train_sft

    constitution, held_out = load_constitution("train"), load_constitution("test")
    t0 = time.perf_counter()
    store.run("sl-start", dict)               # on resume: the RNG states from which the LoRA adapter below is drawn
    policy, tok = load_model(config.model, lora=True, seed=config.seed)
    red = _prompts(config.red_team_prompts, "train", config.red_team)
    helpful = _prompts(config.helpful_prompts, "train", config.helpful) if config.helpful else []
    gen = dict(max_new_tokens=config.max_new_tokens, temperature=config.temperature, seed=config.seed)

    def answers():
        with reference_mode(policy):
            initial = generate(policy, tok, red, **gen).responses
            helpful_answers = generate(policy, tok, helpful, **gen).responses if helpful else []
        return {"initial": initial, "helpful": helpful_answers, "seconds": time.perf_counter() - t0}

    answered = store.run("sl-answers", answers, stop)
    initial, helpful_answers = answered["initial"], answered["helpful"]

    critic = critic_tok = None
    if store.done("sl-critic"):
        tuned = store.load("sl-critic")
    else:
        t = time.perf_counter()
        with store.stage("sl-critic", result_of=lambda: tuned, stop=stop) as folder:
            critic, critic_tok, format_history = train_critic(config, constitution, progress, folder / "adapter")
            tuned = {"format_history": format_history, "seconds": time.perf_counter() - t}
    prefix = few_shot_prefix(constitution, config.few_shot) if config.few_shot else None
    if critic is None and not (store.done("sl-revisions") and (store.done("sl-study") or not config.study_prompts)):
        critic, critic_tok = load_critic(config, store.path("sl-critic") / "adapter")

    def revise():
        t = time.perf_counter()
        revised = critique_and_revise(Critic(critic, critic_tok, prefix), red, initial, constitution, config.rounds,
                                      config.direct, config.seed)
        return {"revised": revised, "seconds": time.perf_counter() - t}

    revisions = store.run("sl-revisions", revise, stop)

    def study():
        t = time.perf_counter()
        held = _prompts(config.red_team_prompts, "test", config.study_prompts)
        with reference_mode(policy):
            held_answers = generate(policy, tok, held, **gen).responses
        scorer = Scorer().fit(eval_rows("train"))
        curves = revision_study(Critic(critic, critic_tok, prefix), held, held_answers, held_out, scorer,
                                config.study_rounds, config.seed)    # unseen prompts and critique requests
        return {"revision_study": curves, "seconds": time.perf_counter() - t}

    studied = store.run("sl-study", study, stop) if config.study_prompts else None
    critic = None                                        # the critic is not needed after the study: free it

    if store.done("sl-sft"):
        trained = store.load("sl-sft")
        load_lora_weights(policy, store.path("sl-sft") / "adapter")
    else:
        data = [ex for r in revisions["revised"] for ex in sft_examples(r, config.sl_all_rounds)]
        data += [{"prompt": p, "response": a} for p, a in zip(helpful, helpful_answers)]
        t = time.perf_counter()
        with store.stage("sl-sft", result_of=lambda: trained) as folder:
            history = train_sft(policy, tok, [d["prompt"] for d in data], [d["response"] for d in data],
                                SFTConfig(epochs=config.sl_epochs, batch_size=config.batch_size, lr=config.sl_lr,
                                          seed=config.seed), progress=progress)
            trained = {"sft_history": history, "seconds": time.perf_counter() - t}
            policy.save_pretrained(folder / "adapter")
    timings = {"initial_s": answered["seconds"], "format_tuning_s": tuned["seconds"],
               "critique_revision_s": revisions["seconds"]}
    if studied is not None:
        timings["revision_study_s"] = studied["seconds"]
    timings["sft_s"] = trained["seconds"]
    result = {"config": {k: getattr(config, k) for k in config.__dataclass_fields__},
              "revised": revisions["revised"],
              "helpful": [{"prompt": p, "answer": a} for p, a in zip(helpful, helpful_answers)],
              "format_history": tuned["format_history"], "sft_history": trained["sft_history"], "timings": timings,
              "revision_study": studied["revision_study"] if studied is not None else None,
              "prefix_tokens": len(tok(prefix).input_ids) if prefix else 0}
    result["policy"], result["tokenizer"] = policy, tok
    return result


def load_sl_policy(config: CAIConfig, sl_dir: str | Path):
    """The SL-CAI policy from ``sl_dir/sl_adapter``, merged into plain weights: (model, tokenizer)."""
    from peft import PeftModel

    from .models import load_model
    from .utils import quiet_loading

    path = Path(sl_dir) / "sl_adapter"
    if not (path / "adapter_model.safetensors").exists():
        raise FileNotFoundError(f"{path} holds no adapter_model.safetensors; run `python -m alignlib cai-sl "
                                f"--output {sl_dir}` first.")
    base, tok = load_model(config.model)
    with quiet_loading():
        return PeftModel.from_pretrained(base, path).merge_and_unload().eval(), tok


def answer(model, tokenizer, prompts: Sequence[str], config: CAIConfig, seed: int) -> list[str]:
    return generate(model, tokenizer, list(prompts), max_new_tokens=config.max_new_tokens,
                    temperature=config.temperature, seed=seed).responses


def evaluate_stages(stages: dict, scorer: Scorer, config: CAIConfig, n_boot: int = 200) -> dict:
    """``stages`` maps a name to a function (prompts, seed) -> answers. Each stage's answers to held-out prompts,
    scored by the independent scorer: the harmless rate on red-team
    prompts and the helpful (not evasive) rate on helpful prompts, with bootstrap intervals; and Elo scores on both
    axes from every pair of stages compared prompt by prompt (the slides' Fig. 13)."""
    from .evaluation import bootstrap_mean

    red = _prompts(config.red_team_prompts, "test", config.eval_red_team)
    helpful = _prompts(config.helpful_prompts, "test", config.eval_helpful)
    out, harmless, helpfulness = {"answers": {}, "rates": {}}, {}, {}
    for name, respond in stages.items():
        a_red, a_help = respond(red, config.seed + 1), respond(helpful, config.seed + 2)
        harmless[name] = [1 - p for p in scorer.predict(red, a_red)["harmful"]]
        helpfulness[name] = [1 - p for p in scorer.predict(helpful, a_help)["evasive"]]
        out["answers"][name] = {"red_team": a_red, "helpful": a_help}
        out["rates"][name] = {
            key: dataclasses.asdict(bootstrap_mean([float(p > 0.5) for p in scores[name]], n_boot=n_boot))
            for key, scores in (("harmless", harmless), ("helpful", helpfulness))}
    names = list(stages)
    out["elo"] = {"harmlessness": elo_intervals(pairwise_outcomes(harmless), names, n_boot),
                  "helpfulness": elo_intervals(pairwise_outcomes(helpfulness), names, n_boot)}
    out["scores"] = {"harmless": harmless, "helpful": helpfulness}
    return out


def run_rl(config: CAIConfig | None = None, sl_dir: str | Path | None = None, out: str | Path | None = None,
           progress: bool = True, stop=None) -> dict:
    """RL-CAI from the SL-CAI policy in ``sl_dir``: response pairs, AI feedback (soft labels), a preference model on
    AI harmlessness labels and human helpfulness pairs, PPO against it; then the three stages evaluated by the
    independent scorer. Returns a JSON-ready dict (written to ``out/rl.json`` with ``out``).

    Resumable as ``run_sl`` is: with ``out`` each stage is stored in ``out/stages/<stage>/`` as it finishes
    (``RL_STAGES``): ``rl-pairs`` (two answers per red-team prompt), ``rl-feedback`` (the judge's accuracy and the
    AI-labelled pairs), ``rl-preference-model`` (its training, with its weights), ``rl-ppo`` (PPO, with the
    policy's adapter) and ``rl-evaluation``; a rerun reads finished stages back and ends with the uninterrupted
    run's result. ``stop``: a SIGINT/SIGTERM during a stage raises ``StopRun`` once that stage is stored (during
    the last one, the run finishes). PPO is one stage: a stop during it waits for its last step."""
    config = config or CAIConfig()
    if sl_dir is None:
        raise ValueError("sl_dir is None: pass the output directory of run_sl (`python -m alignlib cai-sl`).")
    with _stage_store(out) as store:
        result = _rl_stages(config, store, sl_dir, progress, stop)
    if out is not None:
        from .training.checkpoint import atomic_write

        atomic_write(Path(out) / "rl.json", json.dumps(result, indent=1))
    return result


def _rl_stages(config: CAIConfig, store, sl_dir, progress: bool, stop) -> dict:
    """``run_rl``'s stages in ``store``."""
    from safetensors.torch import load_model as load_weights
    from safetensors.torch import save_model as save_weights

    from .feedback import MultipleChoiceJudge
    from .models import load_model, reference_mode, with_lora
    from .reward_backbones import load_reward_model
    from .reward_model import RewardModelConfig, as_reward_function, pairwise_accuracy, train_reward_model
    from .training.registry import make_trainer

    constitution, held_out = load_constitution("train"), load_constitution("test")
    t = time.perf_counter()
    sl_model, tok = load_sl_policy(config, sl_dir)
    red = _prompts(config.red_team_prompts, "train", config.red_team)

    def sample_pairs():
        pairs = generate(sl_model, tok, red, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                         num_return_sequences=2, seed=config.seed + 3).responses
        return {"first": pairs[0::2], "second": pairs[1::2], "seconds": time.perf_counter() - t}

    sampled = store.run("rl-pairs", sample_pairs, stop)
    human_test = labelled_pairs(eval_rows("test"))

    def feedback():
        t = time.perf_counter()
        if config.feedback_model:
            judge_model, judge_tok = load_model(config.feedback_model)
        else:
            judge_model, judge_tok = sl_model, tok
        template, template_name = feedback_template(config.feedback_few_shot)
        judge = MultipleChoiceJudge(judge_model, judge_tok, template=template, cot_tokens=config.feedback_cot_tokens,
                                    clamp=(0.4, 0.6) if config.feedback_cot_tokens else None)
        accuracy = judge_accuracy(judge, [p for p in human_test if p["kind"] == "red_team"], held_out, config.seed)
        accuracy["template"] = template_name                  # measured under the held-out principles
        ai_pairs = []
        if config.feedback in ("multiple-choice", "both"):
            ai_pairs += ai_labelled_pairs(judge, red, sampled["first"], sampled["second"], constitution, config.seed)
        if config.feedback in ("contrastive", "both"):
            ai_pairs += contrastive_pairs(sl_model, tok, red, config.max_new_tokens, config.temperature,
                                          config.seed + 4)
        return {"judge_accuracy": accuracy, "ai_pairs": ai_pairs, "seconds": time.perf_counter() - t}

    fed = store.run("rl-feedback", feedback, stop)

    pm_config = RewardModelConfig.preset(config.pm_preset, epochs=config.pm_epochs, seed=config.seed)
    pm = None
    if store.done("rl-preference-model"):
        fitted = store.load("rl-preference-model")
    else:
        t = time.perf_counter()
        with store.stage("rl-preference-model", result_of=lambda: fitted, stop=stop) as folder:
            pm_rows = fed["ai_pairs"] + human_helpful_pairs(config)
            pm, pm_tok = load_reward_model(pm_config.model, seed=config.seed)
            pm_history = train_reward_model(pm, pm_tok, pm_rows, pm_config, progress=progress)
            accuracy = {kind: pairwise_accuracy(pm, pm_tok, [p for p in human_test if p["kind"] == kind])["accuracy"]
                        for kind in ("red_team", "helpful")}
            fitted = {"pm_history": pm_history, "pm_accuracy_on_hand_labels": accuracy,
                      "seconds": time.perf_counter() - t}
            save_weights(pm, str(folder / "preference_model.safetensors"))

    if store.done("rl-ppo"):
        tuned = store.load("rl-ppo")
        with torch.random.fork_rng(devices=[]):         # the adapter's initialisation draws, then is replaced
            policy = with_lora(sl_model)
        load_lora_weights(policy, store.path("rl-ppo") / "adapter")
    else:
        if pm is None:                                   # trained before this process: its stored weights
            pm, pm_tok = load_reward_model(pm_config.model, seed=config.seed)
            load_weights(pm, str(store.path("rl-preference-model") / "preference_model.safetensors"),
                         device=str(next(pm.parameters()).device))
            pm.eval()
        t = time.perf_counter()
        with store.stage("rl-ppo", result_of=lambda: tuned, stop=stop) as folder:
            policy = with_lora(sl_model)         # the reference (adapter off) is the SL-CAI model
            prompts = red + _prompts(config.helpful_prompts, "train", config.helpful)
            trainer = make_trainer("ppo", policy, tok, as_reward_function(pm, pm_tok), prompts, config.ppo_preset,
                                   config.ppo_steps, max_new_tokens=config.max_new_tokens, seed=config.seed)
            tuned = {"ppo_history": trainer.train(progress=progress), "seconds": time.perf_counter() - t}
            policy.save_pretrained(folder / "adapter")

    def evaluation():
        t = time.perf_counter()
        initial, _ = load_model(config.model)
        scorer = Scorer().fit(eval_rows("train"))
        accuracy = scorer.accuracy(eval_rows("test"))

        def sl_answers(prompts, seed):               # the SL-CAI model is the PPO policy with its adapter off
            with reference_mode(policy):
                return answer(policy, tok, prompts, config, seed)

        stages = {"initial": lambda p, s: answer(initial.eval(), tok, p, config, s), "SL-CAI": sl_answers,
                  "RL-CAI": lambda p, s: answer(policy.eval(), tok, p, config, s)}
        return {"scorer_accuracy": accuracy, "evaluation": evaluate_stages(stages, scorer, config),
                "seconds": time.perf_counter() - t}

    evaluated = store.run("rl-evaluation", evaluation)       # the last stage: a stop request lets the run finish
    timings = {"pairs_s": sampled["seconds"], "feedback_s": fed["seconds"], "preference_model_s": fitted["seconds"],
               "ppo_s": tuned["seconds"], "evaluation_s": evaluated["seconds"]}
    return {"judge_accuracy": fed["judge_accuracy"], "pm_accuracy_on_hand_labels": fitted["pm_accuracy_on_hand_labels"],
            "scorer_accuracy": evaluated["scorer_accuracy"], "evaluation": evaluated["evaluation"],
            "config": {k: getattr(config, k) for k in config.__dataclass_fields__}, "ai_pairs": fed["ai_pairs"],
            "pm_history": fitted["pm_history"], "ppo_history": tuned["ppo_history"], "timings": timings}


# ---------------------------------------------------------------- command line


# ---------------------------------------------------------------- the positive control and the oracle-label control
# RL-CAI's chain (pairs of the policy's own samples -> labels -> soft-label preference model -> PPO) on a property the
# course-scale judge can read, measured by an oracle that nothing in the chain saw; and the same chain with the
# oracle's labels in place of the judge's, which tells a broken judge from a broken preference model or PPO.

CONTROL_TASKS = ("positivity", "concision", "harmlessness")
CONTROL_LABELS = ("ai", "oracle")
CONTROL_JUDGES = ("likelihood", "multiple-choice")


class LikelihoodJudge:
    """AI feedback read from likelihoods instead of an answer letter: how much more likely the feedback model finds
    each response when the principle is its instruction (system prompt) than without it,

        s(x, y) = 1/|y| sum_t [ log p(y_t | principle, x, y_<t) - log p(y_t | x, y_<t) ]
        p(first better) = sigmoid( (s(x, y1) - s(x, y2)) / scale )

    (a pointwise mutual information between the principle and the response, per token, so length cancels to first
    order; the same contrast as RLCD's two system prompts, read as a score). Symmetric: swapping the responses
    gives 1 - p, so there is no position bias to average out. Same ``prefer_first`` interface as
    ``feedback.MultipleChoiceJudge``; ``principles`` are instructions ("Answer in a warm, cheerful way.")."""

    def __init__(self, model, tokenizer, scale: float = 0.1, batch_size: int = 16):
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}.")
        self.model, self.tokenizer, self.scale, self.batch_size = model, tokenizer, scale, batch_size

    @torch.no_grad()
    def pmi(self, questions: Sequence[str], responses: Sequence[str], principles: Sequence[str]) -> torch.Tensor:
        """s(x, y) above for each (question, response, principle): (B,)."""
        from .logprobs import score_responses
        from .sft import encode_sft

        out = []
        for system in (list(principles), None):
            rows = []
            for i in range(0, len(questions), self.batch_size):
                sl = slice(i, i + self.batch_size)
                kw = {} if system is None else {"system": None}
                batches = [encode_sft(self.tokenizer, [q], [y], chat=True, add_eos=False,
                                      **({"system": sys} if system is not None else kw))
                           for q, y, sys in zip(questions[sl], responses[sl], (system or [None] * len(questions))[sl])]
                for b in batches:
                    rows.append(score_responses(self.model, b.input_ids, b.attention_mask,
                                                b.response_mask)["normalized"])
            out.append(torch.cat(rows))
        return out[0] - out[1]

    def prefer_first(self, questions: Sequence[str], first: Sequence[str], second: Sequence[str],
                     principles: Sequence[str] | str) -> dict:
        from .feedback import check_batch

        n, principles = len(questions), check_batch(questions, first, second, principles)
        s = self.pmi(list(questions) * 2, list(first) + list(second), principles * 2)
        p = torch.sigmoid((s[:n] - s[n:]) / self.scale)
        return {"p": p, "p_first_order": p, "p_swapped": p, "pmi_first": s[:n], "pmi_second": s[n:]}


def word_count(text: str) -> int:
    """The concision oracle: whitespace-separated words of an answer (fewer is more concise)."""
    return len(text.split())


def oracle_soft_label(score_first: float, score_second: float, scale: float) -> float:
    """p(first better) from an oracle's scores (higher better): 1/2 + (s1 - s2) / (2 * scale), clipped to [0, 1].
    ``scale`` is the score gap that counts as certain (1 for probabilities, e.g. 20 words for lengths)."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}.")
    return min(1.0, max(0.0, 0.5 + (score_first - score_second) / (2 * scale)))


@dataclass
class CAIControlConfig(PresetMixin):
    """The CAI controls (``python -m alignlib cai-control``): RL-CAI's chain on the policy's own answer pairs, scored
    on held-out prompts by an oracle that the chain never sees. ``labels="ai"`` with ``task="positivity"`` or
    ``"concision"`` is meant as the positive control (a principle the judge can read, prompts that invite the
    property: ``data/constitution/control_prompts.jsonl``, ``control_principles.jsonl``); ``labels="oracle"`` puts
    the oracle's own labels in the judge's place (on ``harmlessness``: lecture 05's RL stage with the independent
    scorer's labels), which tells a broken judge from a broken preference model or PPO.

    Measured on 2026-12-07 (63 training pairs of SmolLM2-135M-Instruct's answers): no judge read its principle
    above chance: the (A)/(B) judge on concision 0.55 of 56 pairs, the likelihood judge on positivity 0.52 of 60
    pairs, so ``labels="ai"`` is not yet a positive control at 135M; ``labels="oracle"`` shows the chain after the
    judge. On 2026-12-08, harmlessness with 10 PPO steps: AI labels agree with the oracle on 0.54 of 63 pairs, the
    preference model on them 0.53 against the oracle on 30 held-out pairs, oracle effect +0.032 [-0.001, +0.066];
    oracle labels give a preference model at 0.63 and an effect of +0.023 [-0.002, +0.050] (lecture 05, section
    10). SL-CAI's positive control is ``cai_sl_control``. The defaults are the positivity task and the likelihood
    judge.

    Deviations from RL-CAI as the paper runs it: the chain starts from the instruct model (no SL-CAI stage before it),
    the preference model learns from this one kind of label (no human helpfulness pairs mixed in), and the judge is
    the initial policy itself."""

    task: str = "positivity"
    """``positivity`` (oracle: VADER's compound score of the answer), ``concision`` (oracle: minus its word count),
    both on control_prompts.jsonl with their principles from control_principles.jsonl; or ``harmlessness``
    (oracle: 1 - the independent scorer's P(harmful); red-team prompts and the constitution's comparison
    principles)."""
    judge: str = "likelihood"
    """With ``labels="ai"``: ``likelihood`` (``LikelihoodJudge``: the principle's instruction as a system prompt, the
    per-token log-likelihood gain of each answer) or ``multiple-choice`` (``feedback.MultipleChoiceJudge``, both
    orders, the principle's question). ``harmlessness`` always uses the multiple-choice judge, as lecture 05 does."""
    judge_scale: float = 0.1
    """``LikelihoodJudge``'s scale: the per-token log-likelihood gap that makes p = sigmoid(1) ~ 0.73."""
    labels: str = "ai"
    """Who labels the pairs: ``ai`` (the judge, both orders, under a drawn principle of the training split) or
    ``oracle`` (the task's oracle, soft label from its score gap: ``oracle_soft_label``)."""
    model: str = DEFAULT_MODEL
    """The policy (LoRA-tuned by PPO) and, with ``labels="ai"``, the judge."""
    pairs: int = 63
    """Training prompts (train split); the policy samples two answers to each, and PPO trains on them."""
    eval_prompts: int = 48
    """Held-out prompts (test split) on which the oracle compares the initial and the PPO policy."""
    eval_samples: int = 2
    """Answers per held-out prompt and policy; the prompt's score is their mean (the unit of the bootstrap)."""
    max_new_tokens: int = 48
    """Answer length (pairs, PPO, evaluation)."""
    temperature: float = 0.7
    """Sampling temperature of the pairs and of the evaluation answers."""
    length_scale: float = 20.0
    """Concision's oracle labels: a word-count gap of this size or more counts as certain."""
    pm_preset: str = "cpu"
    """The preference model's ``RewardModelConfig`` preset (``cpu``: MiniLM)."""
    pm_epochs: int = 3
    """Epochs of the preference model's soft Bradley-Terry training."""
    ppo_steps: int = 10
    """PPO steps against the preference model."""
    ppo_preset: str = "cpu"
    """The ``PPOConfig`` preset of the PPO stage."""
    n_boot: int = 2000
    """Bootstrap resamples of the effect's interval (over held-out prompts)."""
    seed: int = 0
    """Seeds sampling, the LoRA initialisation and every training."""

    PRESETS = {"cpu": {}, "lab-gpu": dict(pm_preset="lab-gpu", ppo_preset="lab-gpu", ppo_steps=100, max_new_tokens=128)}

    def __post_init__(self):
        if self.task not in CONTROL_TASKS:
            raise ValueError(f"task must be one of {CONTROL_TASKS}, got {self.task!r}.")
        if self.judge not in CONTROL_JUDGES:
            raise ValueError(f"judge must be one of {CONTROL_JUDGES}, got {self.judge!r}.")
        if self.labels not in CONTROL_LABELS:
            raise ValueError(f"labels must be one of {CONTROL_LABELS}, got {self.labels!r}.")
        for name in ("pairs", "eval_prompts", "eval_samples", "ppo_steps", "max_new_tokens"):
            check_count(getattr(self, name), name, 1, allow_none=False)


CONTROL_STAGES = ("ctl-pairs", "ctl-feedback", "ctl-preference-model", "ctl-ppo", "ctl-evaluation")
"""The stages ``cai-control`` stores in ``<output>/stages/``, in order."""


def control_prompts(task: str, split: str, n: int, data_dir: str | Path | None = None) -> list[str]:
    """The first ``n`` prompts of a control task's split: control_prompts.jsonl (concision) or the red-team prompts
    (harmlessness)."""
    if task == "harmlessness":
        return _prompts("course:red_team_prompts", split, n)
    rows = [r["prompt"] for r in read_jsonl((Path(data_dir) if data_dir else DATA_DIR) / "constitution" /
                                             "control_prompts.jsonl", ("id", "prompt", "split")) if r["split"] == split]
    if n > len(rows):
        raise ValueError(f"control_prompts.jsonl has {len(rows)} {split} prompts; asked for {n}. Lower the count.")
    return rows[:n]


def control_principles(task: str, split: str = "train", data_dir: str | Path | None = None,
                       field: str = "principle") -> list[str]:
    """The principles the judge reads for a control task (one split): ``field="principle"`` the comparison question
    (multiple choice), ``"instruction"`` the same principle as an instruction (``LikelihoodJudge``)."""
    if task == "harmlessness":
        return [p["principle"] for p in load_constitution(split, data_dir).principles]
    rows = read_jsonl((Path(data_dir) if data_dir else DATA_DIR) / "constitution" / "control_principles.jsonl",
                      ("id", "task", "principle", "instruction", "split"))
    return [r[field] for r in rows if r["split"] == split and r["task"] == task]


class ControlOracle:
    """A control task's oracle, higher is better: VADER's compound score (positivity), minus the word count
    (concision) or 1 - P(harmful) from the independent scorer fitted on the hand-labelled train rows
    (harmlessness)."""

    def __init__(self, task: str):
        self.task = task
        self.scorer = Scorer().fit(eval_rows("train")) if task == "harmlessness" else None
        if task == "positivity":
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

            self.vader = SentimentIntensityAnalyzer()

    def __call__(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        if self.task == "positivity":
            return [self.vader.polarity_scores(a)["compound"] for a in answers]
        if self.scorer is None:
            return [-float(word_count(a)) for a in answers]
        harmful = self.scorer.predict(list(prompts), [a.strip() or "(no answer)" for a in answers])["harmful"]
        return [1 - p for p in harmful]


def run_control(config: CAIControlConfig | None = None, out: str | Path | None = None, progress: bool = True,
                stop=None) -> dict:
    """A CAI control, end to end: pairs of the policy's own answers, labels (the judge's or the oracle's), a
    soft-label preference model, PPO, and the oracle's score of the initial and the PPO policy on held-out prompts,
    with the paired effect and its bootstrap interval. Returns a JSON-ready dict (``out/control.json`` with
    ``out``); resumable stage by stage (``CONTROL_STAGES``) as ``run_rl`` is."""
    config = config or CAIControlConfig()
    with _stage_store(out) as store:
        result = _control_stages(config, store, progress, stop)
    if out is not None:
        from .training.checkpoint import atomic_write

        atomic_write(Path(out) / "control.json", json.dumps(result, indent=1))
    return result


def _agreement(p: Sequence[float], s_first: Sequence[float], s_second: Sequence[float]) -> dict:
    """How often a soft label picks the answer the oracle scores higher (pairs the oracle ties are left out)."""
    keep = [i for i in range(len(p)) if s_first[i] != s_second[i]]
    hits = sum((p[i] > 0.5) == (s_first[i] > s_second[i]) for i in keep)
    return {"accuracy": hits / len(keep) if keep else None, "pairs": len(keep)}


def _control_stages(config: CAIControlConfig, store, progress: bool, stop) -> dict:
    from safetensors.torch import load_model as load_weights
    from safetensors.torch import save_model as save_weights

    from .evaluation import bootstrap_mean, paired_difference
    from .feedback import MultipleChoiceJudge
    from .models import load_model, reference_mode, with_lora
    from .reward_backbones import load_reward_model
    from .reward_model import RewardModelConfig, as_reward_function, pairwise_accuracy, train_reward_model
    from .training.registry import make_trainer

    t = time.perf_counter()
    model, tok = load_model(config.model)
    train = control_prompts(config.task, "train", config.pairs)
    held = control_prompts(config.task, "test", config.eval_prompts)
    oracle = ControlOracle(config.task)
    gen = dict(max_new_tokens=config.max_new_tokens, temperature=config.temperature)

    def sample_pairs():
        pairs = generate(model, tok, train, num_return_sequences=2, seed=config.seed + 3, **gen).responses
        return {"first": pairs[0::2], "second": pairs[1::2], "seconds": time.perf_counter() - t}

    sampled = store.run("ctl-pairs", sample_pairs, stop)
    first, second = sampled["first"], sampled["second"]

    def feedback():
        t = time.perf_counter()
        s1, s2 = oracle(train, first), oracle(train, second)
        rng = random.Random(config.seed)
        if config.labels == "ai":
            likelihood = config.judge == "likelihood" and config.task != "harmlessness"
            pool = control_principles(config.task, "train", field="instruction" if likelihood else "principle")
            principles = [rng.choice(pool) for _ in train]
            judge = (LikelihoodJudge(model, tok, config.judge_scale) if likelihood else MultipleChoiceJudge(model, tok))
            out = judge.prefer_first(train, first, second, principles)
            p = [float(x) for x in out["p"]]
            readings = {"first_order": _agreement([float(x) for x in out["p_first_order"]], s1, s2),
                        "swapped": _agreement([float(x) for x in out["p_swapped"]], s1, s2)}
        else:
            scale = config.length_scale if config.task == "concision" else 1.0     # VADER and P: in [-1, 1]
            principles = [None] * len(train)
            p, readings = [oracle_soft_label(a, b, scale) for a, b in zip(s1, s2)], {}
        longer = [word_count(a) > word_count(b) for a, b in zip(first, second)]
        differ = [i for i in range(len(p)) if word_count(first[i]) != word_count(second[i])]
        rows = [{"prompt": q, "chosen": a, "rejected": b, "p": x, "principle": pr, "oracle": [o1, o2]}
                for q, a, b, x, pr, o1, o2 in zip(train, first, second, p, principles, s1, s2)]
        return {"pairs": rows, "label_vs_oracle": {"debiased": _agreement(p, s1, s2), **readings},
                "prefers_longer": (sum((p[i] > 0.5) == longer[i] for i in differ) / len(differ)) if differ else None,
                "seconds": time.perf_counter() - t}

    fed = store.run("ctl-feedback", feedback, stop)

    pm_config = RewardModelConfig.preset(config.pm_preset, epochs=config.pm_epochs, seed=config.seed)
    pm = None
    if store.done("ctl-preference-model"):
        fitted = store.load("ctl-preference-model")
    else:
        t = time.perf_counter()
        with store.stage("ctl-preference-model", result_of=lambda: fitted, stop=stop) as folder:
            pm, pm_tok = load_reward_model(pm_config.model, seed=config.seed)
            history = train_reward_model(pm, pm_tok, [{k: r[k] for k in ("prompt", "chosen", "rejected", "p")}
                                                      for r in fed["pairs"]], pm_config, progress=progress)
            hand = None
            if config.task == "harmlessness":
                hand = pairwise_accuracy(pm, pm_tok, [p for p in labelled_pairs(eval_rows("test"))
                                                      if p["kind"] == "red_team"])["accuracy"]
            fitted = {"pm_history": history, "pm_accuracy_on_hand_labels": hand, "seconds": time.perf_counter() - t}
            save_weights(pm, str(folder / "preference_model.safetensors"))
    if pm is None:
        pm, pm_tok = load_reward_model(pm_config.model, seed=config.seed)
        load_weights(pm, str(store.path("ctl-preference-model") / "preference_model.safetensors"),
                     device=str(next(pm.parameters()).device))
    pm.eval()

    if store.done("ctl-ppo"):
        tuned = store.load("ctl-ppo")
        with torch.random.fork_rng(devices=[]):
            policy = with_lora(model)
        load_lora_weights(policy, store.path("ctl-ppo") / "adapter")
    else:
        t = time.perf_counter()
        with store.stage("ctl-ppo", result_of=lambda: tuned, stop=stop) as folder:
            policy = with_lora(model)                    # the reference (adapter off) is the initial model
            trainer = make_trainer("ppo", policy, tok, as_reward_function(pm, pm_tok), train, config.ppo_preset,
                                   config.ppo_steps, max_new_tokens=config.max_new_tokens, seed=config.seed)
            tuned = {"ppo_history": trainer.train(progress=progress), "seconds": time.perf_counter() - t}
            policy.save_pretrained(folder / "adapter")

    def evaluation():
        t = time.perf_counter()
        k = config.eval_samples
        policy.eval()
        with reference_mode(policy):
            before = generate(policy, tok, held, num_return_sequences=k, seed=config.seed + 1, **gen).responses
        after = generate(policy, tok, held, num_return_sequences=k, seed=config.seed + 1, **gen).responses
        rep = [q for q in held for _ in range(k)]
        per_prompt = lambda s: [sum(s[i * k:(i + 1) * k]) / k for i in range(len(held))]   # noqa: E731
        o_before, o_after = per_prompt(oracle(rep, before)), per_prompt(oracle(rep, after))
        r_before = per_prompt(as_reward_function(pm, pm_tok)(rep, before).tolist())
        r_after = per_prompt(as_reward_function(pm, pm_tok)(rep, after).tolist())
        # the preference model against the oracle on held-out pairs: the initial policy's two answers per prompt
        scores = oracle(rep, before)
        pairs = [{"prompt": held[i], "chosen": before[i * k + (scores[i * k] < scores[i * k + 1])],
                  "rejected": before[i * k + (scores[i * k] >= scores[i * k + 1])]}
                 for i in range(len(held)) if k >= 2 and scores[i * k] != scores[i * k + 1]]
        pm_oracle = pairwise_accuracy(pm, pm_tok, pairs)["accuracy"] if pairs else None
        ci = lambda x: dataclasses.asdict(bootstrap_mean(x, n_boot=config.n_boot, seed=config.seed))  # noqa: E731
        return {"oracle": {"initial": ci(o_before), "ppo": ci(o_after),
                           "effect": dataclasses.asdict(paired_difference(o_after, o_before, n_boot=config.n_boot,
                                                                          seed=config.seed))},
                "preference_model": {"initial": ci(r_before), "ppo": ci(r_after)},
                "words": {"initial": sum(map(word_count, before)) / len(before),
                          "ppo": sum(map(word_count, after)) / len(after)},
                "pm_accuracy_vs_oracle_held_out": {"accuracy": pm_oracle, "pairs": len(pairs)},
                "answers": {"prompts": held, "initial": before, "ppo": after}, "seconds": time.perf_counter() - t}

    evaluated = store.run("ctl-evaluation", evaluation)
    effect = evaluated["oracle"]["effect"]
    return {"task": config.task, "labels": config.labels,
            "oracle": {"positivity": "VADER compound", "concision": "minus the word count",
                       "harmlessness": "1 - scorer P(harmful)"}[config.task],
            "effect": effect, "effect_excludes_zero": effect["low"] > 0 or effect["high"] < 0,
            "label_vs_oracle": fed["label_vs_oracle"], "labels_prefer_longer": fed["prefers_longer"],
            "pm_accuracy_on_hand_labels": fitted["pm_accuracy_on_hand_labels"],
            "evaluation": evaluated, "pairs": fed["pairs"], "pm_history": fitted["pm_history"],
            "ppo_history": tuned["ppo_history"],
            "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
            "timings": {"pairs_s": sampled["seconds"], "feedback_s": fed["seconds"],
                        "preference_model_s": fitted["seconds"], "ppo_s": tuned["seconds"],
                        "evaluation_s": evaluated["seconds"]}}
