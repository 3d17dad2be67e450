"""alignlib PPO against TRL's on-policy trainer, side by side: seconds per step, peak memory, reward.

``python -m alignlib.bench.peer`` runs ``alignlib.ppo.PPOTrainer`` and ``trl.GRPOTrainer`` one after the other,
each in a fresh worker process (``bench.workers``; ``--method ppo`` / ``--method trl`` run one here and print one
JSON object), on the same model, reward, prompts and number of generated tokens, and prints a table with the
ratios alignlib / TRL.
``run(args)`` and ``alignlib.commands.bench.peer_bench_arguments(parser)`` let the CLI mount it as a subcommand.

Which TRL trainer. trl 1.16 has both ``GRPOTrainer`` and ``RLOOTrainer``, both on-policy, critic-free and
runnable offline on a CPU with ``transformers.generate`` (no vLLM). GRPO is TRL's flagship and the one with
``num_iterations`` (several optimisation passes over one rollout, like PPO's epochs), so it is the peer here.

What is held equal (defaults in brackets):

* model: ``load_model(--model, device="cpu", dtype=float32)`` [smollm2-135m-instruct]; the LoRA adapter is
  ``default_lora_config()`` (r=16, alpha=32, all linear layers of the trunk) for both. alignlib gets it from
  ``load_model(..., lora=...)``; TRL gets the plain model plus ``peft_config=`` and wraps it itself. (Handing
  TRL an already-wrapped PeftModel with beta > 0 makes it copy the adapter into a second "ref" adapter and run
  the reference forward through it; with ``peft_config`` its reference is the adapter-off base, as in alignlib.)
  PPO trains one extra ``Linear(hidden, 1)`` value head (hidden + 1 parameters) on the shared trunk.
* reward: ``SentimentReward()`` (VADER compound of the completion), wrapped for TRL as a reward function
  ``f(prompts, completions, completion_ids, **kwargs) -> list[float]``.
* prompts: ``load_prompts("movie_openings", "train")``, raw text continuation for both (``chat=False`` in
  PPO; TRL sees a ``Dataset`` with a plain-string "prompt" column, so it applies no chat template).
* generated tokens per step: ``--prompts-per-step`` P x ``--generations`` G completions of at most
  ``--max-new-tokens`` tokens [4 x 4 = 16 of <= 24]. GRPO samples G completions for each of P prompts; PPO
  samples one completion for each of P*G prompts (``batch_size = P*G``). Both sample at temperature 1, no
  top-k/top-p. Generation stops when every row has stopped, so both decode up to the same length limit.
* optimisation per step: ``--epochs`` passes over the rollout in mini-batches of ``--mini-batch-size``
  [2 x (16 / 8) = 4 optimiser steps]. PPO: ``ppo_epochs=2, mini_batch_size=8``. TRL:
  ``per_device_train_batch_size=8, gradient_accumulation_steps=1, steps_per_generation=16/8=2,
  num_iterations=2``, so TRL generates once every 2*2 = 4 optimiser steps and reuses the rollout for two
  passes of two mini-batches, exactly PPO's schedule. One "step" below is one rollout plus its 4 optimiser
  steps for both (TRL's ``max_steps`` = steps x 4). 2 epochs is the PPO cpu preset; it also makes TRL compute
  the old log-probs with a no-grad forward after generation, as PPO does (with one pass TRL skips it).
* the reference: PPO's per-token KL penalty ``kl_coef`` and GRPO's ``beta`` are both set to ``--kl-coef``
  [0.05], so both run one no-grad reference forward (adapter off) per rollout. (GRPO's default beta=0 would
  skip that forward; the comparison would then reward TRL for doing less.)
* optimiser: AdamW, the same ``--lr`` [3e-4, PPO's cpu preset], betas (0.9, 0.999), weight decay 0.01 (torch's
  AdamW default, which PPO uses), constant schedule (TRL's linear decay off), grad-norm clip 1.0, clip eps 0.2.
* precision and memory tricks: fp32 on the CPU for both; TRL's gradient checkpointing (on by default in TRL)
  is off like in alignlib, unless ``--trl-gradient-checkpointing``; TRL's bf16 default is off.
* TRL's logging, reporting (``report_to="none"``), saving, evaluation and progress bar are off; its
  ``output_dir`` is a temporary directory.

What is measured, per method, in its own process (so one method's memory never pollutes the other's):

* ``median_step_s``: median wall-clock seconds per step over steps 2..N (step 1 is the warm-up). PPO: around
  ``trainer.step()``; TRL: between the trainer callback's ``on_step_end`` of consecutive rollouts (includes
  the dataloader, generation, reward, the no-grad forwards and the 4 optimiser steps; nothing is logged).
  ``median_generate_s``: the part spent sampling (PPO's ``time/generate_s``; TRL's ``_generate_single_turn``).
* memory, resident set size of the process (the CPU analogue of a GPU's peak allocation): ``peak_rss_mb`` is
  the whole process's peak (imports, model, training); ``train_peak_rss_mb`` is the peak during training only
  (the kernel's high-water mark is reset just before the first step, Linux ``/proc/self/clear_refs``), and
  ``train_growth_mb`` = that peak minus the RSS just before training (activations, gradients, optimiser state,
  generation cache, allocator slack).
* ``reward_last_step``: mean reward of the last step's 16 samples; ``held_out_reward_after``: mean reward of
  one completion for each of ``load_prompts("movie_openings", "test", n=16)``, sampled after training with
  alignlib's ``generate`` and a fixed seed (the same sampler for both, so only the weights differ);
  ``held_out_reward_before`` the same before training (equal for both: LoRA's B starts at 0).

Where it is not apples-to-apples (the algorithms differ; the work per step is matched, not the maths):

* PPO learns a value head and shapes a per-token KL penalty into the reward (GAE, clipped value loss); GRPO has
  no critic, normalises rewards within each prompt's group and puts a k3 KL term into the loss (``loss_type``
  "dapo", TRL's default). So rewards after 6 steps compare learning speed of two algorithms on 16 samples a
  step: noisy, one seed, not a verdict on either implementation.
* PPO's 16 completions come from 16 prompts, GRPO's from 4 prompts x 4.
* Implementation choices each library makes on its own are part of what is measured: alignlib samples with
  its own KV-cache loop (``engine.decode.fast_decode``), TRL with ``model.generate``; TRL computes logits only
  for completion positions (``logits_to_keep``) and runs its no-grad forwards in chunks of the mini-batch size,
  alignlib's rollout scores all positions of all 16 rows at once (and their entropy).
* RSS on a CPU includes allocator slack and whatever the imports hold (TRL imports more); the training-only
  columns remove the imports and the model, not the allocator's behaviour. On a shared machine the step times
  move with the other jobs' load (recorded as the load average at the start and end of each run).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ..models import DEFAULT_MODEL
from ..utils import peak_memory_mb
from ..commands.bench import peer_bench_arguments

METHODS = ("ppo", "trl")
LABELS = {"ppo": "alignlib PPO", "trl": "TRL GRPO"}
HELD_OUT_SEED = 1234


# ---------------------------------------------------------------- settings

@dataclass
class BenchSettings:
    """One comparison's settings; every field is a command-line flag (``--prompts-per-step`` etc.)."""

    model: str = DEFAULT_MODEL
    steps: int = 6
    prompts_per_step: int = 4
    generations: int = 4
    max_new_tokens: int = 24
    mini_batch_size: int = 8
    epochs: int = 2
    lr: float = 3e-4
    kl_coef: float = 0.05
    held_out: int = 16
    seed: int = 0
    threads: int | None = None
    trl_gradient_checkpointing: bool = False

    @property
    def completions_per_step(self) -> int:
        return self.prompts_per_step * self.generations

    @property
    def optimizer_steps_per_step(self) -> int:
        return self.epochs * (self.completions_per_step // self.mini_batch_size)

    def validate(self) -> "BenchSettings":
        if self.steps < 2:
            raise ValueError(f"steps must be >= 2 (step 1 is the warm-up), got {self.steps}.")
        if self.generations < 2:
            raise ValueError(f"generations must be >= 2 (GRPO needs a group to compare), got {self.generations}.")
        if self.prompts_per_step < 1 or self.max_new_tokens < 1 or self.epochs < 1 or self.held_out < 1:
            raise ValueError("prompts_per_step, max_new_tokens, epochs and held_out must be >= 1.")
        n = self.completions_per_step
        if self.mini_batch_size < 1 or n % self.mini_batch_size:
            raise ValueError(f"mini_batch_size ({self.mini_batch_size}) must divide the completions per step "
                             f"({self.prompts_per_step} x {self.generations} = {n}): TRL splits the rollout evenly.")
        return self

    def to_argv(self) -> list[str]:
        argv = []
        for f in fields(self):
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if value is None:
                continue
            if isinstance(value, bool):
                argv += [flag] if value else []
            else:
                argv += [flag, str(value)]
        return argv

    @classmethod
    def from_args(cls, args) -> "BenchSettings":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None})


# ---------------------------------------------------------------- memory (resident set size)

def _status_mb(key: str) -> float | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MB, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class MemoryProbe:
    """Peak RSS of this process overall and during a section (Linux resets the high-water mark for the section).

    ``start()`` remembers the peak so far and the current RSS, then resets the kernel's high-water mark
    (``echo 5 > /proc/self/clear_refs``); ``stop()`` reads it again. Where the reset is impossible the section
    peak is None and only the whole-process peak is reported.
    """

    def start(self) -> None:
        self.peak_before = max(_status_mb("VmHWM") or 0.0, peak_memory_mb())
        self.rss_before = _status_mb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = self.rss_before is not None
        except OSError:
            self.reset = False

    def stop(self) -> dict:
        section = _status_mb("VmHWM") if self.reset else None
        peak = max(self.peak_before, section or 0.0, peak_memory_mb())
        out = {"peak_rss_mb": peak, "rss_before_train_mb": self.rss_before, "train_peak_rss_mb": section,
               "train_growth_mb": section - self.rss_before if section is not None else None}
        return out


# ---------------------------------------------------------------- shared pieces

def _prompts(s: BenchSettings) -> tuple[list[str], list[str]]:
    from ..data import load_prompts

    return load_prompts("movie_openings", "train"), load_prompts("movie_openings", "test", n=s.held_out)


@torch.no_grad()
def held_out_reward(model, tokenizer, reward_fn, prompts: list[str], max_new_tokens: int) -> float:
    """Mean reward of one sampled completion per held-out prompt (alignlib's sampler, fixed seed)."""
    from ..generation import generate
    from ..rewards import score

    with torch.random.fork_rng(devices=[]):
        roll = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, chat=False, seed=HELD_OUT_SEED)
    return score(reward_fn, roll.prompts, roll.responses).mean().item()


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _median_after_warmup(values: list[float]) -> float:
    return statistics.median(values[1:]) if len(values) > 1 else float("nan")


def _common(s: BenchSettings, method: str) -> dict:
    import peft
    import transformers

    if s.threads:
        torch.set_num_threads(s.threads)
    return {"method": method, "label": LABELS[method], "settings": asdict(s),
            "completions_per_step": s.completions_per_step, "optimizer_steps_per_step": s.optimizer_steps_per_step,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__},
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "loadavg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def _finish(out: dict, step_s, gen_s, rewards, lengths, mem: dict, t0: float) -> dict:
    out.update(mem)
    out.update({
        "step_seconds": step_s, "median_step_s": _median_after_warmup(step_s),
        "generate_seconds": gen_s, "median_generate_s": _median_after_warmup(gen_s),
        "reward_per_step": rewards, "reward_last_step": rewards[-1],
        "mean_completion_tokens": statistics.fmean(lengths) if lengths else float("nan"),
        "loadavg_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "wall_s": time.perf_counter() - t0,
    })
    return out


# ---------------------------------------------------------------- alignlib PPO

def bench_ppo(s: BenchSettings, progress: bool = True) -> dict:
    """Train alignlib PPO for ``s.steps`` steps; return timings, memory and rewards (see the module docstring)."""
    from ..models import default_lora_config, load_model
    from ..ppo import PPOConfig, PPOTrainer
    from ..rewards import SentimentReward
    from ..utils import seed_everything

    s.validate()
    t0 = time.perf_counter()
    out = _common(s, "ppo")
    out["trainer"] = "alignlib.ppo.PPOTrainer"
    seed_everything(s.seed)
    model, tokenizer = load_model(s.model, device="cpu", dtype=torch.float32, lora=default_lora_config())
    reward = SentimentReward()
    train_prompts, held = _prompts(s)
    out["held_out_reward_before"] = held_out_reward(model, tokenizer, reward, held, s.max_new_tokens)

    rewards: list[float] = []

    def reward_fn(prompts, responses):
        scores = reward(prompts, responses)
        rewards.append(scores.float().mean().item())
        return scores

    config = PPOConfig(steps=s.steps, batch_size=s.completions_per_step, mini_batch_size=s.mini_batch_size,
                       ppo_epochs=s.epochs, max_new_tokens=s.max_new_tokens, temperature=1.0, chat=False, lr=s.lr,
                       kl_coef=s.kl_coef, seed=s.seed)
    trainer = PPOTrainer(model, tokenizer, reward_fn, train_prompts, config)
    out["trainable_params"] = _trainable(trainer.model)
    probe = MemoryProbe()
    probe.start()
    step_s, gen_s, lengths = [], [], []
    for i in range(s.steps):
        start = time.perf_counter()
        metrics, _ = trainer.step()
        step_s.append(time.perf_counter() - start)
        gen_s.append(metrics["time/generate_s"])
        lengths.append(metrics["response/length"])
        if progress:
            print(f"[ppo] step {i + 1}/{s.steps}: {step_s[-1]:.2f} s, reward {rewards[-1]:+.3f}", file=sys.stderr)
    mem = probe.stop()
    out["held_out_reward_after"] = held_out_reward(trainer.accelerator.unwrap_model(trainer.model).policy, tokenizer,
                                                   reward, held, s.max_new_tokens)
    out["optimizer_steps"] = s.steps * s.optimizer_steps_per_step
    return _finish(out, step_s, gen_s, rewards, lengths, mem, t0)


# ---------------------------------------------------------------- TRL GRPO

def trl_config(s: BenchSettings, output_dir: str):
    """The ``GRPOConfig`` that gives TRL the same work per step as ``PPOConfig`` (see the module docstring)."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=output_dir,
        # one rollout of P*G completions, split into mini-batches, reused for `epochs` passes
        per_device_train_batch_size=s.mini_batch_size, gradient_accumulation_steps=1,
        steps_per_generation=s.completions_per_step // s.mini_batch_size, num_iterations=s.epochs,
        num_generations=s.generations, max_completion_length=s.max_new_tokens,
        max_steps=s.steps * s.optimizer_steps_per_step,
        temperature=1.0, top_k=0, top_p=1.0, use_vllm=False,
        beta=s.kl_coef, epsilon=0.2,
        learning_rate=s.lr, lr_scheduler_type="constant", weight_decay=0.01, max_grad_norm=1.0,
        # activation_checkpointing is transformers 5's name for gradient_checkpointing (TRL defaults it to True)
        bf16=False, fp16=False, use_cpu=True, activation_checkpointing=s.trl_gradient_checkpointing,
        report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0, seed=s.seed, data_seed=s.seed,
    )


def bench_trl(s: BenchSettings, progress: bool = True) -> dict:
    """Train TRL's GRPOTrainer for ``s.steps`` rollouts; return the same keys as ``bench_ppo``."""
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from ..models import default_lora_config, load_model
    from ..rewards import SentimentReward
    from ..utils import seed_everything

    s.validate()
    t0 = time.perf_counter()
    out = _common(s, "trl")
    out["trainer"] = f"trl.GRPOTrainer ({trl.__version__})"
    out["versions"]["trl"] = trl.__version__
    seed_everything(s.seed)
    model, tokenizer = load_model(s.model, device="cpu", dtype=torch.float32, lora=None)  # TRL adds the adapter
    reward = SentimentReward()
    train_prompts, held = _prompts(s)
    out["held_out_reward_before"] = held_out_reward(model, tokenizer, reward, held, s.max_new_tokens)

    rewards: list[float] = []
    lengths: list[float] = []

    def sentiment(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        scores = reward(prompts, completions)
        rewards.append(scores.float().mean().item())
        if completion_ids is not None:
            lengths.append(statistics.fmean(len(c) for c in completion_ids))
        return scores.tolist()

    per_step = s.optimizer_steps_per_step

    class StepClock(TrainerCallback):
        """Wall-clock marks at the start of training and after every ``per_step``-th optimiser step."""

        marks: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % per_step == 0:
                self.marks.append(time.perf_counter())
                if progress:
                    k = state.global_step // per_step
                    print(f"[trl] step {k}/{s.steps}: {self.marks[-1] - self.marks[-2]:.2f} s, reward "
                          f"{rewards[-1]:+.3f}", file=sys.stderr)

    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="peer_bench_trl_") as tmp:
        trainer = GRPOTrainer(model=model, reward_funcs=sentiment, args=trl_config(s, tmp),
                              train_dataset=Dataset.from_dict({"prompt": train_prompts}), processing_class=tokenizer,
                              peft_config=default_lora_config(), callbacks=[clock])
        out["trainable_params"] = _trainable(trainer.model)
        out["trl_gradient_checkpointing"] = bool(trainer.args.gradient_checkpointing)
        out["trl_loss_type"] = trainer.args.loss_type
        gen_s: list[float] = []
        generate_single_turn = trainer._generate_single_turn

        def timed_generate(*a, **kw):  # time TRL's sampling, as PPO reports time/generate_s
            start = time.perf_counter()
            result = generate_single_turn(*a, **kw)
            gen_s.append(time.perf_counter() - start)
            return result

        trainer._generate_single_turn = timed_generate
        probe = MemoryProbe()
        probe.start()
        with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its summary; stdout is for our JSON
            trainer.train()
        mem = probe.stop()
        policy = trainer.accelerator.unwrap_model(trainer.model)
        out["held_out_reward_after"] = held_out_reward(policy, tokenizer, reward, held, s.max_new_tokens)
        out["optimizer_steps"] = trainer.state.global_step
    step_s = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    if len(step_s) != s.steps or len(rewards) != s.steps:
        raise RuntimeError(f"TRL ran {len(step_s)} timed rollouts and {len(rewards)} reward calls; expected "
                           f"{s.steps} each (check steps_per_generation / num_iterations).")
    return _finish(out, step_s, gen_s, rewards, lengths, mem, t0)


BENCHES = {"ppo": bench_ppo, "trl": bench_trl}


# ---------------------------------------------------------------- side by side

def worker(job: dict) -> dict:
    """One method in this process from JSON, ``{"method": ..., "settings": asdict(BenchSettings)}``: what ``compare``
    runs in a fresh worker process."""
    return BENCHES[job["method"]](BenchSettings(**job["settings"]).validate())


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return format(v, spec)


def _ratio(a, b) -> float | None:
    if a is None or b is None or not b or any(isinstance(x, float) and math.isnan(x) for x in (a, b)):
        return None
    return a / b


TABLE_ROWS = [  # key, label, format, how to compare (ratio a/b, or difference a-b)
    ("median_step_s", "seconds / step (median, after warm-up)", ".2f", "ratio"),
    ("median_generate_s", "  of which sampling (s)", ".2f", "ratio"),
    ("peak_rss_mb", "peak RSS, whole process (MB)", ".0f", "ratio"),
    ("train_peak_rss_mb", "peak RSS during training (MB)", ".0f", "ratio"),
    ("train_growth_mb", "RSS growth in training (MB)", ".0f", "ratio"),
    ("reward_last_step", "reward, last step (mean of its samples)", "+.3f", "diff"),
    ("held_out_reward_before", "held-out reward before training", "+.3f", "diff"),
    ("held_out_reward_after", "held-out reward after training", "+.3f", "diff"),
    ("mean_completion_tokens", "completion tokens (mean)", ".1f", "ratio"),
    ("trainable_params", "trainable parameters", ",d", "ratio"),
    ("optimizer_steps", "optimiser steps", "d", "ratio"),
]


def comparison(results: dict) -> dict:
    """Ratios alignlib / TRL (times, memory) and differences (rewards) of two result dicts."""
    a, b = results["ppo"], results["trl"]
    out = {}
    for key, _, _, how in TABLE_ROWS:
        if how == "ratio":
            out[key + "_ratio"] = _ratio(a.get(key), b.get(key))
        elif a.get(key) is not None and b.get(key) is not None:
            out[key + "_diff"] = a[key] - b[key]
    return out


def format_table(results: dict) -> str:
    a, b = results["ppo"], results["trl"]
    cmp = comparison(results)
    width = max(len(label) for _, label, _, _ in TABLE_ROWS) + 2
    lines = [f"{'':{width}}{LABELS['ppo']:>14}{LABELS['trl']:>14}{'alignlib/TRL':>14}", "-" * (width + 42)]
    for key, label, spec, how in TABLE_ROWS:
        rel = (_fmt(cmp.get(key + "_ratio"), ".2f") + "x" if how == "ratio" and cmp.get(key + "_ratio") is not None
               else ("diff " + _fmt(cmp.get(key + "_diff"), "+.3f") if how == "diff" else "n/a"))
        lines.append(f"{label:{width}}{_fmt(a.get(key), spec):>14}{_fmt(b.get(key), spec):>14}{rel:>14}")
    s = a["settings"]
    lines += ["", f"model {s['model']}, {s['steps']} steps, {a['completions_per_step']} completions/step "
                  f"(TRL: {s['prompts_per_step']} prompts x {s['generations']}; PPO: {a['completions_per_step']} "
                  f"prompts x 1) of <= {s['max_new_tokens']} tokens, {a['optimizer_steps_per_step']} optimiser "
                  f"steps/step ({s['epochs']} passes x mini-batch {s['mini_batch_size']}), lr {s['lr']}, "
                  f"KL coef {s['kl_coef']}, fp32 CPU, {a['torch_threads']} torch threads on {a['cpu_count']} cores, "
                  f"load average {_fmt(a.get('loadavg_start'), '.1f')} / {_fmt(b.get('loadavg_start'), '.1f')} "
                  f"at the start of each run."]
    step_r, mem_r = cmp.get("median_step_s_ratio"), cmp.get("train_peak_rss_mb_ratio") or cmp.get("peak_rss_mb_ratio")
    if step_r is not None and mem_r is not None:
        lines.append(f"goal (alignlib no slower, no larger): time {'met' if step_r <= 1 else 'NOT met'} "
                     f"({step_r:.2f}x), memory {'met' if mem_r <= 1 else 'NOT met'} ({mem_r:.2f}x).")
    return "\n".join(lines)


def compare(s: BenchSettings, methods=METHODS) -> dict:
    """Run each method in its own subprocess, one after the other; return {method: result, "comparison": ...}."""
    from .workers import run_worker

    s.validate()
    results = {}
    for method in methods:
        print(f"[peer_bench] running {LABELS[method]} in a subprocess ...", file=sys.stderr)
        results[method] = run_worker("alignlib.bench.peer:worker", {"method": method, "settings": asdict(s)},
                                     name=f"peer-bench {method}", env={"TOKENIZERS_PARALLELISM": "false"},
                                     stdout=subprocess.DEVNULL)  # its progress goes to stderr
    if all(m in results for m in METHODS):
        results["comparison"] = comparison(results)
    return results


# ---------------------------------------------------------------- command line

def run(args) -> dict:
    """Entry point for the CLI: one method in-process (JSON on stdout) or both side by side (a table)."""
    s = BenchSettings.from_args(args).validate()
    if args.method == "both":
        results = compare(s)
        print(format_table(results))
    else:
        results = BENCHES[args.method](s)
        print(json.dumps(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = peer_bench_arguments(argparse.ArgumentParser(prog="python -m alignlib.bench.peer",
                                                   description=__doc__.split("\n\n")[0]))
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
