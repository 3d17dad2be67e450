"""The flags of the benchmark commands (``bench``, ``gpu-check``, ``peer-bench``, ``method-bench``, ``ppo-check``).

They live here, apart from the benchmarks in ``alignlib.bench``, so that parsing and ``--help`` import no torch;
the constants they show (measurement names, default shapes, settings) are read from the benchmarks' source.
"""
from __future__ import annotations

import argparse

from .. import DEFAULT_MODEL
from .args import config_fields, module_literal
from ..validate import threads_arg


def bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``python -m alignlib bench``: throughput, GFLOP/s and memory."""
    measures = [m for name in ("MEASUREMENTS", "HF_BASELINES", "PREFIX")
                for m in module_literal("alignlib.bench.throughput", name)]
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name, Hub id or local directory")
    parser.add_argument("--device", default=None, help="cpu, cuda, ...; default cuda > mps > cpu")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement (after a warm-up)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 repetition, 8 new tokens, 8 x 16 training tokens, 512^2 matmuls")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--threads", type=threads_arg, default=None,
                        help="torch CPU threads for every measurement (default: torch's choice, one per core)")
    parser.add_argument("--max-new-tokens", "--new-tokens", dest="new_tokens", type=int, default=48,
                        help="tokens to generate per prompt (no EOS stop: every prompt gets this many)")
    parser.add_argument("--measure", nargs="+", choices=measures, default=None,
                        help="only these measurements (the matmul peak is always measured)")
    parser.add_argument("--hf-baseline", action="store_true",
                        help="also time transformers' model.generate (generate(..., fast=False))")
    parser.add_argument("--in-process", action="store_true",
                        help="measure in this process (no subprocesses: faster, but peak memory is process-wide)")
    return parser


def gpu_check_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``python -m alignlib gpu-check``: bf16 tokens/s and MFU on a GPU."""
    defaults = module_literal("alignlib.bench.gpu_check", "DEFAULTS")
    gpu, smoke = defaults["gpu"], defaults["smoke"]
    for name, help_ in (("sft-batch", "SFT sequences B"), ("sft-len", "SFT tokens per sequence T"),
                        ("rrhf-prompts", "RRHF prompts P"), ("rrhf-k", "RRHF candidates per prompt k"),
                        ("rrhf-len", "RRHF tokens per candidate T"), ("ppo-batch", "PPO sequences B"),
                        ("ppo-len", "PPO tokens per sequence T"), ("rollout-batch", "rollout prompts G"),
                        ("prompt-len", "rollout prompt tokens P_len"), ("new-tokens", "rollout new tokens N"),
                        ("warmup", "untimed warm-up steps of each training measurement"),
                        ("steps", "timed steps of each training measurement"),
                        ("rollout-warmup", "untimed generate calls"), ("rollout-steps", "timed generate calls")):
        key = name.replace("-", "_")
        parser.add_argument(f"--{name}", type=int, default=None,
                            help=f"{help_} (default {gpu[key]}; --cpu-smoke: {smoke[key]})")
    measurements = module_literal("alignlib.bench.gpu_check", "MEASUREMENTS")
    parser.add_argument("--only", nargs="+", choices=measurements, default=list(measurements),
                        help="run only these measurements")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="bf16 dense peak of this device in TFLOP/s (default: from the device name; "
                             "H100 SXM/H200 989, A100 312)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in the backward")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decoder for the training steps")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="no GPU: run every code path on the CPU, fp32, tiny config and shapes (a test)")
    parser.add_argument("--threads", type=threads_arg, default=None, help="torch CPU threads (--cpu-smoke default: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="runs/gpu_check.json", metavar="PATH", help="write the results here")
    return parser


def peer_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``python -m alignlib peer-bench``: alignlib PPO against TRL's GRPOTrainer."""
    d = {f.name: f.default for f in config_fields("alignlib.bench.peer", "BenchSettings")[0]}
    parser.add_argument("--method", choices=["both", *module_literal("alignlib.bench.peer", "METHODS")],
                        default="both", help="'both' runs each in its own subprocess and prints the table; "
                                             "'ppo'/'trl' runs one in this process and prints its JSON")
    model = DEFAULT_MODEL if d["model"] is ... else d["model"]          # the source says DEFAULT_MODEL
    parser.add_argument("--model", default=model, help="model name, Hub id or directory (tests: tiny-random)")
    parser.add_argument("--steps", type=int, default=d["steps"], help="rollouts (step 1 is the untimed warm-up)")
    parser.add_argument("--prompts-per-step", type=int, default=d["prompts_per_step"],
                        help="distinct prompts per step for GRPO; PPO samples prompts x generations prompts")
    parser.add_argument("--generations", type=int, default=d["generations"], help="GRPO completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"])
    parser.add_argument("--mini-batch-size", type=int, default=d["mini_batch_size"],
                        help="sequences per optimiser step")
    parser.add_argument("--epochs", type=int, default=d["epochs"], help="PPO's ppo_epochs = GRPO's num_iterations")
    parser.add_argument("--lr", type=float, default=d["lr"])
    parser.add_argument("--kl-coef", type=float, default=d["kl_coef"], help="PPO's kl_coef = GRPO's beta")
    parser.add_argument("--held-out", type=int, default=d["held_out"],
                        help="held-out test prompts for the final reward")
    parser.add_argument("--seed", type=int, default=d["seed"])
    parser.add_argument("--threads", type=threads_arg, default=d["threads"],
                        help="torch CPU threads for both methods (default: torch's choice, one per core)")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="turn TRL's gradient checkpointing on (TRL's default; alignlib has none)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    return parser


def method_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``python -m alignlib method-bench``: PPO, RRHF and RAFT side by side."""
    methods = module_literal("alignlib.bench.methods", "METHODS")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name, Hub id or directory (tests: tiny-random)")
    parser.add_argument("--steps", type=int, default=10, help="steps (RAFT: stages) per method")
    parser.add_argument("--mode", choices=["lora", "full"], default="lora", help="LoRA adapters or every weight")
    parser.add_argument("--methods", nargs="+", choices=methods, default=list(methods))
    parser.add_argument("--threads", type=threads_arg, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run of every method per seed")
    parser.add_argument("--held-out", type=int, default=40, help="held-out prompts (2 answers each)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH (each finished "
                                                       "run is kept at once in <PATH without .json>.runs/)")
    parser.add_argument("--resume", action="store_true", help="with --json: reuse the finished runs of an "
                                                              "interrupted benchmark")
    parser.add_argument("--overwrite", action="store_true", help="with --json: replace PATH and its finished runs")
    return parser


def ppo_check_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``python -m alignlib ppo-check``: lecture 01's PPO run against its learning criteria."""
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=threads_arg, nargs="+", default=[1, 2], help="torch thread counts to try")
    parser.add_argument("--kl-coefs", type=float, nargs="+", default=None,
                        help="beta values (default: the preset's); extra values run at the first seed and thread count")
    parser.add_argument("--steps", type=int, default=None, help="PPO steps per run (default: the cpu preset's)")
    parser.add_argument("--task", choices=module_literal("alignlib.bench.ppo_check", "TASKS"), default="sentiment",
                        help="sentiment: VADER on movie openings; reward-model: PPO against a learned reward model")
    parser.add_argument("--min-gain", type=float, default=None,
                        help="required rise of the held-out reward (default 0.1 for sentiment, 0.02 for reward-model)")
    parser.add_argument("--kl-budget", type=float, default=12.0, help="nats per sequence")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (only 1-thread runs are paired)")
    parser.add_argument("--json", default="runs/ppo_check.json", metavar="PATH",
                        help="the JSON of every run; each finished run is kept in <PATH without .json>.runs/")
    parser.add_argument("--resume", action="store_true", help="reuse the finished runs of an interrupted check")
    parser.add_argument("--overwrite", action="store_true", help="replace --json and its finished runs")
    parser.add_argument("--rejudge", action="store_true",
                        help="run nothing: score and judge the runs stored in --json again, and rewrite it")
    return parser
