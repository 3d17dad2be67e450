"""One metric vocabulary: every trainer's metrics are ``<namespace>/<name>`` with a documented namespace."""
import pytest

from alignlib.models import load_model
from alignlib.reward_model import RewardModelConfig, RewardModelTrainer, load_reward_model
from alignlib.rewards import LengthReward
from alignlib.sft import SFTConfig, train_sft
from alignlib.training.protocol import METRICS
from alignlib.training.registry import make_trainer

pytestmark = pytest.mark.unit

INDEX = {"step", "stage", "epoch"}          # which iteration a record is, not a measurement


def undocumented(records: list[dict]) -> set[str]:
    return {key for record in records for key in record
            if key not in INDEX and (key.count("/") != 1 or key.split("/")[0] not in METRICS)}


@pytest.mark.parametrize("method", ["ppo", "rrhf", "raft"])
def test_policy_trainers_speak_the_vocabulary(method):
    policy, tokenizer = load_model("tiny-random", lora=True)
    trainer = make_trainer(method, policy, tokenizer, LengthReward(), ["a b", "c d"] * 4, steps=1,
                           max_new_tokens=4)
    metrics = trainer.train_step()
    assert metrics["reward/mean"] == metrics["reward/mean"] and "time/step_s" in metrics and "kl/ref" in metrics
    assert not undocumented(trainer.history)


def test_sft_and_reward_model_speak_the_vocabulary():
    model, tokenizer = load_model("tiny-random", lora=True)
    history = train_sft(model, tokenizer, ["a", "b"], ["c", "d"], SFTConfig(epochs=1, batch_size=2))
    assert not undocumented(history) and "loss/sft" in history[0]
    rm, tok = load_reward_model("tiny-random")
    trainer = RewardModelTrainer(rm, tok, [{"prompt": "p", "chosen": "good", "rejected": "bad"}] * 4,
                                 RewardModelConfig(epochs=1, batch_size=2))
    trainer.train_step()
    assert not undocumented(trainer.records()) and "loss/total" in trainer.history[0]


def test_the_check_finds_a_stray_key():
    assert undocumented([{"step": 0, "reward/mean": 1.0, "loss": 2.0, "foo/bar": 1}]) == {"loss", "foo/bar"}
