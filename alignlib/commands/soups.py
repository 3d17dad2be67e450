"""``python -m alignlib soups``: rewarded soups against MORL; every ``SoupsConfig`` field that a flag can spell is a
flag (``--trainer raft``, ``--lambdas 6``), and any of them a ``--config`` key.

``--output`` is checked before any work (an earlier run is refused unless ``--resume`` or ``--overwrite``). Every
training and evaluation is a stage in ``<output>/stages/`` (``soups.run``); SIGINT/SIGTERM stops after the running
one (exit code 128 + the signal) and ``--resume`` continues after it, with the same soups.json in the end as an
uninterrupted run (except the seconds and the machine).
"""
from __future__ import annotations

import json

from .args import add_config_arguments, add_shared, config_overrides

NESTED = ("morl_simplex", "users")   # tuples of tuples: set them in Python (SoupsConfig(...)), not by flag


def add_arguments(parser) -> None:
    add_shared(parser, "preset", "seed", "threads", "output", "resume", "overwrite", "json", "config",
               output="runs/soups")
    add_config_arguments(parser, "alignlib.soups", "SoupsConfig", skip=NESTED)


def soups_identity(preset: str, config) -> dict:
    """What a soups run directory is a run of (``--resume`` refuses anything else): the preset and every field
    of the configuration, with the fine-tuner's steps resolved (None: its preset's), as JSON would store them."""
    from ..training.registry import get_method

    spec = get_method(config.trainer)
    fields = {k: getattr(config, k) for k in config.__dataclass_fields__ if k != "steps"}
    fields["rewards"] = [r if isinstance(r, str) else getattr(r, "__name__", repr(r)) for r in config.rewards]
    trainer_steps = config.steps or getattr(spec.config.preset(config.trainer_preset), spec.iterations)
    # not the key "steps", which --resume lets grow: a finished training cannot be extended
    return json.loads(json.dumps({"command": "soups", "preset": preset, **fields, "trainer_steps": trainer_steps}))


def run(args) -> dict:
    """Train, evaluate, compare; write the adapters, the JSON and the plots."""
    import os
    import platform
    from pathlib import Path

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from ..soups import SoupsConfig, plot_front, plot_lmc
    from ..soups import run as run_soups
    from ..training.checkpoint import atomic_write, check_json_path, prepare_output
    from ..training.loop import staged_run
    from ..utils import set_threads

    if args.threads:
        set_threads(args.threads)
    config = SoupsConfig.preset(args.preset, **{"seed": args.seed, **config_overrides(args)})
    if args.json:                                                     # checked now, not after half an hour
        check_json_path(args.json)
    out = prepare_output(args.output, resume=getattr(args, "resume", False), overwrite=args.overwrite,
                         identity=soups_identity(args.preset, config))
    with staged_run("soups", out) as stop:
        result = run_soups(config, out=out, stop=stop)
    result["machine"] = {"threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                         "loadavg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    text = json.dumps(result, indent=1)
    atomic_write(out / "soups.json", text)
    if args.json:
        atomic_write(Path(args.json), text)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    plot_front(result, axes[0])
    plot_lmc(result, axes[1])
    fig.tight_layout()
    fig.savefig(out / "fronts.png", dpi=120)
    s = result["summary"]
    for n in ("n2", "n3"):
        if n in s:
            iv = s[n]["ratio_interval"]
            print(f"[soups] {n.upper()}: hypervolume RS / MORL = {s[n]['ratio']:.3f} [{iv[0]:.3f}, {iv[1]:.3f}] "
                  f"({s[n]['trainings_rs']} trainings in {s[n]['seconds_rs']:.0f} s against "
                  f"{s[n]['trainings_morl']} in {s[n]['seconds_morl']:.0f} s)")
    print(f"[soups] wrote {out}/soups.json, {out}/fronts.png and the adapters ({out}/stages/*/adapter.safetensors)")
    return result
