"""Reaching the Hugging Face Hub: fail in seconds, with the fix, where it cannot be reached.

Without a connection, transformers and datasets retry with back-off before they give up (46.6 s for one tokenizer
by Hub id on the course machine, 2026-12-02; the probe below answered in under 0.1 s) and then raise errors that do
not say what to do. ``hub_kwargs`` probes the Hub once per
process (a TCP connection, 3 s at most) before anything is loaded by Hub id:

- the Hub answers, or ``HF_HUB_OFFLINE=1`` is set (the user chose the local cache): load as usual;
- it does not answer and the model is in the local Hugging Face cache: load it with ``local_files_only=True``;
- it does not answer and nothing is cached: ``HubUnreachable`` at once, naming the fix.
"""
from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


class HubUnreachable(ConnectionError):
    """A Hub id was asked for, and the Hub cannot be reached from this machine."""


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """Whether a TCP connection to the Hub (``HF_ENDPOINT`` or huggingface.co, port 443) opens within 3 s."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def offline_by_choice() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def model_is_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


MODEL_FIX = ("offline, use 'smollm2-135m-instruct' or a local directory; on a lab machine, check the network, or set "
             "HF_HUB_OFFLINE=1 to load a copy already in the cache.")


def hub_kwargs(kind: str, repo_id: str, fix: str = MODEL_FIX) -> dict:
    """Extra keyword arguments for ``from_pretrained(repo_id)``; raises ``HubUnreachable`` if it cannot work.

    A local directory needs nothing (no probe)."""
    if Path(repo_id).expanduser().is_dir() or offline_by_choice() or hub_reachable():
        return {}
    if kind != "data set" and model_is_cached(repo_id):
        return {"local_files_only": True}
    raise HubUnreachable(f"the {kind} {repo_id!r} comes from the Hugging Face Hub, which cannot be reached from "
                         f"this machine, and it is not in the local cache. Fix: {fix}")
