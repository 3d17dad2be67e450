"""Small shared helpers: seeding, device and dtype choice, the user cache, timing and memory.

Everything here is used by every method module; nothing here knows about a particular method.
"""
from __future__ import annotations

import math
import os
import random
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .validate import check_count, check_threads, count, threads_arg  # noqa: F401  (re-exported)

CACHE_ENV = "ALIGNLIB_CACHE"


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices). Same seed, same machine -> same numbers."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device(device: str | torch.device | None = None) -> torch.device:
    """The device to use: the one asked for, else cuda > mps > cpu."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere (bf16 matmuls on CPUs without native support are ~100x slower)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def cache_dir() -> Path:
    """The user cache for converted weights: $ALIGNLIB_CACHE, else $XDG_CACHE_HOME/alignlib, else ~/.cache/alignlib."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "alignlib"


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak memory in MB: CUDA's allocator peak on a GPU, else the process's peak resident set size."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


@contextmanager
def quiet_loading():
    """Silence what loading a model prints but the reader cannot act on: transformers' per-weight progress
    bars and load reports (a reward model's new scalar head is *meant* to be missing from the checkpoint), and
    peft's call of a deprecated transformers property. Errors still raise."""
    import warnings

    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextmanager
def timer(metrics: dict, key: str):
    """Add the elapsed wall-clock seconds of the block to ``metrics[key]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        metrics[key] = metrics.get(key, 0.0) + time.perf_counter() - start


def check_finite(value: torch.Tensor, name: str) -> None:
    """Stop before a non-finite loss corrupts the weights."""
    if not torch.isfinite(value).all():
        raise FloatingPointError(
            f"{name} is not finite ({value.detach().flatten()[:4].tolist()}). This step did not update the weights, "
            "but earlier steps may have driven them to extreme values: resume from the run directory's last "
            "checkpoint, or start again, with a lower learning rate, a checked reward scale or gradient clipping."
        )


def guarded_step(optimizer, max_grad_norm: float = 0.0, name: str = "training", clip=None) -> float:
    """Clip, check and take one optimizer step; stop with a true message if anything is not finite.

    Checks the gradient norm before the step (a non-finite one: nothing is updated) and every updated parameter
    after it (a non-finite weight: the step already happened, so the run's last checkpoint is the good copy).
    ``clip(params, max_norm)`` replaces ``torch.nn.utils.clip_grad_norm_`` (``accelerator.clip_grad_norm_`` for
    sharded models). Returns the gradient norm before clipping.
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not params:
        return 0.0
    if max_grad_norm:
        norm = torch.as_tensor((clip or torch.nn.utils.clip_grad_norm_)(params, max_grad_norm))
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    if not torch.isfinite(norm):
        raise FloatingPointError(f"{name}: the gradient is not finite (norm {norm.item()}); the weights were not "
                                 "updated. Lower the learning rate or check the reward scale.")
    optimizer.step()
    with torch.no_grad():
        bad = next((p for p in params if not torch.isfinite(p).all()), None)
    if bad is not None:
        raise FloatingPointError(f"{name}: a weight became non-finite in this optimizer step (shape "
                                 f"{tuple(bad.shape)}). The weights in memory are lost; the run directory's last "
                                 "checkpoint was written before this step. Lower the learning rate and --resume, "
                                 "or start again.")
    return float(norm)


def sha256_file(path) -> str:
    """The SHA-256 of a file, hex, read in 1 MB blocks (checkpoints' and the model cache's manifests)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def set_threads(n) -> int:
    """``torch.set_num_threads(n)`` after checking ``n``: an integer >= 1 (the error says how many cores this
    machine has; torch's own error for 0 or -1 does not). Returns ``n``."""
    torch.set_num_threads(check_threads(n))
    return n


def check_top(top_k, top_p) -> None:
    """Sampling filters: ``top_k`` an integer >= 0 (0: off, the course's convention; None would mean transformers'
    default of 50) and ``top_p`` a number in (0, 1] (1.0: off). NaN, 0 or 2 would silently sample from nothing or
    from everything."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 keeps every token), got {top_k!r}.")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1] (1.0 keeps every token), got {top_p!r}.")


def check_sampling_fields(config) -> None:
    """Shared up-front checks of a trainer config: ``max_new_tokens`` an integer >= 1, ``temperature`` finite and
    > 0, ``lr`` finite and >= 0, ``top_k``/``top_p`` as ``check_top`` says (each only if the config has the field)."""
    tokens = getattr(config, "max_new_tokens", 1)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {tokens!r}.")
    temperature = getattr(config, "temperature", 1.0)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}; 1.0 samples the policy.")
    lr = getattr(config, "lr", 0.0)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}.")
    check_top(getattr(config, "top_k", 0), getattr(config, "top_p", 1.0))


class PresetMixin:
    """``Config.preset(name, **overrides)`` for a config dataclass with a ``PRESETS`` dict of field values."""

    PRESETS: dict = {}

    @classmethod
    def preset(cls, name: str, **overrides):
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(cls.PRESETS)}.")
        return cls(**{**cls.PRESETS[name], **overrides})
