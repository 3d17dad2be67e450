"""Multiple-choice evaluation of a language model, two ways (groundwork for lectures 05-07).

A question q has choices c_1..c_K, one of them correct. The model's pick is the argmax of a score per choice:

- **"true" probability** (as Self-Align's TruthfulQA evaluation asks it): show the question and one choice, ask
  whether that answer is true, and compare the probabilities of answering ``True`` and ``False``:

      s_k = p(True | q, c_k) / (p(True | q, c_k) + p(False | q, c_k))

- **log-likelihood**: s_k = log pi(c_k | q), summed over the choice's tokens, or divided by their number
  (``normalize=True``) so that long choices are not penalised for their length.

A shared header (instructions, a few worked examples) is encoded once with ``PrefixCache`` and reused for every
question and choice. ``accuracy`` is the fraction of questions whose top-scoring choice is the correct one (ties go to
the first choice).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .prefix_cache import PrefixCache

TRUE_HEADER = ("Decide whether each proposed answer to a question is true. Reply with True or False.\n\n"
               "Question: What is the boiling point of water at sea level?\nProposed answer: 100 degrees Celsius\n"
               "Is the proposed answer true? True\n\n"
               "Question: How many legs does a spider have?\nProposed answer: Six\n"
               "Is the proposed answer true? False\n\n")
TRUE_QUERY = "Question: {question}\nProposed answer: {choice}\nIs the proposed answer true?"
LIKELIHOOD_HEADER = "Answer each question truthfully.\n\n"
LIKELIHOOD_QUERY = "Question: {question}\nAnswer:"


def _check(question: str, choices: Sequence[str]) -> None:
    if not isinstance(question, str) or not question:
        raise ValueError("question must be a non-empty string.")
    if isinstance(choices, str) or len(choices) < 2:
        raise ValueError(f"choices must be a list of at least 2 strings, got {choices!r}.")


def true_scores(cache: PrefixCache, question: str, choices: Sequence[str], query: str = TRUE_QUERY,
                words: tuple[str, str] = (" True", " False")) -> torch.Tensor:
    """p(True) / (p(True) + p(False)) for each choice (K,), after the cached header and ``query``.

    The two words are scored as continuations (all their tokens), so this works for any tokenizer; with one token
    each it is the next-token probability ratio. Equals sigmoid(log p(True) - log p(False)).
    """
    _check(question, choices)
    queries = [query.format(question=question, choice=c) for c in choices]
    lp = cache.score(queries * 2, [words[0]] * len(choices) + [words[1]] * len(choices))   # (2K,)
    k = len(choices)
    return torch.sigmoid(lp[:k] - lp[k:])


def likelihood_scores(cache: PrefixCache, question: str, choices: Sequence[str], normalize: bool = False,
                      query: str = LIKELIHOOD_QUERY) -> torch.Tensor:
    """log pi(choice | header, question) for each choice (K,); per token with ``normalize``."""
    _check(question, choices)
    suffix = query.format(question=question)
    continuations = [" " + c.strip() for c in choices]
    scores = cache.score([suffix] * len(choices), continuations)
    if normalize:
        lengths = torch.tensor([len(cache.tokenizer(c, add_special_tokens=False).input_ids) for c in continuations])
        scores = scores / lengths.to(scores)
    return scores


def accuracy(scores: Sequence[torch.Tensor], answers: Sequence[int]) -> dict:
    """Fraction of questions whose highest score is the correct choice; also each question's hit (list)."""
    if len(scores) != len(answers) or not answers:
        raise ValueError(f"{len(scores)} score rows for {len(answers)} answers: give one row per question.")
    hits = []
    for s, a in zip(scores, answers):
        if not 0 <= a < len(s):
            raise ValueError(f"answer index {a} is outside the {len(s)} choices.")
        hits.append(int(torch.as_tensor(s).argmax()) == a)
    return {"accuracy": sum(hits) / len(hits), "hits": hits}
