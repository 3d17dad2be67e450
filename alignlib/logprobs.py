"""Turning logits into numbers: per-token log-probs, masked sums and means, sequence scores, entropy.

Layout used across the course: a batch of sequences ``input_ids`` (B, T) laid out as
``[left padding | prompt | response | right padding]`` with an ``attention_mask`` (B, T) that is 1 on real
tokens and a ``response_mask`` (B, T) that is 1 on the response tokens only. Per-token log-probs are
aligned with ``input_ids``: column t holds log pi(x_t | x_<t); column 0 has no context and is 0.

Equations (lecture 00):
    log pi(y | x)              = sum_t log pi(y_t | x, y_<t)                        (sequence log-prob)
    p(y | x) (length-normed)   = 1/|y|^alpha * sum_t log pi(y_t | x, y_<t)          (RRHF's score, alpha=1)
    H_t                        = -sum_v pi(v | x, y_<t) log pi(v | x, y_<t)         (entropy)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shapes must match, got {shapes}; pass tensors laid out as (batch, tokens).")


def gather_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[labels]: logits (B, T, V), labels (B, T) -> (B, T).

    Computed as ``logit[label] - logsumexp(logits)`` so the (B, T, V) log-softmax is never stored.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T).")
    logits = logits.float()
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution: logits (B, T, V) -> (B, T), in nats."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so left padding does not shift the rotary positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sequence_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The model's logits (B, T, V), with positions computed from the mask (left padding safe)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return out.logits


def token_logprobs_from_logits(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs aligned with ``input_ids``: logits (B, T, V), ids (B, T) -> (B, T), column 0 = 0.

    ``logits`` may also cover only the last L <= T positions (a forward pass with ``logits_to_keep=L``, which
    skips the LM head on the prompt); the columns that no kept logit predicts, [0, T - L + 1), are then 0.
    """
    T, L = input_ids.shape[1], logits.shape[1]
    if L > T:
        raise ValueError(f"logits cover {L} positions but input_ids only {T}.")
    lp = gather_logprobs(logits[:, :-1], input_ids[:, T - L + 1:])  # position t predicts token t+1
    return F.pad(lp, (T - L + 1, 0), value=0.0)


def token_entropy_from_logits(logits: torch.Tensor, length: int) -> torch.Tensor:
    """Entropy of the distribution that drew each token, aligned like ``token_logprobs_from_logits``: (B, T)."""
    ent = entropy_from_logits(logits[:, :-1])
    return F.pad(ent, (length - logits.shape[1] + 1, 0), value=0.0)


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   return_entropy: bool = False):
    """Per-token log pi(x_t | x_<t) of ``model`` on ``input_ids`` (B, T) -> (B, T); optionally entropy (B, T)."""
    _check_same_shape(input_ids=input_ids, attention_mask=attention_mask)
    logits = sequence_logits(model, input_ids, attention_mask)  # (B, T, V)
    lp = token_logprobs_from_logits(logits, input_ids)
    if not return_entropy:
        return lp
    ent = token_entropy_from_logits(logits, input_ids.shape[1])
    return lp, ent


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = -1) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is 1 (padding never counts)."""
    _check_same_shape(values=values, mask=mask)
    masked = values * mask.to(values.dtype)
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is 1; raises if the mask is empty."""
    count = mask.to(values.dtype).sum() if dim is None else mask.to(values.dtype).sum(dim)
    if (count == 0).any():
        raise ValueError("mask selects no position: every sequence needs at least one masked-in token.")
    return masked_sum(values, mask, dim) / count


def sequence_logprob(token_lp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(y | x) = sum over response tokens: (B, T), (B, T) -> (B,)."""
    return masked_sum(token_lp, mask, dim=-1)


def length_normalized_logprob(token_lp: torch.Tensor, mask: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """RRHF's score p = sum_t log pi(y_t | ...) / |y|^alpha: (B, T), (B, T) -> (B,).

    ``alpha`` is the length-penalty exponent: 1 is the mean log-prob per token, 0 the plain sum.
    """
    lengths = mask.to(token_lp.dtype).sum(-1)  # (B,)
    if (lengths == 0).any():
        raise ValueError("a sequence has an empty response mask; its length-normalised score is undefined.")
    return sequence_logprob(token_lp, mask) / lengths.pow(alpha)


@torch.no_grad()
def score_responses(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                    batch_size: int = 16, alpha: float = 1.0) -> dict:
    """Sequence scores of a rollout without gradients, in micro-batches.

    Returns ``{"logprob": (B,), "normalized": (B,), "token_logprobs": (B, T)}``.
    """
    _check_same_shape(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks = [token_logprobs(model, input_ids[i:i + batch_size], attention_mask[i:i + batch_size])
              for i in range(0, input_ids.shape[0], batch_size)]
    lp = torch.cat(chunks)  # (B, T)
    return {
        "logprob": sequence_logprob(lp, response_mask),
        "normalized": length_normalized_logprob(lp, response_mask, alpha),
        "token_logprobs": lp,
    }


@torch.no_grad()
def divergence_from_reference(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                              response_mask: torch.Tensor, ref_model=None, batch_size: int = 16,
                              temperature: float = 1.0) -> dict:
    """How far a policy's responses have drifted from the reference (the base model, or ``ref_model``).

    Returns per-sequence ``kl`` (B,) = sum_t [log pi(y_t | .) - log rho(y_t | .)], the k1 estimate of
    KL(pi || rho) when the responses were sampled from pi, and ``ref_nll`` (B,), the mean negative log-likelihood
    per response token under rho, whose exp is the responses' perplexity as the reference model sees them.
    ``temperature``: the one the responses were sampled at; both models' logits are divided by it, so that pi is the
    distribution that actually sampled (PPO's ``kl/ref`` and ``ppl/ref`` are computed the same way). At 1 (the
    default) the logits are used as they are.
    """
    from .models import maybe_reference

    _check_same_shape(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask)
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a number > 0 (the sampling temperature), got {temperature!r}.")
    cols = response_mask.any(0).nonzero()
    if len(cols) == 0:
        raise ValueError("response_mask is empty: there is no response to compare.")
    keep = input_ids.shape[1] - int(cols[0]) + 1  # logits that predict response tokens
    kl, nll = [], []
    for i in range(0, input_ids.shape[0], batch_size):
        ids, mask, resp = (t[i:i + batch_size] for t in (input_ids, attention_mask, response_mask))
        kw = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False,
                  logits_to_keep=keep)
        lp = token_logprobs_from_logits(model(**kw).logits / temperature, ids)
        with maybe_reference(model, ref_model) as ref:
            ref_lp = token_logprobs_from_logits(ref(**kw).logits / temperature, ids)
        kl.append(masked_sum(lp - ref_lp, resp))
        nll.append(-length_normalized_logprob(ref_lp, resp))
    return {"kl": torch.cat(kl), "ref_nll": torch.cat(nll)}
