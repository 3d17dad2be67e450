"""AI feedback as a multiple-choice question, read from the feedback model's option probabilities.

Constitutional AI's RL stage (Bai et al. 2022, arXiv 2212.08073) labels pairs of responses with a feedback model
instead of people: the model reads a comparison under a principle, formatted as a multiple-choice question that
ends where the answer letter goes,

    ... Which response is more harmless, honest and helpful?
    Options:
    (A) <first response>
    (B) <second response>
    The answer is: (

and its next-token probabilities of ``A`` and ``B``, renormalised over the two letters, give a **soft label**
p(A) in [0, 1] instead of a hard choice. Language models prefer some letters and positions whatever the content
(position bias), so each pair is asked twice, once in each order, and the two readings are averaged:

    p(first better) = 1/2 [ p_A(first, second) + p_B(second, first) ]

A bias towards one letter that does not depend on the content cancels exactly when the two responses are the same
(p = 1/2), and to first order otherwise; and p(a, b) + p(b, a) = 1 by construction.

With ``cot_tokens`` the judge first reasons: the prompt's last line becomes "Let's think step by step:", the model
writes up to ``cot_tokens`` tokens (greedy, cut at the first blank line), and "So the answer is: (" follows; as in
the paper, such readings are overconfident, so ``clamp=(0.4, 0.6)`` can bound each one. Any causal language model can be
the feedback model: the default model, the policy itself, or a Hub model on a lab GPU.

**Labelled few-shot examples.** The paper prepends worked comparisons, each with its answer letter, to the
question (``few_shot_template``; ``load_feedback_examples`` reads the course's harmlessness examples).

**True/False.** ``TrueFalseJudge`` shows each response alone and reads p(True) for a statement of the principle
("The response is safe and responsible."), renormalised over the two words; the two readings give p(first better)
as the sigmoid of their logit difference (below). It has no order, so no position bias; it still has any bias the
model has towards one of the words, which cancels in the difference.

A judge is only as good as its reading of the principle: ``alignlib.judge_validation`` measures each format
against an oracle (hand labels, word counts, VADER, a regular expression) before the labels are used.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .data import DATA_DIR, read_jsonl
from .generation import tokenize_prompts
from .logprobs import position_ids_from_mask

def soft_labels(logp_first_order: torch.Tensor, logp_swapped: torch.Tensor) -> dict:
    """Debiased soft labels from the letters' log-probabilities in both orders.

    Args:
        logp_first_order: (B, 2) log-probabilities (or logits) of the letters A and B with the first response shown
            as (A) and the second as (B).
        logp_swapped: (B, 2) the same with the two responses swapped: the first response is now (B).

    Returns ``p`` (B,) = 1/2 [ p_A(first, second) + p_B(second, first) ], p(first response better), where each
    reading is renormalised over the two letters (softmax of the pair), and the two readings ``p_first_order`` and
    ``p_swapped``. Swapping the arguments gives 1 - p.
    """
    if logp_first_order.shape != logp_swapped.shape or logp_first_order.dim() != 2 or logp_first_order.shape[1] != 2:
        raise ValueError(f"logp_first_order {tuple(logp_first_order.shape)} and logp_swapped "
                         f"{tuple(logp_swapped.shape)} must both be (B, 2): the letters A and B of each pair.")
    p_first_order = logp_first_order.float().softmax(-1)[:, 0]      # (B,) first shown as A
    p_swapped = logp_swapped.float().softmax(-1)[:, 1]              # (B,) first shown as B
    return {"p": 0.5 * (p_first_order + p_swapped), "p_first_order": p_first_order, "p_swapped": p_swapped}


def check_batch(questions, first, second, principles) -> list[str]:
    """One principle per question (a single string is repeated), after checking that the lists align."""
    n = len(questions)
    if not n or len(first) != n or len(second) != n:
        raise ValueError(f"questions ({n}), first ({len(first)}) and second ({len(second)}) must be non-empty "
                         "and of the same length.")
    principles = [principles] * n if isinstance(principles, str) else list(principles)
    if len(principles) != n:
        raise ValueError(f"{len(principles)} principles for {n} questions: give one, or one per question.")
    return principles


COMPARISON = ("Consider the following question and two possible responses.\n\nQuestion: {question}\n\n"
              "{principle}\nOptions:\n(A) {first}\n(B) {second}\nThe answer is: (")


@dataclass
class MultipleChoiceJudge:
    """A feedback model asked multiple-choice comparisons; ``template`` has ``{question}``, ``{principle}``,
    ``{first}`` and ``{second}`` fields and ends just before the answer letter."""

    model: object
    tokenizer: object
    template: str = COMPARISON
    letters: tuple = ("A", "B")
    batch_size: int = 8
    cot_tokens: int = 0
    """Chain of thought: tokens of reasoning written before the answer letter (0: none)."""
    clamp: tuple | None = None
    """Bounds (low, high) for each order's reading, e.g. (0.4, 0.6) with chain of thought (None: no bounds)."""
    shared_prefix_tokens: int = 64
    """Prompts sharing at least this many first tokens (few-shot examples) encode them once; 0: never."""

    def __post_init__(self):
        ids = [self.tokenizer(letter, add_special_tokens=False).input_ids for letter in self.letters]
        if any(len(i) != 1 for i in ids) or len({i[0] for i in ids}) != len(ids):
            raise ValueError(f"each of the letters {self.letters} must be one distinct token for this tokenizer.")
        self.letter_ids = torch.tensor([i[0] for i in ids])

    @torch.no_grad()
    def option_logprobs(self, prompts: Sequence[str]) -> torch.Tensor:
        """Next-token log-probabilities of the letters after each prompt: (B, len(letters)). Prompts that share a
        long beginning (a few-shot prefix) encode it once (``shared_prefix_logprobs``)."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings.")
        device = next(self.model.parameters()).device
        if self.shared_prefix_tokens and len(prompts) > 1:
            rows = [self.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
            shared = 0
            while (shared < min(len(r) for r in rows) - 1
                   and all(r[shared] == rows[0][shared] for r in rows)):
                shared += 1
            if shared >= self.shared_prefix_tokens:
                return self.shared_prefix_logprobs(rows, shared, device)
        out = []
        for i in range(0, len(prompts), self.batch_size):   # left-padded, no special tokens added (chat=True)
            ids, mask = tokenize_prompts(self.tokenizer, list(prompts[i:i + self.batch_size]), True, device)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                                logits_to_keep=1).logits[:, -1].float()                    # (b, V)
            out.append(logits.log_softmax(-1)[:, self.letter_ids.to(device)].cpu())
        return torch.cat(out)

    @torch.no_grad()
    def shared_prefix_logprobs(self, rows: list[list[int]], shared: int, device) -> torch.Tensor:
        """The letters' log-probabilities after token ``rows`` whose first ``shared`` tokens are the same: their keys
        and values are computed once and every row's rest attends to them (as ``prefix_cache.PrefixCache`` does;
        equal to a full recompute up to float rounding). The rests are left-padded, their positions continuing the
        prefix's, so the last column is every row's last token."""
        prefix = torch.tensor([rows[0][:shared]], device=device)
        cache = self.model(input_ids=prefix, use_cache=True, logits_to_keep=1).cache
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = []
        for i in range(0, len(rows), self.batch_size):
            rests = [r[shared:] for r in rows[i:i + self.batch_size]]
            b, width = len(rests), max(len(r) for r in rests)
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rests], device=device)         # (b, S)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rests], device=device)
            batch_cache = copy.deepcopy(cache)
            batch_cache.batch_repeat_interleave(b)
            attention = torch.cat([torch.ones(b, shared, dtype=mask.dtype, device=device), mask], 1)
            positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids, attention_mask=attention, cache=batch_cache, position_ids=positions,
                                use_cache=True, logits_to_keep=1).logits[:, -1].float()          # (b, V)
            out.append(logits.log_softmax(-1)[:, self.letter_ids.to(device)].cpu())
        return torch.cat(out)

    def option_probs(self, prompts: Sequence[str]) -> torch.Tensor:
        """Next-token probabilities of the letters after each prompt, renormalised over them: (B, len(letters))."""
        return self.option_logprobs(prompts).softmax(-1)

    def prefer_first(self, questions: Sequence[str], first: Sequence[str], second: Sequence[str],
                     principles: Sequence[str] | str) -> dict:
        """Soft labels p(first better), both orders averaged: ``p`` (B,), and each order's reading
        ``p_first_order`` = p_A(first, second) and ``p_swapped`` = p_B(second, first)."""
        n, principles = len(questions), check_batch(questions, first, second, principles)
        fill = lambda a, b: [self.template.format(question=q, principle=p, first=x, second=y)  # noqa: E731
                             for q, p, x, y in zip(questions, principles, a, b)]
        prompts = fill(first, second) + fill(second, first)
        if self.cot_tokens:
            prompts = self.reason(prompts)
        both = self.option_logprobs(prompts)                                                 # (2B, 2)
        out = soft_labels(both[:n], both[n:])
        if self.clamp is not None:
            lo, hi = self.clamp
            a, b = out["p_first_order"].clamp(lo, hi), out["p_swapped"].clamp(lo, hi)
            out = {"p": 0.5 * (a + b), "p_first_order": a, "p_swapped": b}
        return out

    def reason(self, prompts: Sequence[str]) -> list[str]:
        """Each prompt with its last line replaced by a greedy chain of thought, then the answer cue."""
        from .generation import generate

        cue = "The answer is: ("
        if not all(p.endswith(cue) for p in prompts):
            raise ValueError(f"chain of thought needs a template that ends with {cue!r}.")
        heads = [p[:-len(cue)] + "Let's think step by step:" for p in prompts]
        thoughts = generate(self.model, self.tokenizer, heads, max_new_tokens=self.cot_tokens, do_sample=False,
                            chat=False, batch_size=self.batch_size).responses
        return [h + " " + t.strip().split("\n\n")[0].strip() + "\nSo the answer is: (" for h, t in zip(heads, thoughts)]


# ---------------------------------------------------------------- labelled few-shot examples (the paper's prefix)

EXAMPLE_FIELDS = ("question", "principle", "first", "second", "answer")


def few_shot_template(examples: Sequence[dict], template: str = COMPARISON) -> str:
    """A template with the same fields as ``template`` whose prefix holds the worked ``examples``.

    Each example is a dict ``{"question", "principle", "first", "second", "answer": "A" | "B"}``; it is written as
    ``template`` filled in, followed by its answer letter (and ``)`` when the template ends with ``(``), and the
    examples are separated by blank lines. Braces in the examples are doubled, so the result can be filled with
    ``.format`` as ``template`` is; pass it as ``MultipleChoiceJudge(..., template=...)``. No examples: ``template``.
    """
    if isinstance(examples, dict) or isinstance(examples, str):
        raise ValueError("examples must be a list of dicts with the fields " + ", ".join(EXAMPLE_FIELDS) + ".")
    shots = []
    for i, ex in enumerate(examples):
        missing = [k for k in EXAMPLE_FIELDS if k not in ex]
        if missing:
            raise ValueError(f"examples[{i}] lacks {missing}: each example needs {', '.join(EXAMPLE_FIELDS)}.")
        if ex["answer"] not in ("A", "B"):
            raise ValueError(f"examples[{i}]['answer'] is {ex['answer']!r}: write 'A' or 'B'.")
        filled = template.format(**{k: ex[k] for k in EXAMPLE_FIELDS[:4]})
        shots.append(filled + ex["answer"] + (")" if template.endswith("(") else ""))
    if not shots:
        return template
    prefix = "\n\n".join(shots) + "\n\n"
    return prefix.replace("{", "{{").replace("}", "}}") + template


def load_feedback_examples(k: int | None = None, split: str = "train", data_dir=None) -> list[dict]:
    """Labelled harmlessness comparisons for ``few_shot_template``, from the course's critique-revision examples
    (``data/constitution/few_shot.jsonl``): each risky request with its harmful first reply against its revision,
    under one of the comparison principles of the same split (in turn). The better reply is (A) in even examples and
    (B) in odd ones, so the prefix teaches no letter. None of these requests is in the evaluation set."""
    root = Path(data_dir) if data_dir is not None else DATA_DIR
    rows = [r for r in read_jsonl(root / "constitution" / "few_shot.jsonl", ("prompt", "response", "revision", "split"))
            if r["split"] == split]
    principles = [r["principle"] for r in read_jsonl(root / "constitution" / "comparison_principles.jsonl",
                                                      ("principle", "split")) if r["split"] == split]
    if not rows or not principles:
        raise ValueError(f"no few-shot examples or principles of split {split!r}: use 'train' or 'test'.")
    if k is not None and k < 0:
        raise ValueError(f"k must be >= 0 (or None for all), got {k}.")
    out = []
    for i, r in enumerate(rows[:k] if k is not None else rows):
        good, bad = r["revision"], r["response"]
        out.append({"question": r["prompt"], "principle": principles[i % len(principles)],
                    "first": good if i % 2 == 0 else bad, "second": bad if i % 2 == 0 else good,
                    "answer": "A" if i % 2 == 0 else "B"})
    return out


# ---------------------------------------------------------------- True/False: each response alone

TRUE_FALSE = ("Consider the following question and a response.\n\nQuestion: {question}\n\nResponse: {response}\n\n"
              "True or false: {principle}\nAnswer:")


@dataclass
class TrueFalseJudge(MultipleChoiceJudge):
    """Each response asked alone whether it follows the principle, read from p(True) against p(False).

    ``template`` has ``{question}``, ``{response}`` and ``{principle}`` and ends where the word goes; the principle
    is a statement about one response ("The response ends with a question to the user."). With r = p(True) /
    (p(True) + p(False)) for each response, ``p`` = p(first better) = sigmoid(logit r_first - logit r_second), the
    Bradley-Terry probability of the two readings (Bradley & Terry 1952): exactly 1/2 for identical responses and
    1 - p when they are swapped. A word stands for its first token; the first tokens must differ (SmolLM2's
    " True" and " False" are single tokens; a character tokenizer needs ``words=("True", "False")``)."""

    template: str = TRUE_FALSE
    letters: tuple = (" True", " False")
    principle_field = "statement"
    """The field of a validation pair this judge reads as its principle (a statement, not a comparison)."""

    def __post_init__(self):
        if self.cot_tokens or self.clamp is not None:
            raise ValueError("TrueFalseJudge has no chain of thought or clamp: leave cot_tokens=0 and clamp=None.")
        ids = [self.tokenizer(w, add_special_tokens=False).input_ids[:1] for w in self.letters]
        if len(self.letters) != 2 or any(not i for i in ids) or ids[0] == ids[1]:
            raise ValueError(f"letters {self.letters} must be two words whose first tokens differ for this tokenizer, "
                             "e.g. (' True', ' False') or ('True', 'False').")
        self.letter_ids = torch.tensor([i[0] for i in ids])

    def p_true(self, questions: Sequence[str], responses: Sequence[str], principles: Sequence[str]) -> torch.Tensor:
        """p(True) renormalised over the two words, one per response: (B,)."""
        prompts = [self.template.format(question=q, response=r, principle=p)
                   for q, r, p in zip(questions, responses, principles)]
        return self.option_logprobs(prompts).softmax(-1)[:, 0]

    def prefer_first(self, questions: Sequence[str], first: Sequence[str], second: Sequence[str],
                     principles: Sequence[str] | str) -> dict:
        """``p`` (B,) = sigmoid(logit r_first - logit r_second); the readings ``p_true_first``, ``p_true_second``."""
        n, principles = len(questions), check_batch(questions, first, second, principles)
        r = self.p_true(list(questions) * 2, list(first) + list(second), principles * 2).double()
        logit = torch.logit(r.clamp(1e-12, 1 - 1e-12))
        p = torch.sigmoid(logit[:n] - logit[n:]).float()
        return {"p": p, "p_true_first": r[:n].float(), "p_true_second": r[n:].float()}


def true_false_judge(model, tokenizer, batch_size: int = 8) -> TrueFalseJudge:
    """A ``TrueFalseJudge`` reading " True" / " False"; a tokenizer whose two words share a first token (a character
    tokenizer such as tiny-random's) reads "True" and "False" instead."""
    try:
        return TrueFalseJudge(model, tokenizer, batch_size=batch_size)
    except ValueError:
        return TrueFalseJudge(model, tokenizer, batch_size=batch_size, letters=("True", "False"))
