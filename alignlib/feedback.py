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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

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

    def __post_init__(self):
        ids = [self.tokenizer(letter, add_special_tokens=False).input_ids for letter in self.letters]
        if any(len(i) != 1 for i in ids) or len({i[0] for i in ids}) != len(ids):
            raise ValueError(f"each of the letters {self.letters} must be one distinct token for this tokenizer.")
        self.letter_ids = torch.tensor([i[0] for i in ids])

    @torch.no_grad()
    def option_logprobs(self, prompts: Sequence[str]) -> torch.Tensor:
        """Next-token log-probabilities of the letters after each prompt: (B, len(letters))."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings.")
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(prompts), self.batch_size):   # left-padded, no special tokens added (chat=True)
            ids, mask = tokenize_prompts(self.tokenizer, list(prompts[i:i + self.batch_size]), True, device)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                                logits_to_keep=1).logits[:, -1].float()                    # (b, V)
            out.append(logits.log_softmax(-1)[:, self.letter_ids.to(device)].cpu())
        return torch.cat(out)

    def option_probs(self, prompts: Sequence[str]) -> torch.Tensor:
        """Next-token probabilities of the letters after each prompt, renormalised over them: (B, len(letters))."""
        return self.option_logprobs(prompts).softmax(-1)

    def prefer_first(self, questions: Sequence[str], first: Sequence[str], second: Sequence[str],
                     principles: Sequence[str] | str) -> dict:
        """Soft labels p(first better), both orders averaged: ``p`` (B,), and each order's reading
        ``p_first_order`` = p_A(first, second) and ``p_swapped`` = p_B(second, first)."""
        n = len(questions)
        if not n or len(first) != n or len(second) != n:
            raise ValueError(f"questions ({n}), first ({len(first)}) and second ({len(second)}) must be non-empty "
                             "and of the same length.")
        principles = [principles] * n if isinstance(principles, str) else list(principles)
        if len(principles) != n:
            raise ValueError(f"{len(principles)} principles for {n} questions: give one, or one per question.")
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
