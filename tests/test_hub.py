"""Hub ids without a Hub: an immediate error with the fix, not a minute of retries and a traceback."""
from __future__ import annotations

import pytest

from alignlib import hub
from alignlib.data import load_hub_dataset
from alignlib.models import ModelCacheError, load_model
from alignlib.reward_model import load_reward_model

pytestmark = pytest.mark.unit


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))              # an empty Hugging Face cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "model_is_cached", lambda repo_id: False)


def test_a_model_id_fails_at_once_with_the_fix(no_hub):
    with pytest.raises((hub.HubUnreachable, ModelCacheError), match="cannot be reached.*HF_HUB_OFFLINE"):
        load_model("Qwen/Qwen2.5-0.5B-Instruct", device="cpu")


def test_a_reward_model_and_a_data_set_fail_the_same_way(no_hub):
    with pytest.raises(ModelCacheError, match="cannot be reached"):
        load_reward_model("OpenAssistant/reward-model-deberta-v3-large-v2", device="cpu")
    with pytest.raises(hub.HubUnreachable, match="pass path= to a local copy"):
        load_hub_dataset("Anthropic/hh-rlhf", "train")


def test_a_cached_model_loads_from_the_cache_and_offline_by_choice_is_respected(monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "model_is_cached", lambda repo_id: True)
    assert hub.hub_kwargs("model", "org/name", "fix") == {"local_files_only": True}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_kwargs("data set", "org/name", "fix") == {}
