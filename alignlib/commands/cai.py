"""``python -m alignlib cai-sl`` / ``cai-rl``: Constitutional AI's two stages in one run directory (``--output``).

Every ``CAIConfig`` field is a flag (``--red-team 12``, ``--feedback contrastive``) or a ``--config`` key.
``--output`` (and ``--json``) are checked and the directory locked before any model loads (``claim_output``):
cai-sl refuses an earlier run unless ``--resume`` continues it or ``--overwrite`` deletes it; cai-rl continues the
finished cai-sl run with its settings. Every stage is stored as it finishes (``cai.SL_STAGES``, ``cai.RL_STAGES``);
SIGINT/SIGTERM stops the command after the running stage (exit status 128 + the signal; a second signal stops at
once), and the same command with ``--resume`` continues it to the result an uninterrupted run gives.

``python -m alignlib cai-control`` runs a CAI control (``cai.run_control``: AI or oracle labels on the policy's
own pairs, preference model, PPO, oracle effect on held-out prompts) in its own run directory, the same way;
``python -m alignlib cai-sl-control`` SL-CAI's positive control (``cai_sl_control.run``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .args import add_config_arguments, add_shared, config_overrides, count, module_literal

RL_IDENTITY = ("human_pairs", "feedback_model", "feedback_cot_tokens", "feedback_few_shot", "feedback",
               "human_helpful_pairs", "pm_preset", "pm_epochs", "ppo_steps", "ppo_preset", "eval_red_team",
               "eval_helpful")
"""The settings cai-rl adds to a CAI run's identity; every other ``CAIConfig`` field (with the preset) is cai-sl's."""


def add_arguments(parser) -> None:
    add_shared(parser, "preset", "seed", "threads", "output", "resume", "overwrite", "json", "config",
               output="runs/cai")
    parser.add_argument("--eval", type=count(1), default=None,
                        help="cai-rl: held-out prompts of each kind (sets --eval-red-team and --eval-helpful)")
    add_config_arguments(parser, "alignlib.cai", "CAIConfig", minimums=module_literal("alignlib.cai", "COUNT_FIELDS"))


def config_from_args(args):
    from ..cai import CAIConfig

    overrides = config_overrides(args)
    if args.eval is not None:
        overrides.update(eval_red_team=args.eval, eval_helpful=args.eval)
    return CAIConfig.preset(args.preset, **{"seed": args.seed, **overrides})


def run_identity(config, preset: str, stage: str) -> dict:
    """What a CAI run directory is a run of (``prepare_output`` compares it on resume): every field of the
    config, cai-rl's fields (``RL_IDENTITY``) only from cai-rl on."""
    fields = {k: v for k, v in json.loads(json.dumps(vars(config), default=str)).items()
              if stage == "rl" or k not in RL_IDENTITY}
    return {"method": "cai", "preset": preset, **fields}


def claim_output(args, stage: str, config) -> Path:
    """Check and lock ``--output`` before any model loads. cai-sl starts a CAI run (``prepare_output``: an earlier
    run needs --resume or --overwrite). cai-rl continues the finished cai-sl run in the directory: the same preset,
    seed, model and counts, its own settings added; a second cai-rl needs --resume, and --overwrite deletes only
    cai-rl's stages and rl.json (cai-sl's part is kept)."""
    from ..cai import RL_STAGES
    from ..training.checkpoint import MARKER, RunDirectoryError, StageStore, atomic_write, prepare_output, read_marker

    resume, overwrite = getattr(args, "resume", False), getattr(args, "overwrite", False)
    identity = run_identity(config, args.preset, stage)
    if stage == "sl":
        return prepare_output(args.output, resume=resume, overwrite=overwrite, identity=identity)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue cai-rl, or run it again.")
    out = Path(args.output)
    marker = read_marker(out) if out.is_dir() else None
    stored = (marker or {}).get("identity", {})
    if stored.get("method") != "cai" or not StageStore(out).done("sl-sft") or not (out / "sl.json").exists():
        todo = (f"`python -m alignlib cai-sl --resume --output {out}` to finish it" if stored.get("method") == "cai"
                else f"`python -m alignlib cai-sl --output {out}` first")
        raise FileNotFoundError(f"{out} holds no finished cai-sl run, which cai-rl continues; run {todo}, with the "
                                "settings you give cai-rl.")
    if any(k in stored for k in RL_IDENTITY) and not (resume or overwrite):
        raise RunDirectoryError(f"{out} already holds a cai-rl run; pass --resume to continue it, --overwrite to run "
                                "cai-rl again (cai-sl's part is kept), or choose another --output.")
    sl_part = {k: v for k, v in identity.items() if k not in RL_IDENTITY}
    try:
        out = prepare_output(out, resume=True, identity=sl_part if overwrite else identity)
    except RunDirectoryError as err:
        if resume:
            raise
        raise RunDirectoryError(f"cai-rl continues the cai-sl run in {out} with that run's settings: {err}") from None
    if overwrite:                          # cai-rl again: its stages and result go, its new settings replace the old
        store = StageStore(out)
        for name in RL_STAGES:
            shutil.rmtree(store.path(name), ignore_errors=True)
        (out / "rl.json").unlink(missing_ok=True)
        marker = read_marker(out)
        marker["identity"] = {**{k: v for k, v in marker["identity"].items() if k not in RL_IDENTITY},
                              **{k: identity[k] for k in RL_IDENTITY}}
        atomic_write(out / MARKER, json.dumps(marker, indent=1, default=str))
    return out


def run(args, stage: str) -> dict:
    """Run cai-sl (``stage="sl"``) or cai-rl (``"rl"``) as the module docstring says; print the summary."""
    from ..cai import RL_STAGES, SL_STAGES, run_rl, run_sl
    from ..training.checkpoint import check_json_path
    from ..training.loop import staged_run
    from ..utils import set_threads

    if args.threads:
        set_threads(args.threads)
    config = config_from_args(args)
    if args.json:
        check_json_path(args.json)
    out = claim_output(args, stage, config)
    with staged_run(f"cai-{stage}", out, SL_STAGES if stage == "sl" else RL_STAGES) as stop:
        if stage == "sl":
            result = run_sl(config, out=out, stop=stop)
        else:
            result = run_rl(config, sl_dir=out, out=out, stop=stop)
    if stage == "sl":
        result = {k: v for k, v in result.items() if k not in ("policy", "tokenizer")}
        changed = sum(r["final"] != r["initial"] for r in result["revised"])
        print(f"SL-CAI: {changed}/{len(result['revised'])} answers revised, {len(result['sft_history'])} SFT steps, "
              f"final loss {result['sft_history'][-1]['loss/sft']:.3f}; adapter in {out / 'sl_adapter'}")
    else:
        ev = result["evaluation"]
        print(f"judge accuracy on hand-labelled pairs: {result['judge_accuracy']}")
        print(f"scorer accuracy on held-out rows: {result['scorer_accuracy']}")
        for name, rates in ev["rates"].items():
            print(f"{name:8s} harmless {rates['harmless']['mean']:.2f}  helpful {rates['helpful']['mean']:.2f}  "
                  f"Elo harmlessness {ev['elo']['harmlessness'][name][0]:+.0f}  "
                  f"helpfulness {ev['elo']['helpfulness'][name][0]:+.0f}")
        print(f"wrote {out / 'rl.json'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def add_control_arguments(parser) -> None:
    """``cai-control``'s flags: the shared ones and one per ``CAIControlConfig`` field."""
    add_shared(parser, "preset", "seed", "threads", "output", "resume", "overwrite", "json", "config",
               output="runs/cai-control")
    add_config_arguments(parser, "alignlib.cai", "CAIControlConfig")


def _staged_control(args, name: str, config_class, stages, run_stages):
    """A control command under the run protocol: threads, the config from the preset and flags, ``--json`` checked
    and ``--output`` claimed before any model loads, the stages run (``--resume`` reads the stored ones back), and
    the result also written to ``--json``. Returns (config, output directory, result)."""
    from ..training.checkpoint import check_json_path, prepare_output
    from ..training.loop import staged_run
    from ..utils import set_threads

    if args.threads:
        set_threads(args.threads)
    config = config_class.preset(args.preset, **{"seed": args.seed, **config_overrides(args)})
    if args.json:
        check_json_path(args.json)
    identity = {"method": name, "preset": args.preset, **json.loads(json.dumps(vars(config), default=str))}
    out = prepare_output(args.output, resume=args.resume, overwrite=args.overwrite, identity=identity)
    with staged_run(name, out, stages) as stop:
        result = run_stages(config, out=out, stop=stop)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return config, out, result


def run_control(args) -> dict:
    """``python -m alignlib cai-control``: a CAI control (``cai.run_control``) in its own run directory, under the
    run protocol (claimed before any model loads, stages stored, ``--resume``); print the effect."""
    from ..cai import CONTROL_STAGES, CAIControlConfig
    from ..cai import run_control as run_stages

    config, out, result = _staged_control(args, "cai-control", CAIControlConfig, CONTROL_STAGES, run_stages)
    ev, effect = result["evaluation"], result["effect"]
    agree = result["label_vs_oracle"]["debiased"]
    print(f"{config.task} with {config.labels} labels: labels agree with the oracle on {agree['accuracy']} of "
          f"{agree['pairs']} training pairs (ties left out); PM vs oracle on held-out pairs "
          f"{ev['pm_accuracy_vs_oracle_held_out']}")
    print(f"oracle ({result['oracle']}) initial {ev['oracle']['initial']['mean']:+.3f}, "
          f"PPO {ev['oracle']['ppo']['mean']:+.3f}"
          f"; effect {effect['mean']:+.3f} [{effect['low']:+.3f}, {effect['high']:+.3f}]; words "
          f"{ev['words']['initial']:.1f} -> {ev['words']['ppo']:.1f}; wrote {out / 'control.json'}")
    return result


def add_sl_control_arguments(parser) -> None:
    """``cai-sl-control``'s flags: the shared ones and one per ``SLControlConfig`` field."""
    add_shared(parser, "preset", "seed", "threads", "output", "resume", "overwrite", "json", "config",
               output="runs/cai-sl-control")
    add_config_arguments(parser, "alignlib.cai_sl_control", "SLControlConfig")


def run_sl_control(args) -> dict:
    """``python -m alignlib cai-sl-control``: SL-CAI's positive control (``cai_sl_control.run``) under the run
    protocol; print the revisions' and the judge's readings and the oracle's effect."""
    from ..cai_sl_control import STAGES, SLControlConfig
    from ..cai_sl_control import run as run_stages

    config, out, result = _staged_control(args, "cai-sl-control", SLControlConfig, STAGES, run_stages)
    rev, ev, effect = result["revisions"], result["evaluation"]["models"], result["effect"]
    judge = rev["judge"]["accuracy"]
    print(f"revisions follow the principle {rev['revisions_follow']:.2f} (initial answers {rev['initial_follow']:.2f});"
          f" dropped {rev['copied']} copying a few-shot example, {rev['repeats']} repeating a sentence; the "
          f"True/False judge picks the follower in "
          f"{judge['mean'] if judge else float('nan'):.2f} of {rev['judge']['pairs']} pairs")
    print(f"held-out pass rate ({result['oracle']}): base {ev['base']['pass_rate']['mean']:.2f}, SL-CAI "
          f"{ev['sl_cai']['pass_rate']['mean']:.2f}; effect {effect['mean']:+.3f} [{effect['low']:+.3f}, "
          f"{effect['high']:+.3f}]; wrote {out / 'control.json'}")
    return result
