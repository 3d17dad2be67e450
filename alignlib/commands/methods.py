"""``python -m alignlib ppo | rrhf | raft``: one method on the preset's task, every config field a flag.

``python -m alignlib ppo --kl-coef 0.1 --lr 1e-4`` overrides two fields of ``PPOConfig.preset("cpu")``;
``--config run.yaml`` reads fields from a file (flags on the command line win). The run itself is
``alignlib.commands.run.run_named``: the run directory, checkpoints, ``--resume``.
"""
from __future__ import annotations

from .args import add_config_arguments, add_shared, count

METHODS = {  # name -> (module, config class, one-line help)
    "ppo": ("alignlib.ppo", "PPOConfig", "RLHF with PPO (lecture 01)"),
    "rrhf": ("alignlib.rrhf", "RRHFConfig", "RRHF: rank responses to align (lecture 02)"),
    "raft": ("alignlib.raft", "RAFTConfig", "RAFT: reward-ranked fine-tuning (lecture 03)"),
}


def add_arguments(parser, method: str) -> None:
    add_shared(parser, "preset", "model", "seed", "threads", "output", "resume", "overwrite", "checkpoint_every",
               "report_to", "config", output=f"runs/{method}")
    parser.add_argument("--reward", help="override the preset's reward: sentiment | length | rm:<model>")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in the backward pass: less memory, about a third more compute")
    if method == "raft":
        parser.add_argument("--steps", type=count(1), default=None, help="RAFT's stages (the same as --stages)")
    module, cls, _ = METHODS[method]
    add_config_arguments(parser, module, cls)


def run(args, method: str) -> dict:
    from ..utils import set_threads
    from .run import run_named

    if args.threads:
        set_threads(args.threads)
    return run_named(method, args)
