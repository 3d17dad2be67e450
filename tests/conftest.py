"""Shared fixtures. Unit tests use the tiny random model; tests marked ``model`` load the default model."""
import os

import pytest

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
