"""``python -m alignlib tour``: the course's main job, end to end on the default model.

It grows with the course: each method that lands adds a step. Today: load the model, sample responses to
course prompts, score them (log-probs, sentiment, length), and print a table; then a few PPO steps on the
sentiment task (lecture 01) with the reward and KL per step.
"""
from __future__ import annotations

import time

from .data import load_prompts
from .generation import generate
from .logprobs import score_responses
from .models import DEFAULT_MODEL, load_model
from .rewards import LengthReward, SentimentReward
from .utils import seed_everything


def shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def print_table(rows: list[dict], columns: list[tuple[str, str, int]]) -> None:
    """Print ``rows`` as a fixed-width table; columns are (key, header, width)."""
    print("  ".join(h.ljust(w) for _, h, w in columns))
    print("  ".join("-" * w for _, _, w in columns))
    for row in rows:
        cells = []
        for key, _, w in columns:
            v = row[key]
            cells.append((f"{v:+.3f}" if isinstance(v, float) else shorten(str(v), w)).ljust(w))
        print("  ".join(cells))


def run(model_name: str = DEFAULT_MODEL, n_prompts: int = 4, max_new_tokens: int = 40, seed: int = 0,
        ppo_steps: int = 4) -> dict:
    seed_everything(seed)
    t0 = time.perf_counter()
    model, tokenizer = load_model(model_name)
    print(f"[tour] loaded {model_name} on {next(model.parameters()).device} in {time.perf_counter() - t0:.1f} s")

    print("\n== Step 0: sample and score (lecture 00) ==")
    prompts = load_prompts("helpful_prompts", "test", n_prompts) + load_prompts("movie_openings", "test", n_prompts)
    chat = [True] * n_prompts + [False] * n_prompts
    t0 = time.perf_counter()
    helpful = generate(model, tokenizer, prompts[:n_prompts], max_new_tokens=max_new_tokens, seed=seed, progress=True)
    reviews = generate(model, tokenizer, prompts[n_prompts:], max_new_tokens=max_new_tokens, chat=False,
                       seed=seed, progress=True)
    gen_s = time.perf_counter() - t0
    sentiment, length = SentimentReward(), LengthReward()
    rows = []
    for rollout in (helpful, reviews):
        scores = score_responses(model, rollout.input_ids, rollout.attention_mask, rollout.response_mask)
        sent = sentiment(rollout.prompts, rollout.responses)
        words = length(rollout.prompts, rollout.responses)
        for i in range(len(rollout)):
            rows.append({"prompt": rollout.prompts[i], "response": rollout.responses[i],
                         "logp/token": scores["normalized"][i].item(), "sentiment": sent[i].item(),
                         "words": int(words[i]), "ended": "yes" if rollout.finished[i] else "no"})
    print_table(rows, [("prompt", "prompt", 30), ("response", "response", 46), ("logp/token", "logp/tok", 8),
                       ("sentiment", "VADER", 7), ("words", "words", 5), ("ended", "EOS", 3)])
    print(f"\n[tour] {len(rows)} responses in {gen_s:.1f} s (chat prompts: {sum(chat[:n_prompts])}, "
          f"raw review openings: {n_prompts}).")
    ppo_history = tour_ppo(model_name, steps=ppo_steps, seed=seed)
    return {"rows": rows, "time/generate_s": gen_s, "ppo": ppo_history}


def tour_ppo(model_name: str, steps: int = 4, seed: int = 0) -> list[dict]:
    """Lecture 01 in one minute: PPO with a KL penalty makes review continuations more positive."""
    from .ppo import PPOConfig, PPOTrainer

    print("\n== Step 1: RLHF with PPO on the sentiment task (lecture 01) ==")
    policy, tokenizer = load_model(model_name, lora=True)
    config = PPOConfig.preset("cpu", steps=steps, chat=False, seed=seed)
    trainer = PPOTrainer(policy, tokenizer, SentimentReward(), load_prompts("movie_openings", "train"), config)
    history = trainer.train()
    print_table([{"step": h["step"], "reward": h["reward/mean"], "kl": h["kl/ref"], "time": h["time/step_s"]}
                 for h in history],
                [("step", "PPO step", 8), ("reward", "reward", 7), ("kl", "KL(pi||ref)", 11), ("time", "seconds", 7)])
    print(f"[tour] peak memory {history[-1]['memory/peak_mb']:.0f} MB; full run: python -m alignlib ppo --preset cpu")
    return history
