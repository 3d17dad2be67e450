"""RAFT: the selection keeps exactly the best 1/k, distinct-n, and the loop raises the reward."""
import string

import pytest
import torch

from alignlib.raft import RAFTConfig, RAFTTrainer, distinct_n, raft_select, select_global, select_local


@pytest.mark.unit
def test_select_local_keeps_the_best_of_each_prompt():
    rewards = torch.tensor([[0.1, 0.9, 0.3], [2.0, -1.0, 2.0], [0.0, 0.0, 0.5]])
    assert select_local(rewards).tolist() == [1, 3, 8]  # tie in row 1 goes to the earlier sample


@pytest.mark.unit
@pytest.mark.parametrize("n,k", [(12, 4), (13, 4), (8, 8), (30, 3)])
def test_select_global_keeps_exactly_the_top_one_over_k(n, k):
    gen = torch.Generator().manual_seed(n + k)
    rewards = torch.randn(n, generator=gen)
    kept = select_global(rewards, k)
    assert len(kept) == n // k and kept.tolist() == sorted(kept.tolist())
    threshold = rewards[kept].min()
    dropped = torch.ones(n, dtype=torch.bool)
    dropped[kept] = False
    assert (rewards[dropped] <= threshold).all()


@pytest.mark.unit
def test_select_global_ties_and_errors():
    assert select_global(torch.tensor([1.0, 1.0, 1.0, 0.0]), 2).tolist() == [0, 1]
    with pytest.raises(ValueError, match="top 1/k is empty"):
        select_global(torch.tensor([1.0, 2.0]), 3)
    with pytest.raises(ValueError, match="local"):
        raft_select(torch.zeros(2, 2), "best")


@pytest.mark.unit
def test_global_can_take_several_samples_of_one_prompt():
    rewards = torch.tensor([[5.0, 4.0], [0.0, 1.0]])
    assert raft_select(rewards, "local").tolist() == [0, 3]
    assert raft_select(rewards, "global").tolist() == [0, 1]


@pytest.mark.unit
def test_distinct_n():
    assert distinct_n(["a b c", "d e f"], 1) == 1.0
    assert distinct_n(["Good movie", "good movie"], 2) == pytest.approx(0.5)
    assert distinct_n(["one"], 2) == 0.0


def lowercase_share(prompts, responses):
    return torch.tensor([sum(c in string.ascii_lowercase for c in r) / max(len(r), 1) for r in responses])


@pytest.mark.learning
@pytest.mark.parametrize("selection", ["local", "global"])
def test_raft_raises_the_reward(selection, tiny_lora):
    model, tok = tiny_lora
    cfg = RAFTConfig(stages=25, batch_size=8, k=4, max_new_tokens=8, lr=1e-2, chat=False, sft_epochs=2,
                     selection=selection)
    trainer = RAFTTrainer(model, tok, lowercase_share, ["a", "b", "c", "hello", "xyz"] * 4, cfg)
    history = trainer.train(progress=False)
    rewards = [h["reward/mean"] for h in history]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.2, rewards
    assert all(h["kept/count"] == 8 for h in history) and len(trainer.kept) == 25 * 8
    # the kept set's mean is a Python float, the batch mean a float32 mean: compare up to rounding
    assert all(h["reward/kept_mean"] >= h["reward/mean"] - 1e-6 for h in history)
    assert history[-1]["kl/ref"] > 0
