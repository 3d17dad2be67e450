"""PPO, RRHF and RAFT side by side: ``python -m alignlib method-bench``.

The slides claim RRHF needs 1-2 models where PPO needs 4, and that RAFT's training phase is plain SFT. This
benchmark measures what that buys on one machine, for one model and one task: each method runs its ``cpu``
preset on the course's sentiment task (chat answers to movie-review openings at temperature 0.7, VADER reward)
with the same number of steps and the same response length, each in a fresh process (so a peak belongs to one
method), one after the other; ``--seeds`` repeats the three runs per seed. Reported per method:

- seconds per step (median after the first step) and of its training phase (``time/train_s``: PPO's epochs over
  mini-batches, RRHF's ranking backward pass, RAFT's SFT on the kept samples);
- peak memory of the whole run, and peak memory of the training phase alone (on Linux the kernel's high-water
  mark is reset before each training phase), both as resident set size on a CPU (weights, Python and torch
  included) and ``torch.cuda.max_memory_allocated`` on a GPU; plus the growth over the memory after loading;
- the training reward per step against cumulative wall-clock seconds, and the seconds each method needed to
  reach PPO's final reward (3-step running mean);
- the slides' Fig. 4 at course scale: held-out reward (40 test openings, 2 answers each, fixed sampling seed)
  and the perplexity of those answers under the initial model, for the initial model and after each method,
  with distinct-2 beside them.

``--mode lora`` (default, how the course trains): every method trains LoRA adapters on one copy of the model;
PPO's reference is the adapter switched off and its value head shares the trunk, so PPO holds one model too.
``--mode full``: full fine-tuning as in the papers; PPO then keeps a frozen reference copy and a separate value
model (a copy with its own adapter), RRHF a frozen copy of the initial model (its "initial" samples), RAFT nothing
else; every method then trains with lr ``FULL_LR`` instead of the presets' LoRA rate.
The reward (VADER) is a lexicon, not a model, in both modes.

With ``--json PATH``, each finished (method, seed) run is kept at once beside it (``<PATH stem>.runs/``): Ctrl-C
or SIGTERM terminates the running subprocess and ``--resume`` runs only what had not finished (``run``).
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..models import DEFAULT_MODEL
from .ppo_check import EVAL_SAMPLES, EVAL_SEED, reference_perplexity  # ppo-check's held-out evaluation: they compare

METHODS = ("ppo", "rrhf", "raft")
FULL_LR = 1e-5       # learning rate of every method in --mode full
TEMPERATURE = 0.7    # the task's sampling temperature (PPO's cpu preset), for every method and the evaluation


def held_out_answers(model, tokenizer, reward, prompts: list[str], max_new_tokens: int) -> dict:
    """``EVAL_SAMPLES`` answers per prompt at ``TEMPERATURE``, fixed seed: the answers, each prompt's mean reward."""
    from ..generation import generate

    with torch.random.fork_rng(devices=[]):
        roll = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, chat=True, temperature=TEMPERATURE,
                        seed=EVAL_SEED, num_return_sequences=EVAL_SAMPLES)
    per_prompt = reward(roll.prompts, roll.responses).float().view(len(prompts), EVAL_SAMPLES).mean(-1)  # (N,)
    return {"answers": roll.responses, "reward": per_prompt.tolist()}


class PhaseProbe:
    """Peak memory of repeated sections (the training phases), with the kernel's RSS high-water mark reset.

    On CUDA it uses the allocator's peak statistics instead. ``wrap(fn)`` returns ``fn`` measured.
    """

    def __init__(self, device: torch.device):
        from .peer import MemoryProbe

        self.device, self.probe, self.peaks, self.process_peak = device, MemoryProbe(), [], 0.0

    def wrap(self, fn):
        def measured(*args, **kwargs):
            if self.device.type == "cuda":
                self.process_peak = max(self.process_peak, torch.cuda.max_memory_allocated(self.device) / 2**20)
                torch.cuda.reset_peak_memory_stats(self.device)
                out = fn(*args, **kwargs)
                self.peaks.append(torch.cuda.max_memory_allocated(self.device) / 2**20)
                return out
            self.probe.start()
            out = fn(*args, **kwargs)
            mem = self.probe.stop()
            self.process_peak = max(self.process_peak, mem["peak_rss_mb"])
            if mem["train_peak_rss_mb"] is not None:
                self.peaks.append(mem["train_peak_rss_mb"])
            return out
        return measured


def _current_mb(device: torch.device) -> float | None:
    from .peer import _status_mb

    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else _status_mb("VmRSS")


def bench_method(method: str, model_name: str = DEFAULT_MODEL, steps: int = 10, mode: str = "lora",
                 threads: int | None = None, seed: int = 0, held_out: int = 40, progress: bool = True) -> dict:
    """Train one method for ``steps`` steps in this process; return its timings, memory and rewards."""
    from ..data import load_prompts
    from ..models import load_model
    from ..ppo import PPOConfig, PPOTrainer
    from ..raft import RAFTConfig, RAFTTrainer, distinct_n
    from ..rewards import SentimentReward
    from ..rrhf import RRHFConfig, RRHFTrainer
    from ..utils import get_device, peak_memory_mb, seed_everything

    if threads:
        torch.set_num_threads(threads)
    seed_everything(seed)
    t_start = time.perf_counter()
    device = get_device()
    model, tok = load_model(model_name, lora=True if mode == "lora" else None)
    ref = None
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        if method in ("ppo", "rrhf"):
            ref = copy.deepcopy(model).eval().requires_grad_(False)
    reward = SentimentReward()
    prompts, held = load_prompts("movie_openings", "train"), load_prompts("movie_openings", "test", n=held_out)
    max_new_tokens = PPOConfig.preset("cpu").max_new_tokens
    before = held_out_answers(model, tok, reward, held, max_new_tokens)
    loaded_mb = _current_mb(device)
    probe = PhaseProbe(device)
    # the presets' lr (3e-3) is for LoRA adapters; every weight at once needs a far smaller step
    common = dict(seed=seed, temperature=TEMPERATURE, max_new_tokens=max_new_tokens,
                  **({"lr": FULL_LR} if mode == "full" else {}))
    if method == "ppo":
        config = PPOConfig.preset("cpu", steps=steps, value_model="separate" if mode == "full" else "shared",
                                  **common)
        trainer = PPOTrainer(model, tok, reward, prompts, config, ref_model=ref)
        trainer.learn = probe.wrap(trainer.learn)
        step = lambda: trainer.step()[0]  # noqa: E731
        policy = lambda: trainer.accelerator.unwrap_model(trainer.model).policy  # noqa: E731
    elif method == "rrhf":
        config = RRHFConfig.preset("cpu", steps=steps, **common)
        trainer = RRHFTrainer(model, tok, reward, prompts, config, ref_model=ref, log_kl=False)
        trainer.backward = probe.wrap(trainer.backward)
        step, policy = trainer.step, (lambda: model)
    elif method == "raft":
        config = RAFTConfig.preset("cpu", stages=steps, **common)
        trainer = RAFTTrainer(model, tok, reward, prompts, config, log_kl=False)
        trainer.fine_tune = probe.wrap(trainer.fine_tune)
        step, policy = trainer.stage, (lambda: model)
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    history = []
    for i in range(steps):
        metrics = step()
        history.append({k: metrics[k] for k in ("reward/mean", "time/step_s", "time/train_s", "time/generate_s")})
        if progress:
            print(f"[{method}] step {i + 1}/{steps}: {metrics['time/step_s']:.1f} s, "
                  f"reward {metrics['reward/mean']:+.3f}",
                  file=sys.stderr, flush=True)
    after = held_out_answers(policy(), tok, reward, held, max_new_tokens)
    peak = max(probe.process_peak, peak_memory_mb(device))
    step_s = [h["time/step_s"] for h in history]
    train_s = [h["time/train_s"] for h in history]
    return {
        "method": method, "mode": mode, "model": model_name, "device": str(device), "steps": steps,
        "threads": torch.get_num_threads(), "loadavg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "config": {k: v for k, v in vars(config).items() if not k.startswith("_")},
        "trainable_params": sum(p.numel() for p in (trainer.model if method == "ppo" else model).parameters()
                                if p.requires_grad),
        "median_step_s": statistics.median(step_s[1:] or step_s),
        "median_train_s": statistics.median(train_s[1:] or train_s),
        "peak_mb": peak, "train_peak_mb": max(probe.peaks) if probe.peaks else None, "loaded_mb": loaded_mb,
        "held_out_before": statistics.fmean(before["reward"]), "held_out_after": statistics.fmean(after["reward"]),
        "prompts": [p for p in held for _ in range(EVAL_SAMPLES)], "before": before["answers"],
        "after": after["answers"], "reward_before": before["reward"], "reward_after": after["reward"],
        "distinct2_before": distinct_n(before["answers"], 2), "distinct2_after": distinct_n(after["answers"], 2),
        "history": history,
        "wall_s": time.perf_counter() - t_start,
    }


def time_to_reach(history: list[dict], target: float, window: int = 3) -> float | None:
    """Cumulative seconds until the running mean of ``window`` training rewards first reaches ``target``."""
    elapsed, rewards = 0.0, []
    for h in history:
        elapsed += h["time/step_s"]
        rewards.append(h["reward/mean"])
        if len(rewards) >= window and statistics.fmean(rewards[-window:]) >= target:
            return elapsed
    return None


def worker(job: dict) -> dict:
    """``bench_method(job["method"], **job["opts"])``: what ``run`` calls in a fresh worker process."""
    return bench_method(job["method"], **job["opts"])


def summarize(results: dict) -> dict:
    """Ratios to PPO and the time each method took to reach PPO's final training reward."""
    ppo = results["ppo"]
    target = statistics.fmean(h["reward/mean"] for h in ppo["history"][-3:])
    out = {"target_reward": target}
    for m, r in results.items():
        out[m] = {
            "step_ratio": r["median_step_s"] / ppo["median_step_s"],
            "train_time_ratio": r["median_train_s"] / ppo["median_train_s"],
            "peak_ratio": r["peak_mb"] / ppo["peak_mb"],
            "train_peak_ratio": (r["train_peak_mb"] / ppo["train_peak_mb"]
                                 if r["train_peak_mb"] and ppo["train_peak_mb"] else None),
            "seconds_to_target": time_to_reach(r["history"], target),
        }
    return out


def format_table(results: dict, summary: dict) -> str:
    def f(v, spec):
        return "n/a" if v is None else format(v, spec)

    rows = [
        ("seconds / step (median)", "median_step_s", ".1f", "step_ratio"),
        ("  training phase (s)", "median_train_s", ".1f", "train_time_ratio"),
        ("peak memory, whole run (MB)", "peak_mb", ".0f", "peak_ratio"),
        ("peak memory, training phase (MB)", "train_peak_mb", ".0f", "train_peak_ratio"),
        ("memory after loading (MB)", "loaded_mb", ".0f", None),
        ("held-out reward before", "held_out_before", "+.3f", None),
        ("held-out reward after", "held_out_after", "+.3f", None),
    ]
    names = [m for m in METHODS if m in results]
    lines = [f"{'':36}" + "".join(f"{m.upper():>10}{'/PPO':>7}" for m in names), "-" * (36 + 17 * len(names))]
    for label, key, spec, ratio in rows:
        cells = "".join(f"{f(results[m].get(key), spec):>10}"
                        f"{(f(summary[m][ratio], '.2f') + 'x') if ratio and summary[m][ratio] is not None else '':>7}"
                        for m in names)
        lines.append(f"{label:36}{cells}")
    lines.append(f"{'seconds to PPO final reward':36}" + "".join(
        f"{f(summary[m]['seconds_to_target'], '.0f'):>10}{'':>7}" for m in names))
    r = results[names[0]]
    lines += ["", f"model {r['model']} ({r['mode']}), {r['steps']} steps each, {r['device']}, {r['threads']} threads; "
                  f"PPO's final reward (3-step mean) {summary['target_reward']:+.3f}; load average at the start "
                  + " / ".join(f(results[m]['loadavg'], '.1f') for m in names)]
    return "\n".join(lines)


def fig4_table(runs: dict[int, dict]) -> str:
    """The slides' Fig. 4 at course scale: held-out reward and perplexity under the initial model, mean and the
    range over seeds, for the initial model and after each method."""
    def cell(values: list[float], spec: str) -> str:
        m = statistics.fmean(values)
        return f"{m:{spec}} [{min(values):{spec}}, {max(values):{spec}}]" if len(values) > 1 else f"{m:{spec}}"

    seeds = sorted(runs)
    first = runs[seeds[0]][next(iter(runs[seeds[0]]))]
    rows = [("initial model", [first["held_out_before"]], [first["ppl_before"]], [first["distinct2_before"]])]
    for m in METHODS:
        if m in runs[seeds[0]]:
            rs = [runs[s][m] for s in seeds]
            rows.append((m.upper(), [r["held_out_after"] for r in rs], [r["ppl_after"] for r in rs],
                         [r["distinct2_after"] for r in rs]))
    lines = [f"{'':16}{'held-out reward':>26}{'perplexity (initial model)':>30}{'distinct-2':>24}"]
    lines += [f"{name:16}{cell(r, '+.3f'):>26}{cell(p, '.2f'):>30}{cell(d, '.2f'):>24}" for name, r, p, d in rows]
    lines.append(f"mean [min, max] over seeds {', '.join(map(str, seeds))}; {len(first['prompts']) // EVAL_SAMPLES} "
                 f"held-out prompts, {EVAL_SAMPLES} answers each at temperature {TEMPERATURE}")
    return "\n".join(lines)


def run(args) -> dict:
    """Every method per seed, each in a subprocess. ``--json`` is checked before any run (an existing file is
    refused unless ``--overwrite`` or ``--resume``), each finished (method, seed) run is kept at once in
    ``<json stem>.runs/stages/`` and the JSON is rewritten after every seed. SIGINT/SIGTERM terminates the running
    subprocess and exits with 128 + the signal; ``--resume`` runs only what had not finished (the same model,
    steps, mode, methods, threads, seeds and held-out prompts; ``--resume`` refuses others)."""
    from ..training.checkpoint import atomic_write, graceful_stop
    from ..training.checkpoint import prepare_results
    from .workers import run_worker

    if "ppo" not in args.methods:
        raise ValueError("--methods must include ppo: every ratio is relative to PPO.")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}.")
    resume, overwrite = getattr(args, "resume", False), getattr(args, "overwrite", False)
    if (resume or overwrite) and not args.json:
        raise ValueError("--resume and --overwrite need --json: the finished runs are kept beside that file.")
    store = None
    if args.json:  # checked before an hour of runs, not after
        identity = {"command": "method-bench", "model": args.model, "bench_steps": args.steps, "mode": args.mode,
                    "methods": [m for m in METHODS if m in args.methods], "threads": args.threads,
                    "seeds": list(args.seeds), "held_out": args.held_out}
        store = prepare_results(Path(args.json), resume, overwrite, identity, flag="--json")
    runs = {}
    with graceful_stop() as stop:
        for seed in args.seeds:
            opts = {"model_name": args.model, "steps": args.steps, "mode": args.mode, "threads": args.threads,
                    "seed": seed, "held_out": args.held_out}
            results = {}
            for method in METHODS:
                if method not in args.methods:
                    continue
                name = f"seed-{seed}_{method}"
                if store is not None and store.done(name):
                    print(f"[method-bench] seed {seed}: {method} finished before: {store.path(name)}",
                          file=sys.stderr, flush=True)
                    results[method] = store.load(name)
                    continue
                print(f"[method-bench] seed {seed}: {method} in a subprocess ...", file=sys.stderr, flush=True)
                results[method] = run_worker("alignlib.bench.methods:worker", {"method": method, "opts": opts},
                                             name=f"method-bench {method}, seed {seed}", stop=stop,
                                             stdout=subprocess.DEVNULL, env={"TOKENIZERS_PARALLELISM": "false"})
                if results[method] is not None and store is not None:
                    store.save(name, results[method])
                if stop.signum:
                    print(f"[method-bench] stopped at seed {seed}'s {method} run"
                          + (f"; the finished runs are kept in {store.root}. Run the same command with --resume "
                             "to continue." if store is not None else "."), file=sys.stderr, flush=True)
                    raise SystemExit(128 + stop.signum)
            reference_perplexity(list(results.values()), args.model)
            runs[seed] = results
            print(f"\nseed {seed}\n" + format_table(results, summarize(results)), flush=True)
            out = {"runs": {str(s): r for s, r in runs.items()},
                   "summary": {str(s): summarize(r) for s, r in runs.items()}}
            if args.json:  # after every seed: a later failure loses only the runs after it
                atomic_write(Path(args.json), json.dumps(out, indent=1))
    print("\n" + fig4_table(runs))
    return out
