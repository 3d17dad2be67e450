"""Reward functions behind one call signature: ``reward(prompts, responses) -> torch.Tensor`` of shape (B,).

- ``SentimentReward``: VADER's compound score of the response in [-1, 1] (a real, offline sentiment reward).
- ``LengthReward``: response length in words, or closeness to a target length.
- ``KeywordReward``: how often the response uses given words (a reward a tiny model can learn in seconds).
- ``RewardModelReward``: any scalar-head sequence classifier (a learned reward model) scores prompt+response.
- ``WeightedSum``: sum_i w_i * r_i, the multi-objective reward (MORL) of rewarded soups; keeps the parts.
"""
from __future__ import annotations

import re
from typing import Callable, Protocol, Sequence

import torch


class RewardFn(Protocol):
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor: ...


def score(reward_fn: Callable, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
    """Call a reward function the way every trainer does, and check what it returns (``check_rewards``): a finite
    float tensor (B,).

    A reward of shape (1,) or (B, 1) would broadcast silently over the batch, a NaN would train on nothing, a
    complex reward would lose its imaginary part; all stop here with the name of the function and the fix.
    """
    return check_rewards(reward_fn(prompts, responses), len(responses), reward_name(reward_fn))


def reward_name(reward_fn: Callable) -> str:
    return getattr(reward_fn, "__name__", type(reward_fn).__name__)


def check_rewards(out, n: int, name: str, tensor_only: bool = True) -> torch.Tensor:
    """The output ``out`` of the reward function ``name`` for ``n`` responses as a float32 tensor (n,), or an error
    that names the function and the fix: not a tensor (a list or array too, unless ``tensor_only=False``), not real
    numbers (complex, strings), the wrong shape, or a non-finite value. The one place reward outputs become tensors."""
    fix = f"it must return a torch.Tensor of shape ({n},), one real float per response"
    if not isinstance(out, torch.Tensor):
        if tensor_only:
            raise TypeError(f"the reward function {name} returned {type(out).__name__}; {fix}.")
        try:
            out = torch.as_tensor(out)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"the reward function {name} returned {type(out).__name__} of non-numbers "
                            f"({str(out)[:60]}); {fix}.") from None
    if out.is_complex():
        raise TypeError(f"the reward function {name} returned complex rewards ({out.dtype}), whose imaginary part a "
                        f"conversion would drop silently; {fix} (take .real or .abs() yourself).")
    if out.shape != (n,):
        raise ValueError(f"the reward function {name} returned shape {tuple(out.shape)} for {n} "
                         f"responses; it must return shape ({n},), one reward per response.")
    out = out.float()
    if not torch.isfinite(out).all():
        bad = (~torch.isfinite(out)).nonzero().flatten()[:3].tolist()
        raise ValueError(f"the reward function {name} returned non-finite rewards (at responses {bad}: "
                         f"{[out[i].item() for i in bad]}); fix the reward or clip its output.")
    return out


def check_pairs(prompts, responses) -> tuple[list[str], list[str]]:
    """Validate a reward call: two lists of strings of one length (empty responses are allowed)."""
    if isinstance(prompts, str) or isinstance(responses, str):
        raise TypeError("prompts and responses must be lists of strings, not single strings.")
    prompts, responses = list(prompts), list(responses)
    if len(prompts) != len(responses):
        raise ValueError(f"prompts ({len(prompts)}) and responses ({len(responses)}) must have the same length: "
                         "one prompt per response (repeat a prompt for its k samples).")
    if not responses:
        raise ValueError("responses is empty: a reward needs at least one response.")
    if not all(isinstance(x, str) for x in prompts + responses):
        raise TypeError("every prompt and response must be a string.")
    return prompts, responses


class SentimentReward:
    """VADER compound sentiment of the response (or prompt + response): +1 very positive, -1 very negative.

    Args:
        target: ``"positive"`` rewards positive text, ``"negative"`` flips the sign, ``"neutral"`` scores the
            text's neutral share instead (VADER's ``neu`` in [0, 1]: a matter-of-fact tone; 0 for an empty text).
        include_prompt: score the prompt and the response together (a review opening plus its continuation).
    """

    def __init__(self, target: str = "positive", include_prompt: bool = False):
        if target not in ("positive", "negative", "neutral"):
            raise ValueError(f"target must be 'positive', 'negative' or 'neutral', got {target!r}")
        self.target = target
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()
        self.sign = 1.0 if target == "positive" else -1.0
        self.include_prompt = include_prompt

    def __call__(self, prompts, responses) -> torch.Tensor:
        prompts, responses = check_pairs(prompts, responses)
        texts = [f"{p} {r}" if self.include_prompt else r for p, r in zip(prompts, responses)]
        if self.target == "neutral":
            return torch.tensor([self.analyzer.polarity_scores(t)["neu"] for t in texts], dtype=torch.float32)
        scores = [self.analyzer.polarity_scores(t)["compound"] for t in texts]
        return self.sign * torch.tensor(scores, dtype=torch.float32)


class LengthReward:
    """Length in words; with ``target``, ``-|len - target| / target`` (0 at the target, negative elsewhere)."""

    def __init__(self, target: int | None = None):
        if target is not None and target <= 0:
            raise ValueError(f"target must be a positive number of words, got {target}")
        self.target = target

    def __call__(self, prompts, responses) -> torch.Tensor:
        _, responses = check_pairs(prompts, responses)
        n = torch.tensor([len(r.split()) for r in responses], dtype=torch.float32)
        return n if self.target is None else -(n - self.target).abs() / self.target


class KeywordReward:
    """Fraction of the response's words that are among ``words`` (case-insensitive), in [0, 1]."""

    def __init__(self, words: Sequence[str]):
        if isinstance(words, str) or not words:
            raise ValueError("words must be a non-empty list of strings, e.g. ['great', 'love'].")
        self.words = {w.lower() for w in words}

    def __call__(self, prompts, responses) -> torch.Tensor:
        _, responses = check_pairs(prompts, responses)
        out = []
        for r in responses:
            tokens = re.findall(r"[\w']+", r.lower())
            out.append(sum(t in self.words for t in tokens) / max(len(tokens), 1))
        return torch.tensor(out, dtype=torch.float32)


class RewardModelReward:
    """A learned reward model: a sequence classifier with one output scores ``prompt + response``.

    Works with any ``AutoModelForSequenceClassification`` with ``num_labels=1`` (the course's Bradley-Terry
    model, or a Hub reward model on a lab GPU). With ``chat=True`` the pair is formatted by the tokenizer's
    chat template as a user turn and an assistant turn; else ``template`` joins them.
    """

    def __init__(self, model, tokenizer, chat: bool = False, template: str = "{prompt}\n{response}",
                 batch_size: int = 16, max_length: int = 512):
        if getattr(model.config, "num_labels", 1) != 1:
            raise ValueError(f"a reward model needs one output (num_labels=1), got {model.config.num_labels}.")
        self.model, self.tokenizer = model, tokenizer
        self.chat, self.template = chat, template
        self.batch_size, self.max_length = batch_size, max_length

    def format(self, prompt: str, response: str) -> str:
        if self.chat:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return self.template.format(prompt=prompt, response=response)

    @torch.no_grad()
    def __call__(self, prompts, responses) -> torch.Tensor:
        prompts, responses = check_pairs(prompts, responses)
        texts = [self.format(p, r) for p, r in zip(prompts, responses)]
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        scores = []
        for i in range(0, len(texts), self.batch_size):
            # a chat template already writes the special tokens; adding them again would double the BOS
            enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=False, add_special_tokens=not self.chat)
            if enc["input_ids"].shape[1] > self.max_length:
                raise ValueError(f"a prompt+response has {enc['input_ids'].shape[1]} tokens, over max_length="
                                 f"{self.max_length}; raise max_length or shorten the responses.")
            scores.append(self.model(**enc.to(device)).logits[:, 0].float().cpu())  # (b,)
        self.model.train(was_training)
        return torch.cat(scores)


class WeightedSum:
    """r(x, y) = sum_i w_i * r_i(x, y). ``last`` keeps each part of the latest call, for logging."""

    def __init__(self, rewards: dict[str, Callable], weights: dict[str, float] | Sequence[float]):
        if not rewards:
            raise ValueError("rewards is empty: pass a dict name -> reward function.")
        if not isinstance(weights, dict):
            weights = list(weights)
            if len(weights) != len(rewards):
                raise ValueError(f"{len(weights)} weights for {len(rewards)} rewards; give one weight each.")
            weights = dict(zip(rewards, weights))
        missing = set(rewards) ^ set(weights)
        if missing:
            raise ValueError(f"rewards and weights must have the same names; differing: {sorted(missing)}")
        self.rewards, self.weights = dict(rewards), {k: float(v) for k, v in weights.items()}
        self.last: dict[str, torch.Tensor] = {}

    def __call__(self, prompts, responses) -> torch.Tensor:
        prompts, responses = check_pairs(prompts, responses)
        self.last = {name: check_rewards(fn(prompts, responses), len(responses), name)
                     for name, fn in self.rewards.items()}
        return sum(self.weights[name] * r for name, r in self.last.items())
