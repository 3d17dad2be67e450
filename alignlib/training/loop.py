"""The step loop every trainer shares: step, checkpoint, stop cleanly on SIGINT/SIGTERM, report, resume.

``train_steps`` drives any ``alignlib.training.protocol.Trainer``: it calls ``train_step()`` until the history
holds ``total`` iterations, writes a checkpoint (``alignlib.training.checkpoint``) every ``every`` iterations, after
the last one and when a signal asks to stop, and logs each step's metrics to an optional tracker (TensorBoard or
W&B through accelerate). Under ``accelerate launch`` all processes agree on when to stop.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .checkpoint import StageStore, StopRun, _good_copy, graceful_stop, load_checkpoint, save_checkpoint, write_record
from .distributed import process_state


def make_tracker(report_to: str, out: Path, record: dict):
    """``--report-to``: accelerate's TensorBoard (offline, ``<output>/tensorboard``) or W&B tracker, or None."""
    if report_to in (None, "none"):
        return None
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    if report_to == "tensorboard":
        tracker = TensorBoardTracker(record["method"], out / "tensorboard")
    elif report_to == "wandb":
        tracker = WandBTracker(record["method"])
    else:
        raise ValueError(f"--report-to must be none, tensorboard or wandb, got {report_to!r}.")
    tracker.start()
    tracker.store_init_configuration({k: v for k, v in record["config"].items()
                                      if isinstance(v, (int, float, str, bool))})
    return tracker


def train_steps(trainer, out, total: int, every: int, record: dict, progress: bool = True, tracker=None) -> int | None:
    """Step ``trainer`` until its history holds ``total`` steps; checkpoint every ``every`` steps (0: never in
    between), after the last one, and when SIGINT/SIGTERM asks to stop. Returns the signal number if stopped.
    Only the main process writes (the others hold the same weights)."""
    main = process_state().is_main_process
    bar = tqdm(total=total, initial=len(trainer.history), desc=record["method"].upper(),
               disable=not (progress and main))
    with graceful_stop() as stop:
        while len(trainer.history) < total:
            try:
                metrics = trainer.train_step()
            except FloatingPointError as err:       # name the checkpoint that holds good weights
                raise FloatingPointError(f"{err} {_good_copy(out)}") from None
            bar.update(1)
            shown = "reward/mean" if "reward/mean" in metrics else "loss/total"    # a reward model has no reward
            bar.set_postfix({shown.split("/")[0]: f"{metrics[shown]:+.3f}"})
            done = len(trainer.history)
            if tracker is not None and main:
                tracker.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=done)
            signum = agreed_stop(stop.signum)
            if main and (signum or done == total or (every and done % every == 0)):
                save_checkpoint(out, trainer)
                status = "interrupted" if signum and done < total else "training"
                write_record(out, {**record, "history": trainer.history, "status": status})
            if signum:
                return signum
    bar.close()
    return None


def agreed_stop(signum: int | None) -> int | None:
    """The stop request of any process, so that all processes of a launch stop after the same step (only the
    main process writes the checkpoint; a process that stopped alone would leave the others waiting)."""
    state = process_state()
    if state.num_processes == 1:
        return signum
    flag = torch.tensor([signum or 0], device=state.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item()) or None


def resume_run(name: str, out: Path, trainer, total: int, say=print) -> None:
    """Load ``out``'s newest checkpoint into ``trainer`` and say where the run continues."""
    say(f"[{name}] resuming {out} after step {load_checkpoint(out, trainer)} of {total}")


def stop_run(name: str, out: Path, trainer, total: int, signum: int, say=print):
    """After SIGINT/SIGTERM (the checkpoint is written): say how to continue, exit with 128 + the signal."""
    say(f"[{name}] stopped after step {len(trainer.history)} of {total}; checkpoint written to {out}. "
        f"Run the same command with --resume to continue.", flush=True)
    raise SystemExit(128 + signum)


@contextmanager
def staged_run(name: str, out: Path, stages: Sequence[str] = ()):
    """The run protocol of a multi-stage command, once ``prepare_output`` has claimed ``out``: say which of
    ``stages`` are stored and read back, yield the stop request of SIGINT/SIGTERM (``graceful_stop``), and turn the
    ``StopRun`` that a stage raises once it is stored into one message and the exit status 128 + the signal."""
    done = [stage for stage in stages if StageStore(out).done(stage)]
    if done:
        print(f"[{name}] resuming {out}: stored stages {', '.join(done)} are read back", flush=True)
    with graceful_stop() as stop:
        try:
            yield stop
        except StopRun as err:
            print(f"[{name}] stopped after {err.stage}; the finished stages are in {out}. Run the same command with "
                  "--resume to continue.", flush=True)
            raise SystemExit(128 + err.signum) from None
