"""``python -m alignlib self-align``: SELF-ALIGN's four stages, the filter counts and the evaluation, as JSON in
``<output>/self_align.json`` and ``--json``; every ``SelfAlignConfig`` field is a flag or a ``--config`` key.

``--output`` (and ``--json``) are checked and the run directory locked before the model loads (``prepare_output``):
an earlier run is refused unless ``--resume`` continues it (with the same preset and config) or ``--overwrite``
deletes it. Every stage is stored as it finishes (``self_align.STAGES``); SIGINT/SIGTERM stops the command after the
running stage (exit status 128 + the signal; a second signal stops at once), and the same command with
``--resume`` continues it to the uninterrupted run's result.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .args import add_config_arguments, add_shared, config_overrides


def add_arguments(parser) -> None:
    add_shared(parser, "preset", "seed", "threads", "output", "json", "resume", "overwrite", "config",
               output="runs/self_align",
               json="runs/self_align.json")
    add_config_arguments(parser, "alignlib.self_align", "SelfAlignConfig")
    parser.add_argument("--control", action="store_true",
                        help="run the positive control instead (self_align.run_control: one checkable principle "
                             "engraved, evaluated against the base model, then the 1/4/16-principle ablation); "
                             "--output defaults to runs/self_align_control, --json to "
                             "runs/self_align_control.json; --model and --seed apply")


def run_control(args) -> dict:
    """``--control``: ``self_align.run_control`` under the same run protocol (checked output, stages, --resume)."""
    from ..self_align import CONTROL_STAGES, ControlConfig
    from ..self_align import run_control as run_self_align_control
    from ..training.checkpoint import atomic_write, check_json_path, prepare_output
    from ..training.loop import staged_run

    if args.output == "runs/self_align":
        args.output = "runs/self_align_control"
    if args.json == "runs/self_align.json":
        args.json = "runs/self_align_control.json"
    overrides = {k: v for k, v in config_overrides(args).items() if k == "model"}
    config = ControlConfig.preset(args.preset, **{"seed": args.seed, **overrides})
    check_json_path(args.json)
    identity = {"method": "self-align-control", "preset": args.preset, **json.loads(json.dumps(vars(config)))}
    run_dir = prepare_output(args.output, resume=args.resume, overwrite=args.overwrite, identity=identity)
    start = time.perf_counter()
    with staged_run("self-align --control", run_dir, CONTROL_STAGES) as stop:
        result = run_self_align_control(config, out=run_dir, stop=stop)
    result["reproduce"] = "python -m alignlib self-align --control --threads 1" + (
        f" --seed {args.seed}" if args.seed else "") + (f" --model {config.model}" if "model" in overrides else "")
    result["wall_s"] = time.perf_counter() - start     # of this invocation (a --resume reads stored stages back)
    text = json.dumps(result, indent=1)
    atomic_write(run_dir / "self_align_control.json", text)
    Path(args.json).write_text(text)
    ev = result["evaluation"]
    print(f"stage 2 filter: {result['stage2']['filter']}")
    for name, m in ev["models"].items():
        print(f"{name:10s} summary-first {m['pass_rate']:.2f} [{m['interval'][0]:.2f}, {m['interval'][1]:.2f}]; "
              f"non-empty {m['non_empty']:.2f}; distinct {m['distinct']:.2f}; relevance {m['relevance']:.2f}; "
              f"repeated sentences {m['repeated_sentences']:.2f}; {m['answers']['words']:.0f} words")
    d = ev["engraved_minus_base"]
    print(f"engraved - base: {d['mean']:+.3f} [{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}]")
    for k, a in result["ablation"].get("results", {}).items():
        print(f"{k:>2} principles: filter pass {a['pass_rate']:.2f}, adherence {a['adherence']:.2f}")
    print(f"wrote {args.json} and {run_dir / 'self_align_control.json'}")
    return result


def run(args) -> dict:
    from ..self_align import STAGES, SelfAlignConfig
    from ..self_align import run as run_self_align
    from ..training.checkpoint import atomic_write, check_json_path, prepare_output
    from ..training.loop import staged_run
    from ..utils import set_threads

    if args.threads:
        set_threads(args.threads)
    if getattr(args, "control", False):
        return run_control(args)
    config = SelfAlignConfig.preset(args.preset, **{"seed": args.seed, **config_overrides(args)})
    check_json_path(args.json)
    identity = {"method": "self-align", "preset": args.preset, **json.loads(json.dumps(vars(config)))}
    run_dir = prepare_output(args.output, resume=args.resume, overwrite=args.overwrite, identity=identity)
    with staged_run("self-align", run_dir, STAGES) as stop:
        result = run_self_align(config, out=run_dir, stop=stop)
    text = json.dumps(result, indent=1)
    atomic_write(run_dir / "self_align.json", text)
    out = Path(args.json)
    out.write_text(text)
    print(f"stage 1: {result['stage1']['pool']} instructions in the pool; stage 2 filter: {result['stage2']['filter']}")
    for name, ev in result["evaluation"].items():
        print(f"{name:10s} MC by p(True) {ev['mc_true']['accuracy']:.2f}, by likelihood "
              f"{ev['mc_likelihood']['accuracy']:.2f}; adherence {ev['adherence']['rate']:.2f}; "
              f"answers {ev['answers']['words']:.0f} words")
    print(f"wrote {out} and {run_dir / 'self_align.json'}")
    return result
