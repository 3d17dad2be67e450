"""``python -m alignlib reward-model``: one Bradley-Terry reward model per seed, its pairwise accuracy on the test
split and, for the course data, on the shifted pairs written unlike the training set. Every ``RewardModelConfig``
field is a flag (``--epochs 1``, ``--train-layers 2``) or a ``--config`` key.

With ``--output``, seed s is a run directory ``<output>/seed-s`` (checked for every seed before any training) whose
identity (the preset, the seed and every config field) ``--resume`` must match; a field left out on ``--resume``
means the stored value. ``--resume`` skips a seed that finished (its accuracies are read from its
``history.json``), continues one with a checkpoint, and starts one the stopped command had not reached.
SIGINT/SIGTERM during a training checkpoints it and stops (``training.loop.train_steps``); between trainings, it
stops after the running seed. Either way the exit code is 128 + the signal.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..training import CHECKPOINT_EVERY
from .args import add_config_arguments, add_shared, config_overrides


def add_arguments(parser) -> None:
    add_shared(parser, "preset", "output", "resume", "overwrite", "checkpoint_every", "config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one reward model per seed (default: 0)")
    add_config_arguments(parser, "alignlib.reward_model", "RewardModelConfig", skip=("seed",))


def run(args) -> list[dict]:
    return accuracy_over_seeds(args.preset, args.seeds, output=args.output, resume=args.resume,
                               overwrite=args.overwrite, every=args.checkpoint_every, **config_overrides(args))


def accuracy_over_seeds(preset: str = "cpu", seeds=(0,), output: str | None = None, resume: bool = False,
                        overwrite: bool = False, every: int = CHECKPOINT_EVERY, **overrides) -> list[dict]:
    """Train one reward model per seed (``reward_model.run``) and print its accuracies, as the module docstring
    says. ``overrides``: ``RewardModelConfig`` fields (None: the preset's, or on ``resume`` the stored value)."""
    from contextlib import nullcontext

    from .. import reward_model as rm
    from ..data import load_course_dataset
    from ..training.checkpoint import (graceful_stop, latest_checkpoint, prepare_output, read_marker, read_record,
                                       write_record)

    overrides = {k: v for k, v in overrides.items() if v is not None}
    fields = [f.name for f in dataclasses.fields(rm.RewardModelConfig) if f.name != "seed"]   # the class is loaded
    configs, dirs = {}, {}
    for seed in seeds:
        configs[seed] = rm.RewardModelConfig.preset(preset, seed=seed, **overrides)
        dirs[seed] = None
        if output:
            path = Path(output) / f"seed-{seed}"
            again = resume and latest_checkpoint(path) is None     # a seed the stopped command had not started
            asked = overrides if resume and not again else {k: getattr(configs[seed], k) for k in fields}
            identity = {"command": "reward-model", "preset": preset, "seed": seed, **{k: asked.get(k) for k in fields}}
            dirs[seed] = prepare_output(path, resume=resume and not again, overwrite=overwrite or again,
                                        identity=identity)
            stored = read_marker(dirs[seed])["identity"]
            configs[seed] = rm.RewardModelConfig.preset(preset, seed=seed,
                                                        **{k: stored[k] for k in fields if k in stored})
    rows = []
    with graceful_stop() if output else nullcontext() as stop:
        for seed in seeds:
            config, record = configs[seed], read_record(dirs[seed]) if output else None
            if record and record.get("status") == "finished" and "row" in record:
                row = record["row"]                                  # finished before: not trained again
            else:
                out = rm.run(config, progress=False, out=dirs[seed], every=every,
                             resume=bool(output) and latest_checkpoint(dirs[seed]) is not None)
                row = {"seed": seed, "test": out["test"]["accuracy"]}
                if config.dataset == "preference_pairs":
                    shifted = load_course_dataset("preference_pairs_shift", "test")
                    row["shifted"] = rm.pairwise_accuracy(out["model"], out["tokenizer"], shifted,
                                                          max_length=config.max_length)["accuracy"]
                if output:
                    write_record(dirs[seed], {**read_record(dirs[seed]), "row": row})
            rows.append(row)
            print(f"seed {seed}: accuracy on the test split {row['test']:.3f}"
                  + (f", on the shifted pairs {row['shifted']:.3f}" if "shifted" in row else ""), flush=True)
            if stop is not None and stop.signum and seed != seeds[-1]:
                print(f"[reward-model] stopped after seed {seed}; run the same command with --resume to continue.",
                      flush=True)
                raise SystemExit(128 + stop.signum)
    return rows
