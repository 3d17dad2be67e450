"""Shared fixtures. Unit tests use the tiny random model; tests marked ``model`` load the default model."""
import os

import pytest
import torch

# One intra-op thread: the tiny model's matmuls are too small to split, and on a shared 2-core machine two
# threads per process spin against other jobs (measured 3x slower for MiniLM, 30x for the tiny model).
torch.set_num_threads(1)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny():
    from alignlib.models import load_model

    model, tokenizer = load_model("tiny-random", device="cpu")
    return model, tokenizer


@pytest.fixture(scope="session")
def smol():
    from alignlib.models import load_model

    model, tokenizer = load_model("smollm2-135m-instruct", device="cpu")
    return model, tokenizer
