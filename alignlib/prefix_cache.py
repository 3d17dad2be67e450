"""Long shared prompts encoded once: the keys and values of a shared prefix computed one time, reused by every request.

Constitutional AI's critique prompts (a constitution and few-shot conversations) and Self-Align's principle-driven
prompt (16 principles and exemplars) are long and shared by every request; only the short request at the end
differs. In a causal decoder the keys and values at the prefix positions depend on the prefix alone, so they can be
computed once and every request attends to them, as serving engines do with prefix caching. For R requests of S
tokens after a prefix of P tokens this costs one pass over P plus R passes over S, instead of R passes over P + S.

``PrefixCache(model, tokenizer, prefix)`` encodes the prefix; then

- ``last_logits(suffixes)`` (B, V): the next-token logits after prefix + suffix, for multiple-choice feedback (the
  probability of "(A)" or of "True") — the suffixes are right-padded and read at their own last token;
- ``score(suffixes, continuations)`` (B,): the summed log-probability of each continuation after prefix + suffix;
- ``generate(suffix, max_new_tokens)``: greedy decoding after prefix + suffix through ``model.generate``, with a copy
  of the cached prefix as its ``cache``;
- ``generate_batch(suffixes, max_new_tokens)``: greedy decoding of many suffixes at once, the prefix's keys and
  values repeated per row and each suffix left-padded up to the prefix (its pad positions masked, its position ids
  continuing the prefix's), so every row sees exactly prefix + its suffix.

Each equals a full recompute up to float rounding (``tests/test_prefix_cache.py``). The prefix is tokenized alone
and the suffix appended as tokens, so the split point is a token boundary: end the prefix where a tokenizer would
split anyway (after a newline, for example).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch


class PrefixCache:
    """The keys and values of ``prefix`` under ``model``, ready to be shared by any number of requests."""

    def __init__(self, model, tokenizer, prefix: str):
        if not prefix:
            raise ValueError("prefix is empty: there is nothing to cache; call the model directly.")
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.ids = tokenizer(prefix, return_tensors="pt", add_special_tokens=False).input_ids.to(self.device)  # (1, P)
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and self.ids.shape[1] >= limit:
            raise ValueError(f"the prefix has {self.ids.shape[1]} tokens, the model's context {limit}; shorten it.")
        with torch.no_grad():
            self.cache = model(input_ids=self.ids, use_cache=True, logits_to_keep=1).cache   # no prefix logits needed

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    def _tokens(self, texts: Sequence[str]) -> list[list[int]]:
        if isinstance(texts, str) or not texts:
            raise ValueError("pass a non-empty list of strings (one per request).")
        return [self.tokenizer(t, add_special_tokens=False).input_ids for t in texts]

    def _encode(self, texts: Sequence[str], rows: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded token ids (B, S) and mask (B, S) of texts (or of token ``rows``), each at least one token."""
        rows = rows if rows is not None else self._tokens(texts)
        if any(len(r) == 0 for r in rows):
            raise ValueError("every suffix needs at least one token.")
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
        return ids, mask

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, S, V) of right-padded ``ids`` after the cached prefix."""
        b = ids.shape[0]
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(b)
        full_mask = torch.cat([torch.ones(b, self.length, dtype=mask.dtype, device=self.device), mask], 1)
        positions = self.length + torch.arange(ids.shape[1], device=self.device).expand(b, -1)
        return self.model(input_ids=ids, attention_mask=full_mask, cache=cache, position_ids=positions,
                          use_cache=True).logits

    def last_logits(self, suffixes: Sequence[str]) -> torch.Tensor:
        """Next-token logits after prefix + each suffix: (B, V)."""
        ids, mask = self._encode(suffixes)
        logits = self._forward(ids, mask)                                     # (B, S, V)
        last = mask.sum(-1) - 1                                               # (B,) each suffix's last token
        return logits[torch.arange(len(suffixes)), last].float()

    def score(self, suffixes: Sequence[str], continuations: Sequence[str]) -> torch.Tensor:
        """Summed log pi(continuation | prefix + suffix) of each pair: (B,)."""
        if len(suffixes) != len(continuations):
            raise ValueError(f"{len(suffixes)} suffixes and {len(continuations)} continuations: give one of each.")
        heads, tails = self._tokens(suffixes), self._tokens(continuations)   # tokenized apart: an exact boundary
        if any(len(t) == 0 for t in tails):
            raise ValueError("every continuation needs at least one token.")
        cut = [len(h) for h in heads]
        ids, mask = self._encode([], [h + t for h, t in zip(heads, tails)])
        logits = self._forward(ids, mask).float()                             # (B, S, V)
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)   # (B, S-1)
        target = torch.zeros_like(mask[:, 1:], dtype=torch.bool)
        for i, c in enumerate(cut):                                           # continuation tokens only
            target[i, max(c - 1, 0):] = mask[i, max(c, 1):].bool()
        return (logp * target).sum(-1)

    @torch.no_grad()
    def generate(self, suffix: str, max_new_tokens: int = 64) -> str:
        """Greedy continuation of prefix + ``suffix`` (the prefix's keys and values are not recomputed)."""
        ids, _ = self._encode([suffix])
        full = torch.cat([self.ids, ids], 1)
        out = self.model.generate(input_ids=full, attention_mask=torch.ones_like(full),
                                  cache=copy.deepcopy(self.cache), max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.decode(out[0, full.shape[1]:], skip_special_tokens=True)

    @torch.no_grad()
    def generate_batch(self, suffixes: Sequence[str], max_new_tokens: int = 64) -> list[str]:
        """Greedy continuations of prefix + each suffix, all rows decoded together: (B,) strings."""
        rows = self._tokens(suffixes)
        if any(len(r) == 0 for r in rows):
            raise ValueError("every suffix needs at least one token.")
        b, width = len(rows), max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eos = self.tokenizer.eos_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)        # (B, S) left-padded
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(b)
        attention = torch.cat([torch.ones(b, self.length, dtype=mask.dtype, device=self.device), mask], 1)
        positions = self.length + (mask.cumsum(-1) - 1).clamp(min=0)                                 # (B, S)
        out = self.model(input_ids=ids, attention_mask=attention, cache=cache, position_ids=positions,
                         use_cache=True, logits_to_keep=1)
        position = positions[:, -1:]                                                                  # (B, 1)
        tokens, done = [], torch.zeros(b, dtype=torch.bool, device=self.device)
        for _ in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)                                                       # (B,)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            tokens.append(nxt)
            done |= nxt == eos if eos is not None else torch.zeros_like(done)
            if done.all():
                break
            attention = torch.cat([attention, torch.ones(b, 1, dtype=attention.dtype, device=self.device)], 1)
            position = position + 1
            out = self.model(input_ids=nxt[:, None], attention_mask=attention, cache=out.cache,
                             position_ids=position, use_cache=True)
        new = torch.stack(tokens, 1).tolist()                                                         # (B, N)
        texts = []
        for row in new:
            if eos is not None and eos in row:
                row = row[:row.index(eos)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return texts
