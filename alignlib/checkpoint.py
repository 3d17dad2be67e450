"""The run directory: config, metric history and checkpoints that survive Ctrl-C, SIGTERM and crashes.

Layout of ``<output>/`` (``alignlib.runs`` writes it for every method command)::

    history.json                  method, config, task, held-out evaluation before/after, history, status
    checkpoints/step-000004/      one complete checkpoint, taken after 4 steps (RAFT: stages):
        trainable.safetensors       the weights being trained (LoRA adapters and value head, or every weight)
        state.pt                    optimizer state and torch RNG states (tensors only: torch.load(weights_only=True))
        state.json                  step count, history, Python and NumPy RNG states, the adaptive KL coefficient
    checkpoints/latest            the name of the newest complete checkpoint
    adapter/                      the final LoRA adapter (safetensors), written at the end

Every file is written under a temporary name in its directory and renamed into place, and a checkpoint
directory is complete before ``latest`` names it, so a crash at any moment leaves the previous checkpoint
usable. Resuming loads the trainable weights, the optimizer, every RNG and the history, so a resumed run
continues exactly as the uninterrupted run would have (tests/test_checkpoint.py checks this for PPO, RRHF and
RAFT on the tiny model).

A trainer is checkpointable if it has ``optimizer``, ``rng`` (a ``random.Random``), ``history`` and, optionally,
``kl_ctl`` (an adaptive KL controller with a ``value``), ``scheduler`` (a learning-rate scheduler) and
``extra_state()`` / ``load_extra_state(state)`` (anything else, as JSON); ``trained_module(trainer)`` names the
module whose trainable parameters are saved.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_EVERY = 5   # default steps between checkpoints of the method commands (``--checkpoint-every``)
CHECKPOINTS = "checkpoints"
LATEST = "latest"
RECORD = "history.json"


class RunDirectoryError(RuntimeError):
    """The output directory cannot be used as asked (exists, nothing to resume, not writable)."""


# ---------------------------------------------------------------- the output directory

def prepare_output(output: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Check ``output`` before any training: refuse to replace a run silently, and prove it is writable.

    - a directory holding an earlier run is refused unless ``resume`` (continue it) or ``overwrite`` (delete it);
    - ``resume`` needs a complete checkpoint there;
    - the directory is created and a probe file written and removed, so a bad path fails now, not after training.
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run, or start it again.")
    out = Path(output)
    earlier = out.is_dir() and any(out.iterdir())
    if resume:
        if latest_checkpoint(out) is None:
            raise RunDirectoryError(f"--resume: {out} holds no complete checkpoint "
                                    f"({out / CHECKPOINTS / LATEST} is missing); start the run without --resume.")
    elif earlier:
        if not overwrite:
            raise RunDirectoryError(f"{out} already holds a run; pass --resume to continue it, --overwrite to "
                                    f"delete it and start again, or choose another --output.")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RunDirectoryError(f"cannot write to the output directory {out}: {err}. Choose another --output.") from err
    return out


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_record(out: Path, record: dict) -> None:
    atomic_write(out / RECORD, json.dumps(record, indent=1, default=str))


def read_record(out: Path) -> dict | None:
    path = Path(out) / RECORD
    return json.loads(path.read_text()) if path.exists() else None


# ---------------------------------------------------------------- checkpoints

def trained_module(trainer) -> torch.nn.Module:
    """The module whose trainable parameters a checkpoint holds: PPO's policy with value head, a reward model, or
    the policy."""
    if hasattr(trainer, "reward_model"):
        return trainer.reward_model
    if hasattr(trainer, "accelerator") and hasattr(trainer, "model"):
        return trainer.accelerator.unwrap_model(trainer.model)
    return trainer.policy


def _trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    pointer = Path(out) / CHECKPOINTS / LATEST
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "state.json").exists() else None


def save_checkpoint(out: str | Path, trainer) -> Path:
    """Write a complete checkpoint of ``trainer`` after ``len(trainer.history)`` steps; keep only the newest."""
    root = Path(out) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{len(trainer.history):06d}"
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.detach().cpu().contiguous() for k, v in _trainable(trained_module(trainer)).items()}
    save_file(weights, str(tmp / "trainable.safetensors"))
    scheduler = getattr(trainer, "scheduler", None)
    torch.save({"optimizer": trainer.optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, tmp / "state.pt")
    kl_ctl = getattr(trainer, "kl_ctl", None)
    state = {"step": len(trainer.history), "history": trainer.history,
             "trainer_rng": _jsonable(trainer.rng.getstate()), "python_rng": _jsonable(random.getstate()),
             "numpy_rng": _jsonable(np.random.get_state()), "kl_coef": kl_ctl.value if kl_ctl else None,
             "extra": trainer.extra_state() if hasattr(trainer, "extra_state") else None}
    (tmp / "state.json").write_text(json.dumps(state, default=str))
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write(root / LATEST, name)
    for old in root.iterdir():  # older checkpoints and temporary leftovers of killed writers
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(out: str | Path, trainer) -> int:
    """Restore the newest checkpoint of ``out`` into a freshly built ``trainer``; return the step it was taken at."""
    path = latest_checkpoint(out)
    if path is None:
        raise RunDirectoryError(f"{out} holds no complete checkpoint to resume from.")
    params = _trainable(trained_module(trainer))
    saved = load_file(str(path / "trainable.safetensors"))
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise RunDirectoryError(f"the checkpoint {path} does not fit this model (missing {missing[:3]}, unexpected "
                                f"{extra[:3]}); resume with the same --model and preset, or start with --overwrite.")
    with torch.no_grad():
        for name, p in params.items():
            if saved[name].shape != p.shape:
                raise RunDirectoryError(f"the checkpoint's {name} has shape {tuple(saved[name].shape)}, the model's "
                                        f"{tuple(p.shape)}; resume with the same --model and preset.")
            p.copy_(saved[name])
    blob = torch.load(path / "state.pt", weights_only=True)
    trainer.optimizer.load_state_dict(blob["optimizer"])
    if blob.get("scheduler") is not None:
        trainer.scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    if blob["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    state = json.loads((path / "state.json").read_text())
    trainer.history[:] = state["history"]
    trainer.rng.setstate(_tupled(state["trainer_rng"]))
    random.setstate(_tupled(state["python_rng"]))
    kind, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if getattr(trainer, "kl_ctl", None) is not None and state["kl_coef"] is not None:
        trainer.kl_ctl.value = state["kl_coef"]
    if state.get("extra") is not None:
        trainer.load_extra_state(state["extra"])
    return state["step"]


def _jsonable(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (tuple, list)):
        return [_jsonable(x) for x in obj]
    return obj


def _tupled(obj):
    return tuple(_tupled(x) for x in obj) if isinstance(obj, list) else obj


# ---------------------------------------------------------------- stopping cleanly

class StopRequest:
    """Set by SIGINT or SIGTERM while ``graceful_stop`` is active; a second signal stops at once."""

    def __init__(self):
        self.signum: int | None = None


@contextmanager
def graceful_stop():
    """Turn the first SIGINT/SIGTERM into a request to stop after the current step (the caller checkpoints)."""
    request = StopRequest()
    previous = {}

    def handler(signum, frame):
        if request.signum is not None:   # the second signal: do not wait for the step to end
            signal.signal(signum, previous.get(signum) or signal.SIG_DFL)
            raise KeyboardInterrupt
        request.signum = signum
        print(f"\n[alignlib] {signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
              "(send it again to stop at once).", flush=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:               # not the main thread: signals cannot be caught here
            pass
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
