import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from alignlib.rewards import KeywordReward, LengthReward, RewardModelReward, SentimentReward, WeightedSum

pytestmark = pytest.mark.unit


def test_sentiment_sign_and_target():
    pos = SentimentReward()
    r = pos(["", ""], ["What a wonderful, delightful film!", "This was awful and boring."])
    assert r.shape == (2,) and r[0] > 0.5 and r[1] < -0.5
    neg = SentimentReward(target="negative")
    assert torch.allclose(neg(["", ""], ["great", "terrible"]), -pos(["", ""], ["great", "terrible"]))


def test_sentiment_can_include_prompt():
    r = SentimentReward(include_prompt=True)(["I hated it."], ["The end."])
    assert r.item() < 0


def test_length_and_keyword():
    assert LengthReward()(["", ""], ["one two three", ""]).tolist() == [3.0, 0.0]
    assert LengthReward(target=4)(["", ""], ["a b c d", "a b"]).tolist() == [0.0, -0.5]
    kw = KeywordReward(["great"])
    assert kw(["", ""], ["great great fun now", "nothing"]).tolist() == [0.5, 0.0]


def test_weighted_sum_combines_and_keeps_parts():
    ws = WeightedSum({"len": LengthReward(), "kw": KeywordReward(["yes"])}, [0.5, 2.0])
    out = ws(["", ""], ["yes no", "no no no no"])
    assert torch.allclose(out, torch.tensor([0.5 * 2 + 2 * 0.5, 0.5 * 4]))
    assert set(ws.last) == {"len", "kw"}
    with pytest.raises(ValueError, match="one weight each"):
        WeightedSum({"len": LengthReward()}, [1.0, 2.0])


def test_reward_model_interface_scores_with_a_scalar_head(tiny):
    _, tok = tiny
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    rm = RewardModelReward(LlamaForSequenceClassification(cfg), tok, chat=True)
    scores = rm(["q1", "q2", "q1"], ["a", "a much longer answer", "a"])
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert scores[0] == pytest.approx(scores[2].item(), abs=1e-5)  # same input, same score, padding ignored
    assert scores[0] != pytest.approx(scores[1].item(), abs=1e-6)


def test_mismatched_lengths_name_the_fix():
    with pytest.raises(ValueError, match="same length"):
        SentimentReward()(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="empty"):
        LengthReward()([], [])
    with pytest.raises(TypeError, match="lists of strings"):
        LengthReward()("a", "b")
