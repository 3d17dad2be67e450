"""Sampling responses into a ``Rollout``: chat templates, left padding, EOS handling, seeds, diverse beams.

A ``Rollout`` keeps the token layout of ``alignlib.logprobs``:
``input_ids`` (B, T) = [left padding | prompt | response | right padding], with ``attention_mask`` 1 on real
tokens and ``response_mask`` 1 on response tokens up to and including the first EOS. Tokens that
``generate`` emits after EOS (padding of finished rows) are masked out, never scored or trained on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, NoRepeatNGramLogitsProcessor

from .engine.decode import _causal_lm, _linears, fast_decode, fast_decode_supported, sample_next_token
from .engine.packed_linear import PackedLinears
from .logprobs import position_ids_from_mask
from .utils import check_top


@dataclass
class Rollout:
    """Prompts and sampled responses of one batch, as text and as aligned token tensors."""

    prompts: list[str]               # (B,) the user prompts (before the chat template)
    responses: list[str]             # (B,) decoded response text, EOS and padding removed
    input_ids: torch.Tensor          # (B, P + R) left-padded prompt, then response
    attention_mask: torch.Tensor     # (B, P + R) 1 on real tokens
    response_mask: torch.Tensor      # (B, P + R) 1 on response tokens (through the first EOS)
    prompt_width: int                # P: columns [0, P) hold the (left-padded) prompt
    finished: torch.Tensor           # (B,) bool, True where the response ended with EOS
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.responses)

    @property
    def response_ids(self) -> torch.Tensor:  # (B, R)
        return self.input_ids[:, self.prompt_width:]

    @property
    def response_lengths(self) -> torch.Tensor:  # (B,)
        return self.response_mask.sum(-1)

    def to(self, device) -> "Rollout":
        for name in ("input_ids", "attention_mask", "response_mask", "finished"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def check_prompts(prompts) -> list[str]:
    """``prompts`` as a list of non-empty strings that UTF-8 can encode, or an error naming the first bad index (an
    empty prompt gives a raw-text batch no token to start from; a lone surrogate such as "\\ud800" crashes the
    tokenizer)."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, got one string; wrap it: [prompt].")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt.")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings; items {bad[:5]} are not.")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompts[{i}] is an empty string; give every prompt some text (drop empty ones).")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"prompts[{i}] is not valid Unicode text: {p[err.start:err.end]!r} at position "
                             f"{err.start} is a lone surrogate; decode the source text properly (e.g. bytes."
                             "decode('utf-8')) or drop the character.") from None
    return prompts


def format_prompts(tokenizer, prompts: list[str], chat: bool = True, system: str | None = None) -> list[str]:
    """Wrap each prompt in the tokenizer's chat template (with the assistant turn opened), or keep it raw."""
    prompts = check_prompts(prompts)
    if not chat:
        return prompts
    if not tokenizer.chat_template:
        raise ValueError("this tokenizer has no chat template; pass chat=False to use raw prompts.")
    out = []
    for p in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
        out.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return out


def eos_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    cfg = getattr(model, "generation_config", None)
    extra = getattr(cfg, "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return sorted(i for i in ids if i is not None)


def response_mask_from_ids(response_ids: torch.Tensor, eos: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """1 on response tokens through the first EOS, 0 after it: (B, R) -> mask (B, R), finished (B,)."""
    is_eos = torch.isin(response_ids, torch.tensor(eos, device=response_ids.device))  # (B, R)
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()  # EOS tokens strictly before position t
    mask = (eos_before == 0).long()
    return mask, is_eos.any(-1)


def build_rollout(tokenizer, prompts, prompt_ids, prompt_mask, response_ids, eos, meta=None) -> Rollout:
    """Assemble a Rollout from left-padded prompts (B, P) and raw generated continuations (B, R)."""
    resp_mask, finished = response_mask_from_ids(response_ids, eos)  # (B, R), (B,)
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, resp_mask], dim=1)
    response_mask = torch.cat([torch.zeros_like(prompt_mask), resp_mask], dim=1)
    keep = resp_mask.bool() & ~torch.isin(response_ids, torch.tensor(eos, device=response_ids.device))
    texts = [tokenizer.decode(row[k], skip_special_tokens=True) for row, k in zip(response_ids, keep)]
    return Rollout(prompts, texts, input_ids, attention_mask, response_mask, prompt_ids.shape[1], finished,
                   meta or {})


def tokenize_prompts(tokenizer, texts: list[str], chat: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def stack_chunks(rows, pad: int):
    """Concatenate chunks of (prompt ids (b, P_i), prompt mask (b, P_i), response ids (b, R_i)).

    Chunks differ in prompt width and response width: prompts are padded on the left and responses on the
    right to the widest, so the layout [left padding | prompt | response | right padding] holds for all rows.
    """
    F = torch.nn.functional
    width_p = max(r[0].shape[1] for r in rows)
    width_r = max(r[2].shape[1] for r in rows)
    ids = torch.cat([F.pad(r[0], (width_p - r[0].shape[1], 0), value=pad) for r in rows])
    mask = torch.cat([F.pad(r[1], (width_p - r[1].shape[1], 0), value=0) for r in rows])
    resp = torch.cat([F.pad(r[2], (0, width_r - r[2].shape[1]), value=pad) for r in rows])
    return ids, mask, resp


@torch.no_grad()
def check_context(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> None:
    """Refuse a prompt plus ``max_new_tokens`` longer than the model's context, before any cache is sized to it."""
    limit = getattr(getattr(_causal_lm(model), "config", None), "max_position_embeddings", None)
    if not limit:
        return
    longest = int(mask.sum(-1).max())                 # the longest prompt of the batch, in tokens (no padding)
    if longest + max_new_tokens > limit:
        raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
                         f"context of {limit} tokens; shorten the prompt or lower max_new_tokens (nothing is "
                         f"truncated silently).")


class RowStreamSampler(LogitsProcessor):
    """For ``model.generate`` (sharded models, other architectures): draw each row's token from its own stream
    with ``sample_next_token`` and leave only that token possible, so greedy decoding emits it."""

    def __init__(self, generators: list, temperature: float, top_k: int, top_p: float):
        self.generators, self.temperature, self.top_k, self.top_p = generators, temperature, top_k, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        token = sample_next_token(scores, True, self.temperature, self.top_k, self.top_p, self.generators)
        only = torch.full_like(scores, float("-inf"))
        return only.scatter_(-1, token[:, None], 0.0)


def row_stream(seed: int, sample: int, device) -> torch.Generator:
    """The random stream of sample ``sample`` of a prompt with seed ``seed`` (see ``generate(row_seeds=...)``)."""
    return torch.Generator(device).manual_seed((int(seed) * 1_000_003 + sample) % (2 ** 63))


def generate(model, tokenizer, prompts, max_new_tokens: int = 48, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, do_sample: bool = True, num_return_sequences: int = 1, chat: bool = True,
             system: str | None = None, seed: int | None = None, batch_size: int | None = None,
             progress: bool = False, fast: bool = True, row_seeds: Sequence[int] | None = None,
             no_repeat_ngram_size: int = 0) -> Rollout:
    """Sample (or greedily decode) responses to ``prompts``.

    Args:
        prompts: list of user prompts (B,). With ``num_return_sequences=k`` the rollout has B*k rows,
            the k samples of a prompt next to each other.
        chat: wrap prompts in the chat template (instruct models); ``False`` continues raw text.
        seed: seeds torch before sampling, so the same seed gives the same responses on one machine.
        batch_size: prompts per ``generate`` call (memory bound); the default does all at once.
        top_k: keep the k most likely tokens when sampling; 0 keeps all. top_p: nucleus sampling, 1.0 is off.
        fast: decode with ``fast_decode`` (a lean loop, about 2x faster than ``model.generate`` on a CPU at batch
            16; same greedy output) where the architecture allows; ``False`` (or an unsupported model) uses
            transformers' ``model.generate``.
        row_seeds: one seed per prompt; sample j of prompt i then comes from its own random stream
            (``row_stream``), the same whichever prompts share its batch or process. Distributed PPO, RRHF and
            RAFT use it so that two processes sample what one process would.
        no_repeat_ngram_size: n > 0 forbids any token that would repeat an n-gram already in the prompt or the
            response (transformers' ``NoRepeatNGramLogitsProcessor``; the n-gram repetition control Dromedary's
            verbose cloning decodes with). It decodes with ``model.generate`` (``fast`` does not apply); 0 is off.
    """
    prompts = check_prompts(prompts)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if do_sample and not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0 when sampling, got {temperature!r}; use "
                         "do_sample=False for greedy decoding.")
    for name, value in (("num_return_sequences", num_return_sequences), ("batch_size", batch_size or 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    check_top(top_k, top_p)
    if isinstance(no_repeat_ngram_size, bool) or not isinstance(no_repeat_ngram_size, int) or no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be an integer >= 0 (0 is off), got {no_repeat_ngram_size!r}.")
    fast = fast and not no_repeat_ngram_size
    if row_seeds is not None and len(row_seeds) != len(prompts):
        raise ValueError(f"row_seeds has {len(row_seeds)} seeds for {len(prompts)} prompts; give one per prompt.")
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    eos = eos_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=do_sample, num_return_sequences=num_return_sequences,
        eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, no_repeat_ngram_size=no_repeat_ngram_size or None,
        # top_k=0 switches top-k off; None would mean transformers' default of 50
        **({"temperature": temperature, "top_k": top_k, "top_p": top_p} if do_sample else {}),
    )
    was_training = model.training
    model.eval()
    batch_size = batch_size or len(prompts)
    rows, packed = [], None
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress):
        chunk = prompts[start:start + batch_size]
        ids, mask = tokenize_prompts(tokenizer, format_prompts(tokenizer, chunk, chat, system), chat, device)
        check_context(model, ids, mask, max_new_tokens)
        streams = None
        if row_seeds is not None:
            streams = [row_stream(s, j, device) for s in row_seeds[start:start + batch_size]
                       for j in range(num_return_sequences)]
        if fast and fast_decode_supported(model, ids.shape[1] + max_new_tokens):
            if packed is None:                                                # reordered once, used by every chunk
                packed = PackedLinears(_linears(_causal_lm(model)), len(chunk) * num_return_sequences)
            resp = fast_decode(model, ids, mask, max_new_tokens, eos, tokenizer.pad_token_id, num_return_sequences,
                               do_sample, temperature, top_k, top_p, streams, packed)  # (b*k, R)
        elif streams is not None:   # model.generate draws from one stream: choose each token ourselves
            draw = [RowStreamSampler(streams, temperature, top_k, top_p)]
            if no_repeat_ngram_size:                                     # the ban first, then each row's draw
                draw.insert(0, NoRepeatNGramLogitsProcessor(no_repeat_ngram_size))
            resp = model.generate(input_ids=ids.repeat_interleave(num_return_sequences, 0),
                                  attention_mask=mask.repeat_interleave(num_return_sequences, 0),
                                  generation_config=GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                                                     eos_token_id=eos,
                                                                     pad_token_id=tokenizer.pad_token_id),
                                  logits_processor=LogitsProcessorList(draw))[:, ids.shape[1]:]
        else:
            resp = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]
        ids = ids.repeat_interleave(num_return_sequences, 0)
        mask = mask.repeat_interleave(num_return_sequences, 0)
        rows.append((ids, mask, resp))
    model.train(was_training)
    ids, mask, resp = stack_chunks(rows, tokenizer.pad_token_id)
    expanded = [p for p in prompts for _ in range(num_return_sequences)]
    meta = {"temperature": temperature if do_sample else 0.0, "max_new_tokens": max_new_tokens, "chat": chat}
    return build_rollout(tokenizer, expanded, ids, mask, resp, eos, meta)


@torch.no_grad()
def diverse_beam_search(model, tokenizer, prompts, num_beams: int = 4, num_groups: int = 4,
                        diversity_penalty: float = 1.0, max_new_tokens: int = 32, chat: bool = True,
                        system: str | None = None, progress: bool = False) -> Rollout:
    """Diverse beam search (Vijayakumar et al. 2016), the sampler RRHF uses for varied candidates.

    Beams are split into ``num_groups`` groups of ``num_beams // num_groups``. At each step group g picks its
    beams by  log pi(y_<=t) - diversity_penalty * (#times token y_t was chosen by groups < g at step t)
    (Hamming diversity). Finished beams keep their score and only extend with padding. Returns a Rollout
    with ``num_beams`` rows per prompt, ordered by group, each group best-first by mean log-prob per token.

    Deliberately simple: the full prefix is re-run at every step (no KV cache), fine for short responses.
    (transformers 5 moved group beam search out of ``generate`` into a Hub extension, unreachable offline.)
    """
    prompts = check_prompts(prompts)
    if num_beams < 1 or num_groups < 1 or num_beams % num_groups:
        raise ValueError(f"num_beams ({num_beams}) must be a positive multiple of num_groups ({num_groups}).")
    per_group = num_beams // num_groups
    device = next(model.parameters()).device
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    all_rows = []
    for prompt in tqdm(prompts, desc="diverse beams", disable=not progress):
        p_ids, p_mask = tokenize_prompts(tokenizer, format_prompts(tokenizer, [prompt], chat, system), chat, device)
        seqs = p_ids.repeat(num_beams, 1)                              # (N, P) N = num_beams
        scores = torch.zeros(num_beams, device=device)                  # (N,) summed log-probs
        lengths = torch.zeros(num_beams, device=device)                 # (N,) response tokens so far
        done = torch.zeros(num_beams, dtype=torch.bool, device=device)  # (N,)
        # At step 0 all beams of a group are equal; only the first may expand, or they would pick twins.
        alive_start = torch.full((num_beams,), float("-inf"), device=device)
        alive_start[::per_group] = 0.0
        scores = scores + alive_start
        for _ in range(max_new_tokens):
            mask = torch.ones_like(seqs)
            logits = model(input_ids=seqs, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
            logp = torch.log_softmax(logits[:, -1].float(), -1)        # (N, V)
            logp[done] = float("-inf")
            logp[done, pad] = 0.0                                      # finished beams only pad, at no cost
            chosen = torch.zeros(logp.shape[1], device=device)          # (V,) picks by earlier groups
            new_seqs, new_scores, new_len, new_done = [], [], [], []
            for g in range(num_groups):
                rows = slice(g * per_group, (g + 1) * per_group)
                cand = scores[rows, None] + logp[rows] - diversity_penalty * chosen  # (per_group, V)
                top = cand.flatten().topk(per_group).indices
                beam, tok = top // logp.shape[1], top % logp.shape[1]
                src = beam + g * per_group
                chosen[tok[~done[src]]] += 1
                new_seqs.append(torch.cat([seqs[src], tok[:, None]], 1))
                new_scores.append(scores[src] + logp[src, tok])        # the penalty shapes choice, not score
                new_len.append(lengths[src] + (~done[src]).float())
                new_done.append(done[src] | torch.isin(tok, torch.tensor(eos, device=device)))
            seqs, scores = torch.cat(new_seqs), torch.cat(new_scores)
            lengths, done = torch.cat(new_len), torch.cat(new_done)
            if done.all():
                break
        order = torch.cat([g * per_group + (scores[g * per_group:(g + 1) * per_group] /
                           lengths[g * per_group:(g + 1) * per_group].clamp(min=1)).argsort(descending=True)
                           for g in range(num_groups)])
        all_rows.append((p_ids.repeat(num_beams, 1), p_mask.repeat(num_beams, 1), seqs[order, p_ids.shape[1]:]))
    model.train(was_training)
    ids, mask, resp = stack_chunks(all_rows, pad)
    expanded = [p for p in prompts for _ in range(num_beams)]
    return build_rollout(tokenizer, expanded, ids, mask, resp, eos, {"diverse_beams": num_beams})
