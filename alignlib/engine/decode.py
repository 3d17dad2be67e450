"""The CPU decode loop behind ``alignlib.generation.generate``: a Llama-style decoder run layer by layer on its
own modules, with one preallocated KV cache, the prompts' shared start encoded once, the rest packed without
padding, and the next token drawn by inverse CDF.

The decoder (``_decoder_forward``), for the models of ``FAST_MODEL_TYPES`` (``fast_decode_supported`` says which
models qualify; the others go through ``model.generate``):

    h = embed(ids)
    per layer:  x = RMSNorm(h);  q, k, v = x W_q, x W_k, x W_v (per head; Qwen3 RMSNorms q and k per head)
                q, k = q cos + rotate_half(q) sin, k cos + rotate_half(k) sin       (rotary positions, Su et al. 2021)
                h = h + attention(q, k, v) W_o
                h = h + (act(RMSNorm(h) W_gate) * RMSNorm(h) W_up) W_down          (gated MLP)
    out = RMSNorm(h);  logits = out W_head

with RMSNorm(x) = x / sqrt(mean(x^2) + eps) * weight (``_rms_norm``) and attention(q, k, v) = softmax(q K^T * scale
+ bias) V over the cached keys/values K, V, the query heads that share a key/value head grouped (GQA). Every
product goes through ``PackedLinears`` (``alignlib.engine.packed_linear``: weights reordered once for oneDNN, q/k/v
and gate/up as one product each); LoRA adapters apply as in ``model(...)``.

``fast_decode``, the loop: the KV cache is one buffer (layers, rows, H_kv, P + max_new_tokens, head_dim), allocated
once and written in place. The prompts' common start (``shared_prefix_length``, a chat template's system turn) is
encoded once and stored in every row; each prompt's own tokens are encoded without padding, packed into one
sequence (1, n) per ``PREFILL_TOKENS`` tokens (``_prefill``, ``_prefill_attention``), their keys/values copied to the
prompt's ``num_return_sequences`` rows. Then one token per step for every row (``_step_attention``), until every
row has emitted an EOS or ``max_new_tokens`` are out. ``sample_next_token`` draws each token: greedy argmax, or
temperature, top-k and top-p filtering, then u ~ U(0, 1) located in the cumulative probabilities
(token = min{j : cdf_j > u}), from one stream per row where ``generators`` are given.

Greedy output equals ``model.generate``'s (same logits up to float rounding); sampling draws from the same
distribution. This module imports nothing from ``alignlib.generation``: the engine sits below it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .packed_linear import PackedLinears


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
