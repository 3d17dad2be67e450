"""Prompt-masked supervised fine-tuning: the "fine-tune on good responses" step shared by several methods.

RAFT fine-tunes on its reward-ranked samples, RRHF adds this loss on the best candidate, and lectures 05-06
(SL-CAI, principle engraving, verbose cloning) fine-tune on revised or self-generated responses. All of them
minimise the negative log-likelihood of the **response** tokens only:

    L_SFT(theta) = - 1/N sum_{(x, y)} sum_t log pi_theta(y_t | x, y_<t),      N = number of response tokens

The prompt x is context, not a target: its tokens are masked out of the loss (a model trained on prompts
learns to write prompts). Sequences use the course layout ``[left padding | prompt | response | right padding]``
(``alignlib.logprobs``), so a batch built here can be scored by every other module, and the LM head runs on the
response positions only (``logits_to_keep``), never on the (B, T, V) logits of the prompt.

Why a small loop instead of TRL's ``SFTTrainer`` (which does the same loss with ``completion_only_loss``): RAFT
calls fine-tuning once per stage on a few dozen samples and keeps one optimizer across stages; a ``Trainer`` per
stage would rebuild the optimizer, the data loader and its output directory every time.
"""
from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .training.distributed import mean_over_processes, shard, world
from .generation import check_prompts, format_prompts
from .logprobs import masked_mean, position_ids_from_mask, token_logprobs_from_logits
from .utils import check_finite, guarded_step, seed_everything


@dataclass
class SFTBatch:
    """Prompt + response sequences in the course layout, all (B, T)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor     # 1 on real tokens
    response_mask: torch.Tensor      # 1 on response tokens (the targets), EOS included where added
    prompt_width: int                # columns [0, P) hold the left-padded prompt

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def logits_to_keep(self) -> int:
        """Positions whose logits predict a response token: the last T - P + 1."""
        return self.input_ids.shape[1] - self.prompt_width + 1

    def select(self, idx) -> "SFTBatch":
        return SFTBatch(self.input_ids[idx], self.attention_mask[idx], self.response_mask[idx], self.prompt_width)

    def to(self, device) -> "SFTBatch":
        return SFTBatch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device),
                        self.prompt_width)


def encode_sft(tokenizer, prompts: Sequence[str], responses: Sequence[str], chat: bool = True,
               system: str | None = None, add_eos: bool | Sequence[bool] = True,
               max_length: int | None = None) -> SFTBatch:
    """Tokenize (prompt, response) pairs into one ``SFTBatch``.

    The prompt is formatted exactly as ``generate`` formats it (chat template with the assistant turn opened, or
    raw text), so a sampled response re-encoded here is scored in the context it was sampled in. ``add_eos``
    appends EOS to each response (one bool for all, or one per response): True teaches the model to stop there;
    pass False for a sample that was cut at ``max_new_tokens``. Raises if a sequence exceeds ``max_length``:
    nothing is truncated.
    """
    prompts = check_prompts(prompts)
    responses = list(responses)
    if len(responses) != len(prompts):
        raise ValueError(f"prompts ({len(prompts)}) and responses ({len(responses)}) must have the same length.")
    eos_flags = [add_eos] * len(prompts) if isinstance(add_eos, bool) else list(add_eos)
    if len(eos_flags) != len(prompts):
        raise ValueError(f"add_eos has {len(eos_flags)} flags for {len(prompts)} responses; pass one per response.")
    texts = format_prompts(tokenizer, prompts, chat, system)
    prompt_ids = tokenizer(texts, add_special_tokens=not chat)["input_ids"]
    response_ids = tokenizer([str(r) for r in responses], add_special_tokens=False)["input_ids"]
    rows = []
    for i, (p, r, eos) in enumerate(zip(prompt_ids, response_ids, eos_flags)):
        r = r + [tokenizer.eos_token_id] if eos else r
        if not r:
            raise ValueError(f"response {i} is empty and add_eos is False: there is no token to train on.")
        if max_length is not None and len(p) + len(r) > max_length:
            raise ValueError(f"pair {i} has {len(p) + len(r)} tokens, over max_length={max_length} (prompt "
                             f"{prompts[i][:50]!r}); nothing is truncated: raise max_length or shorten the text.")
        rows.append((p, r))
    P = max(len(p) for p, _ in rows)
    R = max(len(r) for _, r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), P + R), pad, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), P + R, dtype=torch.long)
    response_mask = torch.zeros(len(rows), P + R, dtype=torch.long)
    for i, (p, r) in enumerate(rows):  # [left padding | prompt | response | right padding]
        input_ids[i, P - len(p):P] = torch.tensor(p)
        input_ids[i, P:P + len(r)] = torch.tensor(r)
        attention_mask[i, P - len(p):P + len(r)] = 1
        response_mask[i, P:P + len(r)] = 1
    return SFTBatch(input_ids, attention_mask, response_mask, P)


def response_token_logprobs(model, batch: SFTBatch) -> torch.Tensor:
    """log pi(x_t | x_<t) aligned with ``batch.input_ids`` (B, T); the LM head runs on response positions only.

    Columns before the response are 0; mask with ``batch.response_mask``. Gradients flow if enabled.
    """
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                position_ids=position_ids_from_mask(batch.attention_mask), logits_to_keep=batch.logits_to_keep)
    return token_logprobs_from_logits(out.logits, batch.input_ids)


def sft_loss(model, batch: SFTBatch) -> torch.Tensor:
    """L_SFT: mean negative log-likelihood over the batch's response tokens (a scalar)."""
    return -masked_mean(response_token_logprobs(model, batch), batch.response_mask)


@dataclass
class SFTConfig:
    """Hyper-parameters of prompt-masked fine-tuning."""

    epochs: int = 1
    """Passes over the (prompt, response) pairs."""
    batch_size: int = 8
    """Pairs per optimizer step."""
    micro_batch_size: int | None = None
    """Pairs per forward/backward pass (None: the whole batch). Gradients accumulate over a batch's micro-batches,
    each weighted by its share of the response tokens: the same step, in less memory."""
    lr: float = 1e-4
    """AdamW learning rate (used only when ``train_sft`` creates the optimizer)."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold (global L2 norm); 0 disables."""
    chat: bool = True
    """Format prompts with the chat template (False: raw text continuation)."""
    max_length: int | None = None
    """Raise on a pair longer than this many tokens (None: no limit). Nothing is truncated."""
    seed: int = 0
    """Seeds the shuffling of pairs."""

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs ({self.epochs}) and batch_size ({self.batch_size}) must be >= 1.")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be None or >= 1, got {self.micro_batch_size}.")


def make_optimizer(model, lr: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (the LoRA adapters of a LoRA model)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter; load it with lora=True or unfreeze weights.")
    return torch.optim.AdamW(params, lr=lr)


def train_sft(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], config: SFTConfig | None = None,
              optimizer: torch.optim.Optimizer | None = None, add_eos: bool | Sequence[bool] = True,
              progress: bool = False, accelerator=None) -> list[dict]:
    """Fine-tune ``model`` on (prompt, response) pairs; return one record per optimizer step.

    Pass ``optimizer`` to keep its state across calls (RAFT does, one call per stage). Each record has
    ``loss/sft`` (mean NLL per response token of that batch), ``data/tokens`` and ``epoch``.
    With an ``accelerator`` of N processes (``model`` and ``optimizer`` prepared by it), every process walks the
    same batches and computes its 1/N of each: its NLL sum over the batch's token count T times N, which the
    gradient averaging turns into the mean over all T tokens, the one-process loss.
    """
    config = config or SFTConfig()
    prompts = check_prompts(prompts)
    flags = [add_eos] * len(prompts) if isinstance(add_eos, bool) else list(add_eos)
    if len(responses) != len(prompts) or len(flags) != len(prompts):
        raise ValueError(f"prompts ({len(prompts)}), responses ({len(responses)}) and add_eos ({len(flags)}) "
                         "must have the same length.")
    device = next(model.parameters()).device
    optimizer = optimizer or make_optimizer(model, config.lr)
    processes = world(accelerator)[1]
    rng = random.Random(config.seed)
    seed_everything(config.seed)
    history = []
    model.train()
    steps = range(config.epochs * ((len(prompts) + config.batch_size - 1) // config.batch_size))
    bar = tqdm(steps, desc="SFT", disable=not progress)
    order: list[int] = []
    for step in bar:
        if not order:
            order = list(range(len(prompts)))
            rng.shuffle(order)
        idx, order = order[:config.batch_size], order[config.batch_size:]
        batch = encode_sft(tokenizer, [prompts[i] for i in idx], [responses[i] for i in idx], config.chat,
                           add_eos=[flags[i] for i in idx], max_length=config.max_length).to(device)
        tokens = batch.response_mask.sum()                  # of the whole batch, whichever process holds it
        if processes > 1:
            batch = batch.select(torch.tensor(shard(range(len(idx)), accelerator, "the SFT batch size")))
        micro = config.micro_batch_size or len(batch)
        optimizer.zero_grad(set_to_none=True)
        loss = 0.0
        for start in range(0, len(batch), micro):
            part = batch.select(slice(start, start + micro))
            last = start + micro >= len(batch)          # processes average their gradients after the last part
            with nullcontext() if accelerator is None or last else accelerator.no_sync(model):
                if processes > 1 or micro < len(batch):     # this part's NLL sum over the batch's token count
                    part_loss = -(response_token_logprobs(model, part) * part.response_mask).sum() / tokens * processes
                else:
                    part_loss = sft_loss(model, part)
                check_finite(part_loss, "SFT loss")
                part_loss.backward() if accelerator is None else accelerator.backward(part_loss)
            loss = loss + part_loss.detach()
        norm = guarded_step(optimizer, config.max_grad_norm, "SFT", clip=accelerator and accelerator.clip_grad_norm_)
        record = {"step": step, "grad/norm": norm, **mean_over_processes({"loss/sft": loss.item()}, accelerator),
                  "data/tokens": int(tokens),
                  "epoch": step * config.batch_size // len(prompts)}
        history.append(record)
        bar.set_postfix(loss=f"{record['loss/sft']:.3f}")
    model.eval()
    return history


@torch.no_grad()
def mean_nll(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], chat: bool = True,
             batch_size: int = 8) -> float:
    """Mean NLL per response token of the pairs under ``model`` (exp of it is the responses' perplexity)."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(prompts), batch_size):
        batch = encode_sft(tokenizer, prompts[i:i + batch_size], responses[i:i + batch_size], chat).to(device)
        lp = response_token_logprobs(model, batch)
        total += -(lp * batch.response_mask).sum().item()
        count += int(batch.response_mask.sum())
    return total / count


__all__ = ["SFTBatch", "encode_sft", "response_token_logprobs", "sft_loss", "SFTConfig", "make_optimizer",
           "train_sft", "mean_nll"]
