"""The run directory: config, metric history and checkpoints that survive Ctrl-C, SIGTERM, crashes and full disks.

Layout of ``<output>/`` (``alignlib.commands.run`` writes it for every method command)::

    .alignlib-run.json            the run's identity (method, model, task, reward, seed, processes, steps): what
                                  ``--resume`` must match and what ``--overwrite`` needs before it deletes anything
    .alignlib-run.lock            locked (flock) by the process writing the directory: a second writer is refused
    history.json                  method, config, task, held-out evaluation before/after, history, status
    checkpoints/step-000004/      one complete checkpoint, taken after 4 steps (RAFT: stages):
        trainable.safetensors       the weights being trained (LoRA adapters and value head, or every weight)
        state.pt                    optimizer state and torch RNG states (tensors only: torch.load(weights_only=True))
        state.json                  step count, history, Python and NumPy RNG states, the adaptive KL coefficient
        manifest.json               size and SHA-256 of each file above
    checkpoints/latest            the name of the newest complete checkpoint (the one before it is kept too)
    stages/<name>/                a finished stage of a multi-stage command (``StageStore``), with its manifest
    adapter/                      the final LoRA adapter (safetensors), written at the end

Every file is written under a temporary name in its directory and renamed into place, and a checkpoint
directory is complete before ``latest`` names it, so a crash at any moment leaves the previous checkpoint
usable. Loading verifies the manifest first; a damaged checkpoint is named and the one before it used. Resuming
loads the trainable weights, the optimizer, every RNG and the history, so a resumed run continues exactly as the
uninterrupted run would have (tests/test_checkpoint.py checks this for PPO, RRHF and RAFT on the tiny model).

``--overwrite`` deletes only a directory that carries the marker, never the current directory, a parent of it,
the repository, ``data/``, home or the root (``prepare_output``).

A trainer is checkpointable if it follows ``alignlib.training.protocol.Trainer``: ``history``,
``trainable_module()`` (whose trainable parameters are saved) and ``checkpoint_state()`` /
``load_checkpoint_state(state)`` (optimizer, scheduler, its RNG and any extra JSON state).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..utils import sha256_file
from . import CHECKPOINT_EVERY  # noqa: F401  (re-exported)

try:
    import fcntl
except ImportError:   # Windows: run directories are not locked
    fcntl = None

CHECKPOINTS = "checkpoints"
LATEST = "latest"
RECORD = "history.json"
MANIFEST = "manifest.json"      # size and SHA-256 of every file of a checkpoint or a finished stage
MARKER = ".alignlib-run.json"   # what says that the run protocol wrote a directory (``--overwrite`` needs it)
LOCK = ".alignlib-run.lock"     # held (flock) by the process writing the directory
STAGES = "stages"               # finished stages of the multi-stage commands (``StageStore``)
DEBOUNCE_S = 1.0                # a second signal sooner than this is the first one delivered twice
KEEP = 2                        # complete checkpoints kept: the newest, and the one before it as a fallback
_LOCKS: dict[str, object] = {}  # run directories this process holds, path -> open lock file


class RunDirectoryError(RuntimeError):
    """The output directory cannot be used as asked (exists, nothing to resume, not writable)."""


# ---------------------------------------------------------------- the output directory

def _protected() -> list[tuple[Path, str]]:
    """Directories no run may use or delete, and what each one is."""
    package = Path(__file__).resolve().parents[1]
    places = [(Path.cwd().resolve(), "the current directory"), (Path.home().resolve(), "your home directory"),
              (Path(Path.cwd().anchor).resolve(), "the file-system root"), (package, "the alignlib package"),
              (package.parent / "data", "the course data (data/)")]
    if (package.parent / "pyproject.toml").exists():
        places.append((package.parent, "the course repository"))
    return places


def _refuse_protected(out: Path) -> None:
    """Refuse an output that is, or contains, the current directory, the repository, data/, home or the root."""
    where = out.resolve()
    hits = [(where != place, place, what) for place, what in _protected() if where == place or where in place.parents]
    if hits:
        parent, place, what = min(hits, key=lambda hit: hit[0])    # the directory itself before one it contains
        raise RunDirectoryError(f"--output {str(out)!r} is {'a parent of ' if parent else ''}{what} ({place}); a run "
                                "needs a directory of its own, such as runs/<name>.")


def read_marker(out: str | Path) -> dict | None:
    """The run directory's identity (``.alignlib-run.json``), or None where the protocol did not write ``out``."""
    path = Path(out) / MARKER
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunDirectoryError(f"{path} is damaged ({err}); the run's identity is unknown, so it can be neither "
                                "resumed nor overwritten: delete the directory yourself or choose another --output.")


def _lock(out: Path) -> None:
    """Hold an exclusive lock on ``out`` for the rest of this process (a second writer is refused at once)."""
    key = str(out.resolve())
    if key in _LOCKS or fcntl is None:        # held already by this process; no fcntl (Windows): not locked
        return
    handle = open(out / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise RunDirectoryError(f"{out} is being written by another process (pid {owner}); wait for it to finish, "
                                "stop it, or choose another --output.") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    _LOCKS[key] = handle


def release(out: str | Path) -> None:
    """Give up this process's lock on ``out`` (it is released at exit anyway)."""
    handle = _LOCKS.pop(str(Path(out).resolve()), None)
    if handle is not None:
        handle.close()


def _compare(stored: dict, new: dict, done: int | None) -> dict:
    """The identity a resumed run continues with; refuse every field that differs, naming each one.

    ``None`` in ``new`` means "as stored". ``steps`` may grow (an explicit larger budget extends a finished run);
    it may not shrink below what the run was started with."""
    merged, wrong = dict(stored), []
    for key, value in new.items():
        if value is None or key not in stored:
            merged.setdefault(key, value)
            continue
        if key == "steps":
            if value < stored[key]:
                wrong.append(f"steps: {value} is fewer than the {stored[key]} the run was started with")
            merged[key] = value
        elif value != stored[key]:
            wrong.append(f"{key}: the run used {stored[key]!r}, this command asks for {value!r}")
    if wrong:
        raise RunDirectoryError("--resume refuses to continue a different run: " + "; ".join(wrong) +
                                ". Resume with the run's own settings, or start a new run in another --output.")
    if done is not None and "steps" in merged and done >= merged["steps"]:
        raise RunDirectoryError(f"--resume: the run already finished its {merged['steps']} steps; pass a larger "
                                "--steps to extend it, or start a new run in another --output.")
    return merged


def prepare_output(output: str | Path, resume: bool = False, overwrite: bool = False,
                   identity: dict | None = None, flag: str = "--output") -> Path:
    """Check ``output`` before any work; claim it (marker and lock) for this run.

    - ``output`` may not be, or contain, the current directory, the repository, ``data/``, home or the root;
    - a directory holding an earlier run is refused unless ``resume`` (continue it) or ``overwrite``, and
      ``overwrite`` deletes only a directory whose ``.alignlib-run.json`` marker says the run protocol wrote it;
    - the directory is locked while this process writes it: a second writer is refused at once;
    - ``resume`` needs a complete checkpoint (or finished stages) and the same ``identity`` (method, model, task,
      reward, seed, process count, ...: ``_compare``); ``steps`` may grow;
    - writing the marker proves the directory writable, so a bad path fails now, not after training.
    The marker records ``identity``; ``read_marker(out)["identity"]`` is what a resumed run continues with.
    ``flag`` is the command's name for the directory in messages (``--report`` for the tour).
    """
    try:
        return _prepare(output, resume, overwrite, identity)
    except RunDirectoryError as err:
        if flag == "--output":
            raise
        raise RunDirectoryError(str(err).replace("--output", flag)) from None


def _prepare(output, resume: bool, overwrite: bool, identity: dict | None) -> Path:
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run, or start it again.")
    if output is None or not str(output).strip():
        raise RunDirectoryError("--output is empty; name a directory of its own for the run, such as runs/ppo.")
    out = Path(output)
    _refuse_protected(out)
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"cannot write to the output directory {out}: it is a file. Choose another --output.")
    held = str(out.resolve()) in _LOCKS
    if out.is_dir() and (out / LOCK).exists():
        _lock(out)                                   # first: a directory another process writes is refused at once
    try:
        return _claim(out, resume, overwrite, dict(identity or {}))
    except BaseException:
        if not held:
            release(out)
        raise


def _claim(out: Path, resume: bool, overwrite: bool, identity: dict) -> Path:
    marker = read_marker(out) if out.is_dir() else None
    earlier = out.is_dir() and any(p.name != LOCK for p in out.iterdir())
    if resume:
        if marker is None:
            raise RunDirectoryError(f"--resume: {out} holds no run written by alignlib's run protocol "
                                    f"({MARKER} is missing); start the run without --resume.")
        if latest_checkpoint(out) is None and not (out / STAGES).is_dir():
            raise RunDirectoryError(f"--resume: {out} holds no complete checkpoint "
                                    f"({out / CHECKPOINTS / LATEST} is missing); start again with --overwrite.")
        if latest_checkpoint(out) is not None and "no good checkpoint" in _good_copy(out):
            raise RunDirectoryError(f"--resume: every checkpoint in {out / CHECKPOINTS} is damaged (checksums differ "
                                    "from their manifests); nothing can be resumed. Start again with --overwrite.")
        record = read_record(out) or {}
        done = len(record.get("history", [])) if record.get("status") == "finished" else None
        identity = _compare(marker.get("identity", {}), identity, done)
    elif earlier and not overwrite:
        raise RunDirectoryError(f"{out} already holds a run; pass --resume to continue it, --overwrite to "
                                f"delete it and start again, or choose another --output.")
    elif earlier and marker is None:
        raise RunDirectoryError(f"--overwrite refused: {out} was not written by alignlib's run protocol (it has "
                                f"no {MARKER}), so nothing was deleted. Delete it yourself if you mean to, or "
                                "choose another --output.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        _lock(out)                                   # before anything is deleted: a running writer is refused
        if earlier and not resume:
            for item in out.iterdir():               # everything but the lock this process holds
                if item.name != LOCK:
                    shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
        created = marker.get("created") if resume else time.time()
        atomic_write(out / MARKER, json.dumps({"written_by": "alignlib", "identity": identity, "created": created},
                                              indent=1, default=str))
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

def _trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def _complete(root: Path) -> list[Path]:
    """The checkpoint directories of ``root`` that finished writing, newest first."""
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-") and (d / "state.json").exists()]
    return sorted(found, key=lambda d: d.name, reverse=True)


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None (its files are verified when it is loaded)."""
    pointer = Path(out) / CHECKPOINTS / LATEST
    if pointer.exists():
        path = pointer.parent / pointer.read_text().strip()
        if (path / "state.json").exists():
            return path
    found = _complete(Path(out) / CHECKPOINTS)
    return found[0] if found else None


def write_manifest(folder: Path) -> None:
    """Record the size and SHA-256 of every file under ``folder`` in ``folder/manifest.json``."""
    files = {str(f.relative_to(folder)): {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
             for f in sorted(folder.rglob("*")) if f.is_file()}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify_checkpoint(path: Path) -> None:
    """Raise ``RunDirectoryError`` naming the first file of checkpoint ``path`` that is missing, truncated or
    changed since it was written (``manifest.json`` holds each file's size and SHA-256)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise RunDirectoryError(f"{path / MANIFEST} is missing or damaged ({err})") from None
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.exists():
            raise RunDirectoryError(f"{file} is missing")
        if file.stat().st_size != expected["bytes"] or sha256_file(file) != expected["sha256"]:
            raise RunDirectoryError(f"{file} is damaged (its size or SHA-256 differs from {path / MANIFEST})")


def save_checkpoint(out: str | Path, trainer) -> Path:
    """Write a complete, checksummed checkpoint of ``trainer`` after ``len(trainer.history)`` steps.

    Refuses non-finite weights (the previous checkpoint stays the good one). Keeps the newest ``KEEP`` checkpoints,
    so a damaged newest one falls back to the one before. A full disk or an unwritable directory gives one
    ``RunDirectoryError`` naming the file, and leaves the earlier checkpoints as they were."""
    root = Path(out) / CHECKPOINTS
    name = f"step-{len(trainer.history):06d}"
    tmp = root / f".{name}.tmp-{os.getpid()}"
    weights = {k: v.detach().cpu().contiguous() for k, v in _trainable(trainer.trainable_module()).items()}
    bad = next((k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise FloatingPointError(f"not writing a checkpoint after step {len(trainer.history)}: the weight {bad} is "
                                 f"not finite. {_good_copy(out)}")
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(weights, str(tmp / "trainable.safetensors"))
        own = trainer.checkpoint_state()                   # alignlib.training.protocol.Trainer
        torch.save({"optimizer": own["optimizer"], "scheduler": own["scheduler"], "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   tmp / "state.pt")
        state = {"step": len(trainer.history), "history": trainer.history, "trainer_rng": _jsonable(own["rng"]),
                 "python_rng": _jsonable(random.getstate()), "numpy_rng": _jsonable(np.random.get_state()),
                 "extra": own["extra"]}
        (tmp / "state.json").write_text(json.dumps(state, default=str))
        write_manifest(tmp)
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write(root / LATEST, name)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunDirectoryError(f"could not write the checkpoint {root / name}: {err}. {_good_copy(out)} Free some "
                                "space or make the directory writable, "
                                "then run the same command with --resume.") from err
    keep = _complete(root)[:KEEP]
    for old in root.iterdir():  # checkpoints beyond the newest KEEP, and temporary leftovers of killed writers
        if old.is_dir() and old not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _good_copy(out: str | Path) -> str:
    """A sentence naming the newest checkpoint of ``out`` whose files verify, for error messages."""
    for path in _complete(Path(out) / CHECKPOINTS):
        try:
            verify_checkpoint(path)
        except RunDirectoryError:
            continue
        return f"The last good checkpoint is {path}: --resume continues from it."
    return "The run has no good checkpoint to resume from."


def load_checkpoint(out: str | Path, trainer, say=print) -> int:
    """Restore the newest intact checkpoint of ``out`` into a freshly built ``trainer``; return its step.

    Every checkpoint is verified against its manifest before anything is loaded; a damaged one is named and the one
    before it is used instead."""
    candidates = _complete(Path(out) / CHECKPOINTS)
    if not candidates:
        raise RunDirectoryError(f"{out} holds no complete checkpoint to resume from; start again with --overwrite.")
    damaged = []
    for path in candidates:
        try:
            verify_checkpoint(path)
        except RunDirectoryError as err:
            damaged.append(str(err))
            say(f"[alignlib] skipping a damaged checkpoint: {err}", flush=True)
            continue
        return _restore(path, trainer)
    raise RunDirectoryError(f"every checkpoint of {out} is damaged ({'; '.join(damaged)}); nothing can be resumed. "
                            "Start again with --overwrite.")


def _restore(path: Path, trainer) -> int:
    params = _trainable(trainer.trainable_module())
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
    torch.set_rng_state(blob["torch_rng"])
    if blob["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    state = json.loads((path / "state.json").read_text())
    trainer.history[:] = state["history"]
    trainer.load_checkpoint_state({"optimizer": blob["optimizer"], "scheduler": blob["scheduler"],
                                   "rng": _tupled(state["trainer_rng"]), "extra": state["extra"]})
    set_host_rng(state["python_rng"], state["numpy_rng"])
    return state["step"]


def host_rng() -> dict:
    """Python's, NumPy's and torch's global RNG states, as JSON (torch's as a list of bytes)."""
    return {"python": _jsonable(random.getstate()), "numpy": _jsonable(np.random.get_state()),
            "torch": torch.get_rng_state().tolist()}


def set_host_rng(python_state, numpy_state, torch_state=None) -> None:
    random.setstate(_tupled(python_state))
    kind, keys, pos, has_gauss, cached = numpy_state
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if torch_state is not None:
        torch.set_rng_state(torch.tensor(torch_state, dtype=torch.uint8))


def _jsonable(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (tuple, list)):
        return [_jsonable(x) for x in obj]
    return obj


def _tupled(obj):
    return tuple(_tupled(x) for x in obj) if isinstance(obj, list) else obj


# ---------------------------------------------------------------- finished stages of multi-stage commands

class StageStore:
    """The finished stages of a command that is not a step loop (soups' trainings, CAI's and SELF-ALIGN's stages,
    the tour's sections), kept in ``<output>/stages/<name>/`` so that an interrupted command resumes after the last
    finished stage and ends as the uninterrupted command would.

    A stage is written into a temporary directory (``with store.stage(name) as folder:``: put its files there,
    adapters included), then its result (JSON), the global RNG states at its end and a manifest of checksums, and
    only then renamed into place: a stage directory is finished or absent. ``load(name)`` verifies the files,
    restores the RNG states (the next stage draws what it would have drawn) and returns the result."""

    def __init__(self, out: str | Path):
        self.root = Path(out) / STAGES
        self.root.mkdir(parents=True, exist_ok=True)   # an empty store: --resume is valid before a stage finishes

    def done(self, name: str) -> bool:
        return (self.root / name / MANIFEST).exists()

    def path(self, name: str) -> Path:
        """The folder of a finished stage (its adapters and files)."""
        return self.root / name

    @contextmanager
    def stage(self, name: str, result_of=lambda: None, stop=None):
        """Collect a stage's files in a temporary folder; on success write ``result_of()``, the RNG states and the
        manifest, and rename the folder into place (a failure leaves no stage behind). With ``stop``
        (``graceful_stop()``), a SIGINT/SIGTERM during the stage raises ``StopRun`` once it is stored."""
        tmp = self.root / f".{name}.tmp-{os.getpid()}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as err:
            raise RunDirectoryError(f"cannot write the stage {name} into {self.root}: {err}. Free some space or make "
                                    "the directory writable, then run the same command with --resume.") from err
        try:
            yield tmp
            self._finish(tmp, name, result_of())
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if stop is not None and stop.signum:
            raise StopRun(stop.signum, name)

    def save(self, name: str, result) -> None:
        """Record a stage whose whole result is JSON."""
        with self.stage(name, lambda: result):
            pass

    def _finish(self, tmp: Path, name: str, result) -> None:
        try:
            (tmp / "result.json").write_text(json.dumps(result, default=str))
            (tmp / "rng.json").write_text(json.dumps(host_rng()))
            write_manifest(tmp)
            final = self.root / name
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except OSError as err:
            raise RunDirectoryError(f"cannot write the stage {name} into {self.root}: {err}. Free some space or make "
                                    "the directory writable, then run the same command with --resume.") from err

    def load(self, name: str):
        """The result of a finished stage; its files are verified and the RNG states restored to its end."""
        path = self.root / name
        try:
            verify_checkpoint(path)
        except RunDirectoryError as err:
            raise RunDirectoryError(f"the finished stage {name} is damaged: {err}. Delete {path} to redo that stage "
                                    "with --resume, or start again with --overwrite.") from None
        rng = json.loads((path / "rng.json").read_text())
        set_host_rng(rng["python"], rng["numpy"], rng["torch"])
        return json.loads((path / "result.json").read_text())

    def run(self, name: str, compute, stop=None):
        """``compute()``'s JSON result, from the store when the stage finished before; a stop request (SIGINT or
        SIGTERM during the stage) ends the command after the stage is stored."""
        if self.done(name):
            return self.load(name)
        result = compute()
        with self.stage(name, lambda: result, stop):
            pass
        return result


class StopRun(Exception):
    """A multi-stage command was asked to stop (SIGINT/SIGTERM) and stored its last finished stage."""

    def __init__(self, signum: int, stage: str):
        super().__init__(f"stopped after the stage {stage}; run the same command with --resume to continue.")
        self.signum, self.stage = signum, stage


# ---------------------------------------------------------------- result files beside a run directory

def check_json_path(path: str | Path) -> None:
    """Fail now, not after the run, where ``--json`` cannot be written."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirectoryError(f"cannot write --json {path}: {err}. Choose another --json.") from None
    if target.is_dir() or not os.access(target.parent, os.W_OK):
        raise RunDirectoryError(f"cannot write --json {path}: it is a directory or its directory is not writable. "
                                "Choose another --json.")


def prepare_results(path: Path, resume: bool, overwrite: bool, identity: dict, flag: str = "--output"):
    """Check the JSON file ``path`` before any work and claim the run directory beside it, ``<path stem>.runs/``
    (``prepare_output``: refused if it holds an earlier run unless ``resume`` or ``overwrite``; ``resume`` needs
    the same ``identity``). Its ``StageStore`` keeps each finished run, so that ``resume`` reuses them. An existing
    ``path`` is refused unless ``resume`` or ``overwrite``."""
    path = Path(path)
    runs = path.with_name(path.stem + ".runs")
    if path.is_dir() or path == runs:
        raise RunDirectoryError(f"{flag} {path} is a directory or has no file suffix; name a JSON file.")
    if path.exists() and not (resume or overwrite):
        raise RunDirectoryError(f"{path} already exists; pass --overwrite to replace it, --resume to continue the "
                                f"run whose finished parts are in {runs}, or choose another {flag}.")
    store = StageStore(prepare_output(runs, resume=resume, overwrite=overwrite, identity=identity, flag=flag))
    return store


# ---------------------------------------------------------------- stopping cleanly

class StopRequest:
    """Set by SIGINT or SIGTERM while ``graceful_stop`` is active; a second signal stops at once."""

    def __init__(self):
        self.signum: int | None = None
        self.at = 0.0


@contextmanager
def graceful_stop():
    """Turn the first SIGINT/SIGTERM into a request to stop after the current step (the caller checkpoints)."""
    request = StopRequest()
    previous = {}

    def handler(signum, frame):
        if request.signum is not None and time.monotonic() - request.at < DEBOUNCE_S:
            return                       # the same Ctrl-C twice (terminal and ``accelerate launch`` both send it)
        if request.signum is not None:   # the second signal: do not wait for the step to end
            signal.signal(signum, previous.get(signum) or signal.SIG_DFL)
            raise KeyboardInterrupt
        request.signum, request.at = signum, time.monotonic()
        print(f"\n[alignlib] {signal.Signals(signum).name}: finishing the current step, then saving what is "
              "finished (send it again to stop at once).", flush=True)

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


def wait_workers(procs: list, stop) -> None:
    """Wait until every worker process has exited. On a stop request (``graceful_stop``) or a failed worker,
    terminate the others and wait for them; an exception here (a second Ctrl-C) kills them before it goes on."""
    try:
        while None in [p.poll() for p in procs]:               # polls every one
            if stop.signum or any(p.returncode not in (None, 0) for p in procs):
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                for p in procs:
                    p.wait()
                return
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
