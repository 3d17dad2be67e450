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
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from .logprobs import position_ids_from_mask
from .engine.packed_linear import PackedLinears
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


# ---------------------------------------------------------------- fast decoding

FAST_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _causal_lm(model):
    """The ``*ForCausalLM`` inside ``model`` (LoRA layers stay in place, so calling its modules applies them)."""
    if hasattr(model, "get_base_model"):  # peft
        return model.get_base_model()
    return model


def fast_decode_supported(model, length: int | None = None) -> bool:
    """Whether ``fast_decode`` can run ``model`` (for sequences of ``length`` tokens); else use ``model.generate``.

    Needs a Llama-style decoder (embed -> [norm, attention with rotary positions, norm, MLP] x n -> norm -> head)
    with full attention in every layer (or a sliding window longer than the sequence), LoRA or no adapter, and
    ordinary parameters (sharded ones, FSDP or DeepSpeed ZeRO-3, are gathered by hooks on the whole forward).
    """
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return False
    base = _causal_lm(model)
    config = getattr(base, "config", None)
    core = getattr(base, "model", None)
    if getattr(config, "model_type", None) not in FAST_MODEL_TYPES or not hasattr(base, "lm_head"):
        return False
    if not all(hasattr(core, name) for name in ("embed_tokens", "rotary_emb", "layers", "norm")):
        return False
    if not all(hasattr(layer.mlp, name) for layer in core.layers for name in ("gate_proj", "up_proj", "down_proj",
                                                                              "act_fn")):
        return False
    window = getattr(config, "sliding_window", None)
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    windowed = kinds != {"full_attention"} or (window and getattr(config, "use_sliding_window", True))
    if windowed and not (window and length is not None and length <= window):
        return False
    return not any(hasattr(p, "ds_id") or type(p.data).__name__ == "DTensor" for p in base.parameters())


def sample_next_token(logits: torch.Tensor, do_sample: bool = True, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0, generators: list | None = None) -> torch.Tensor:
    """The next token of each row: logits (B, V) -> (B,).

    Greedy: argmax. Sampling: temperature, then top-k, then top-p (nucleus) filtering, exactly as transformers'
    warpers do, then one draw by inverse CDF: a uniform number u per row, located in the cumulative sums of the
    probabilities (``searchsorted``). ``torch.multinomial`` draws one exponential random number per vocabulary
    entry instead (49152 per row for SmolLM2), which costs ~20 ms per step at batch 16 on a 2-core CPU.
    Tokens of probability 0 are never drawn: their cumulative sum equals their predecessor's.
    ``generators`` (one ``torch.Generator`` per row) draw each row's u from its own stream, so a row's sample
    does not depend on which other rows share the batch (or the process).
    """
    logits = logits.float()
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]                        # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)                            # ascending
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p              # (B, V) the unlikely tail
        drop[:, -1] = False                                                   # keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    cdf = logits.softmax(-1).cumsum(-1)                                       # (B, V)
    if generators is None:
        u = torch.rand(cdf.shape[0], 1, device=cdf.device)                    # (B, 1)
    else:
        u = torch.cat([torch.rand(1, 1, generator=g, device=g.device) for g in generators]).to(cdf.device)
    u = u * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=vocab - 1).squeeze(-1)


def _linears(base) -> list[tuple]:
    """The linear layers ``_decoder_forward`` calls, grouped as it calls them (layers of a group share an input)."""
    out = []
    for layer in base.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        out += [(attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,), (mlp.gate_proj, mlp.up_proj),
                (mlp.down_proj,)]
    return out + [(base.lm_head,)]


def _decoder_forward(base, ids, positions, linear: PackedLinears, attend) -> torch.Tensor:
    """Run the decoder on ``ids`` (b, q) at ``positions`` (b, q); return the final normed hidden states (b, q, D).

    ``attend(i, q, k, v, scale)`` is layer i's attention: it stores the new keys/values k, v (b, H_kv, q, hd) in
    the cache and returns the output (b, H, q, hd) for the queries q (b, H, q, hd). The layers' own modules do
    every norm, and every projection goes through ``linear(x, *modules)`` (packed products, or the modules called
    as they are), so LoRA adapters (and ``disable_adapter()``) apply as in ``model(...)``.
    """
    core = base.model
    b, q_len = ids.shape
    h = core.embed_tokens(ids)                                                # (b, q, D)
    cos, sin = (c.unsqueeze(1) for c in core.rotary_emb(h, positions))        # (b, 1, q, hd)
    half = cos.shape[-1] // 2
    sin = torch.cat([-sin[..., :half], sin[..., half:]], -1)                  # rotate_half(x) * sin = roll(x) * this
    for i, layer in enumerate(core.layers):
        attn = layer.self_attn
        x = _rms_norm(layer.input_layernorm, h)
        shape = (b, q_len, -1, attn.head_dim)
        q, k, v = (y.view(shape) for y in linear(x, attn.q_proj, attn.k_proj, attn.v_proj))
        if hasattr(attn, "q_norm"):                                           # Qwen3: per-head RMSNorm
            q, k = _rms_norm(attn.q_norm, q), _rms_norm(attn.k_norm, k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)     # (b, H, q, hd)
        q, k = (y * cos + y.roll(half, -1) * sin for y in (q, k))             # rotary positions (Su et al. 2021)
        o = attend(i, q, k, v, attn.scaling)                                  # (b, H, q, hd)
        h = h + linear(o.transpose(1, 2).reshape(b, q_len, -1), attn.o_proj)
        gate, up = linear(_rms_norm(layer.post_attention_layernorm, h), layer.mlp.gate_proj, layer.mlp.up_proj)
        h = h + linear(layer.mlp.act_fn(gate) * up, layer.mlp.down_proj)     # gated MLP: down(act(gate x) * up x)
    return _rms_norm(core.norm, h)


RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")  # the same forward, in 4 files


def _rms_norm(module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``; for the RMSNorms of ``FAST_MODEL_TYPES`` in fp32, ``F.rms_norm`` instead of their Python forward
    (x / sqrt(mean(x^2) + eps) * weight, the same numbers). On CPU torch 2.13 still runs it as pow, mean, add, rsqrt
    and two muls, but from C++: 22 us against 30 us for the module at 16 rows (no_grad, medians of 40, 40 of 40)."""
    if x.dtype != torch.float32 or type(module).__name__ not in RMS_NORMS:
        return module(x)
    return F.rms_norm(x, (x.shape[-1],), module.weight, module.variance_epsilon)


def _prefill_attention(cache, rows: torch.Tensor, cols: torch.Tensor, src: torch.Tensor, prefix: int,
                       mask: torch.Tensor):
    """Attention for a flat prefill: n tokens of several prompts packed into one sequence (1, n), no padding.

    Token ``src[j]``'s keys/values go to cache row ``rows[j]``, column ``cols[j]`` (a token may go to several
    rows: the shared start to every row, a prompt to its k copies). Queries attend to the cache's first ``prefix``
    columns of row 0 (the shared start, already stored) and to the sequence itself where ``mask`` (n, prefix + n)
    is True.
    """
    keys, values = cache

    def attend(i, q, k, v, scale):                                            # q (1, H, n, hd); k, v (1, H_kv, n, hd)
        keys[i, rows, :, cols] = k[0].transpose(0, 1)[src]                    # (m, H_kv, hd) to m (row, column) slots
        values[i, rows, :, cols] = v[0].transpose(0, 1)[src]
        k = torch.cat([keys[i, :1, :, :prefix], k], 2)                        # (1, H_kv, prefix + n, hd)
        v = torch.cat([values[i, :1, :, :prefix], v], 2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return attend


def _step_attention(cache, column: int, bias: torch.Tensor):
    """Attention for one decode step: each row's new token goes to cache ``column`` and attends to columns
    [0, column] with the additive ``bias`` (rows, column + 1): 0 where visible, -inf elsewhere.

    softmax(q K^T * scale + bias) V with the query heads of a key/value head grouped (GQA): (rows, H_kv, g, hd)
    times (rows, H_kv, hd, L), so each key is read once for its g query heads.
    """
    keys, values = cache

    def attend(i, q, k, v, scale):                                            # q (b, H, 1, hd); k, v (b, H_kv, 1, hd)
        keys[i, :, :, column] = k[:, :, 0]
        values[i, :, :, column] = v[:, :, 0]
        k, v = keys[i, :, :, :column + 1], values[i, :, :, :column + 1]       # (b, H_kv, L, hd)
        if q.dtype != torch.float32:                                          # bf16/fp16: SDPA keeps scores in fp32
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None], scale=scale, enable_gqa=True)
        b, heads, _, hd = q.shape
        grouped = q.reshape(b, k.shape[1], heads // k.shape[1], hd)           # (b, H_kv, g, hd)
        scores = torch.matmul(grouped, k.transpose(-1, -2)).mul_(scale).add_(bias[:, None, None])  # (b, H_kv, g, L)
        return torch.matmul(scores.softmax(-1), v).view(b, heads, 1, hd)
    return attend


def shared_prefix_length(ids: torch.Tensor, real: torch.Tensor) -> int:
    """S, the number of leading tokens all left-padded prompts ``ids`` (b, P) share (``real`` marks tokens);
    at most the shortest prompt's length - 1, so each row keeps a token of its own. 0 for a single prompt."""
    lengths = real.sum(-1)                                                    # (b,)
    shortest = int(lengths.min())
    if ids.shape[0] < 2 or shortest < 2:
        return 0
    starts = ids.shape[1] - lengths                                           # (b,) first real column
    cols = starts[:, None] + torch.arange(shortest - 1, device=ids.device)    # (b, shortest - 1)
    aligned = ids.gather(1, cols)                                             # prompts aligned at their start
    same = (aligned == aligned[:1]).all(0).long()                             # (shortest - 1,)
    return int(same.cumprod(0).sum())


PREFILL_TOKENS = 2048  # prompt tokens per flat prefill call: bounds its (n, S + n) mask and activations


def _prefill(base, ids, positions, own, shared: int, copies: int, cache, linear: PackedLinears) -> torch.Tensor:
    """Encode each prompt's own tokens (``own`` (b, P) marks them; the shared start is already cached) without
    padding, and return each prompt's next-token logits (b, V).

    The prompts' tokens are packed into one sequence (1, n) per group of prompts of at most ``PREFILL_TOKENS``
    tokens: a token attends to the shared start and to the earlier tokens of its own prompt. Its keys/values go
    to its prompt's ``copies`` cache rows, at its column in the left-padded layout. Padding costs nothing here: in
    a padded (b, P) batch after the shared start, 26% of the tokens of the bench's 16 prompts were padding, and up to
    48% of those of the first 16 prompts of a data file in ``data/``.
    """
    counts = own.sum(-1)                                                      # (b,) tokens per prompt
    logits, g0 = [], 0
    while g0 < len(counts):
        g1 = g0 + 1                                                           # prompts [g0, g1) form one sequence
        while g1 < len(counts) and int(counts[g0:g1 + 1].sum()) <= PREFILL_TOKENS:
            g1 += 1
        r, c = own[g0:g1].nonzero(as_tuple=True)                              # (n,) prompt and column, row-major
        n, device = r.numel(), r.device
        rows = ((r + g0) * copies).repeat_interleave(copies) + torch.arange(copies, device=device).repeat(n)
        mask = torch.cat([torch.ones(n, shared, dtype=torch.bool, device=device),
                          (r[:, None] == r[None, :]).tril()], 1)              # (n, S + n)
        h = _decoder_forward(base, ids[g0:g1][r, c][None], positions[g0:g1][r, c][None], linear,
                             _prefill_attention(cache, rows, c.repeat_interleave(copies),
                                                torch.arange(n, device=device).repeat_interleave(copies), shared,
                                                mask))
        logits.append(linear(h[0, counts[g0:g1].cumsum(0) - 1], base.lm_head))   # each prompt's last token
        g0 = g1
    return torch.cat(logits)                                                  # (b, V)


@torch.no_grad()
def fast_decode(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, eos: list[int], pad: int,
                num_return_sequences: int = 1, do_sample: bool = True, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, generators: list | None = None,
                linear: PackedLinears | None = None) -> torch.Tensor:
    """Decode continuations of left-padded prompts ``ids``/``mask`` (b, P) -> (b * k, R), R <= max_new_tokens.

    The same tokens as ``model.generate`` for greedy decoding (same logits up to float rounding), and the same
    distribution when sampling; rows stop at EOS and are padded with ``pad`` until every row has stopped.
    Where the time goes in ``generate`` at batch 16 on a 2-core CPU, and what this loop does instead:

    * the KV cache: ``DynamicCache`` grows by ``torch.cat`` every step (~10% of a step); here one buffer
      (layers, rows, H_kv, P + max_new_tokens, head_dim) is allocated once and written in place.
    * sampling: ``torch.multinomial`` costs ~20 ms per step at batch 16 (see ``sample_next_token``).
    * per-step machinery (mask building, cache objects, logits processors, stopping criteria): here a
      plain loop over the layers' own modules, masks and positions kept as small tensors.
    * ``num_return_sequences`` = k: the prompt is encoded once and its keys/values are copied to the k rows
      (``generate`` encodes every prompt k times).
    * the shared start of the prompts (a chat template's system turn: 24 of SmolLM2's 46-token bench prompts) is
      encoded once, for one row, and its keys/values broadcast to every row; the cache then holds
      [shared start | padding | rest of the prompt | response] per row, with positions counted over real tokens.
    * the rest of the prompts is encoded without padding, packed into one sequence (``_prefill``).
    * attention at a decode step: the query heads that share a key/value head are grouped, so each key is read
      once (``_step_attention``; ``scaled_dot_product_attention`` with ``enable_gqa``
      took 1.2x as long on 16 rows here).
    * the matmuls, the bulk of a step: on a CPU in fp32 each weight is reordered once per call for oneDNN
      (``alignlib.engine.packed_linear``: at 16 rows its products are 2.5x faster than ``F.linear``), and q/k/v and
      gate/up are one product each. ``linear`` passes weights already packed (``generate`` packs once per call).
    """
    base = _causal_lm(model)
    core = base.model
    b, P = ids.shape
    copies, dtype, device = num_return_sequences, core.embed_tokens.weight.dtype, ids.device
    rows, total = b * copies, P + max_new_tokens
    shape = (len(core.layers), rows, base.config.num_key_value_heads, total, core.layers[0].self_attn.head_dim)
    cache = (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
    if linear is None:
        linear = PackedLinears(_linears(base), rows)                          # weights reordered once (CPU fp32)
    real = mask.bool()                                                        # (b, P)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)                    # (b, P) left padding safe
    shared = shared_prefix_length(ids, real)                                  # S
    if shared:  # the common start (a chat template's system turn): encode it once, store it in every row
        first = P - int(real[0].sum())
        src = torch.arange(shared, device=device).repeat_interleave(rows)     # token s to row r, column s
        causal = torch.ones(shared, shared, dtype=torch.bool, device=device).tril()
        _decoder_forward(base, ids[:1, first:first + shared], positions[:1, first:first + shared], linear,
                         _prefill_attention(cache, torch.arange(rows, device=device).repeat(shared), src, src, 0,
                                            causal))
    own = real & (positions >= shared)                                        # (b, P) each prompt's own tokens
    logits = _prefill(base, ids, positions, own, shared, copies, cache, linear).repeat_interleave(copies, 0)
    bias = torch.full((rows, total), float("-inf"), dtype=dtype, device=device)   # 0 on keys a new token sees
    bias[:, :shared] = 0.0
    bias[:, :P].masked_fill_(own.repeat_interleave(copies, 0), 0.0)
    next_position = positions[:, -1:].repeat_interleave(copies, 0) + 1        # (rows, 1)
    eos_t = torch.tensor(eos, device=device)
    unfinished = torch.ones(rows, dtype=torch.bool, device=device)
    out = []
    for t in range(max_new_tokens):
        token = sample_next_token(logits, do_sample, temperature, top_k, top_p, generators)  # (rows,)
        token = torch.where(unfinished, token, torch.full_like(token, pad))
        out.append(token)
        unfinished &= ~torch.isin(token, eos_t)
        if t == max_new_tokens - 1 or not unfinished.any():
            break
        bias[:, P + t] = 0.0
        h = _decoder_forward(base, token[:, None], next_position + t, linear,
                             _step_attention(cache, P + t, bias[:, :P + t + 1]))
        logits = linear(h[:, -1], base.lm_head)                               # (rows, V)
    return torch.stack(out, 1)


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
             progress: bool = False, fast: bool = True, row_seeds: Sequence[int] | None = None) -> Rollout:
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
    if row_seeds is not None and len(row_seeds) != len(prompts):
        raise ValueError(f"row_seeds has {len(row_seeds)} seeds for {len(prompts)} prompts; give one per prompt.")
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    eos = eos_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=do_sample, num_return_sequences=num_return_sequences,
        eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
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
            draw = RowStreamSampler(streams, temperature, top_k, top_p)
            resp = model.generate(input_ids=ids.repeat_interleave(num_return_sequences, 0),
                                  attention_mask=mask.repeat_interleave(num_return_sequences, 0),
                                  generation_config=GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                                                     eos_token_id=eos,
                                                                     pad_token_id=tokenizer.pad_token_id),
                                  logits_processor=LogitsProcessorList([draw]))[:, ids.shape[1]:]
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
