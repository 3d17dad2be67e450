"""Shared fixtures. Unit tests use the tiny random model; tests marked ``model`` load the default model."""
import copy
import os

import pytest
import torch

# One intra-op thread: the tiny model's matmuls are too small to split, and on a shared 2-core machine two
# threads per process spin against other jobs (measured 3x slower for MiniLM, 30x for the tiny model).
torch.set_num_threads(1)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# after the environment above: huggingface_hub reads HF_HUB_OFFLINE when it is first imported
from alignlib.models import load_model, with_lora  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """The tiny random model and its tokenizer, shared by the session: for tests that do not change the model."""
    model, tokenizer = load_model("tiny-random", device="cpu")
    return model, tokenizer


@pytest.fixture(scope="session")
def smol():
    model, tokenizer = load_model("smollm2-135m-instruct", device="cpu")
    return model, tokenizer


@pytest.fixture
def fresh_tiny(tiny):
    """A factory of fresh copies of the tiny model, for tests that train it or change its weights: ``fresh_tiny()``
    is a copy of the session model, ``fresh_tiny(lora=...)`` that copy with new LoRA adapters (``lora`` as in
    ``load_model``), each with the shared tokenizer. As in ``load_model``, the adapters are drawn from the global RNG
    when it is called, so a test that seeds first gets the same adapters as before."""
    model, tokenizer = tiny

    def make(lora=None):
        fresh = copy.deepcopy(model)
        return (fresh if lora is None or lora is False else with_lora(fresh, lora)), tokenizer

    return make


@pytest.fixture
def tiny_lora(fresh_tiny):
    """A fresh LoRA policy (``default_lora_config()``) on a copy of the tiny model, and the shared tokenizer."""
    return fresh_tiny(lora=True)
