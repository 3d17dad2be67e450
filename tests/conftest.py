"""Shared fixtures, and the test tiers. Unit tests use the tiny random model; tests marked ``model`` load the default
model.

Every test carries exactly one tier marker of TIERS (pyproject.toml says what each means); ``pytest -m unit`` is the
fast tier, and each unit or grading test has a time limit of UNIT_TIME_LIMIT_S seconds unless it sets its own
``@pytest.mark.timeout``."""
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

TIERS = ("unit", "grading", "model", "learning", "distributed", "pipeline")
UNIT_TIME_LIMIT_S = 60


@pytest.hookimpl(tryfirst=True)   # before -m deselects anything, so every collected test is checked
def pytest_collection_modifyitems(config, items):
    """Check that each test carries one tier marker, and give unit tests their time limit."""
    wrong = []
    for item in items:
        path = getattr(item, "path", None)
        if path is not None and path.suffix == ".ipynb":   # notebook cells, collected by nbval: exempt
            continue
        tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})
        if len(tiers) != 1:
            wrong.append(f"  {item.nodeid}: {', '.join(tiers) or 'no tier marker'}")
        elif tiers[0] in ("unit", "grading") and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(UNIT_TIME_LIMIT_S))
    if wrong:
        raise pytest.UsageError(f"Each test needs exactly one tier marker of {', '.join(TIERS)} (module-level "
                                f"`pytestmark = pytest.mark.unit` or a decorator); {len(wrong)} test(s) do not:\n"
                                + "\n".join(wrong))


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
