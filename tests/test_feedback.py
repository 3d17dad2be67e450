"""AI feedback read from option probabilities, in both orders."""
import pytest
import torch

from alignlib.feedback import MultipleChoiceJudge

pytestmark = pytest.mark.unit

Q = ["How do I boil an egg?", "Tell me a joke."]
A = ["Put it in boiling water for nine minutes.", "Why did the chicken cross the road?"]
B = ["I will not help with that.", "No."]


def test_option_probabilities_are_a_distribution_over_the_letters(tiny):
    model, tok = tiny
    judge = MultipleChoiceJudge(model, tok, batch_size=1)
    probs = judge.option_probs([judge.template.format(question=q, principle="Which is more helpful?", first=a,
                                                      second=b) for q, a, b in zip(Q, A, B)])
    assert probs.shape == (2, 2) and torch.allclose(probs.sum(-1), torch.ones(2))
    # batching and left padding do not change a prompt's reading
    one = judge.option_probs([judge.template.format(question=Q[1], principle="x", first=A[1], second=B[1])])
    two = MultipleChoiceJudge(model, tok, batch_size=2).option_probs(
        [judge.template.format(question=q, principle="x", first=a, second=b) for q, a, b in zip(Q, A, B)])
    torch.testing.assert_close(two[1], one[0], atol=1e-5, rtol=1e-4)


def test_both_orders_cancel_position_bias(tiny):
    model, tok = tiny
    judge = MultipleChoiceJudge(model, tok)
    same = judge.prefer_first(Q, A, A, "Which response is more helpful?")
    assert torch.allclose(same["p"], torch.full((2,), 0.5))            # identical responses: exactly 1/2
    assert not torch.allclose(same["p_first_order"], torch.full((2,), 0.5), atol=1e-3)   # one order alone is biased
    ab = judge.prefer_first(Q, A, B, "Which response is more helpful?")
    ba = judge.prefer_first(Q, B, A, "Which response is more helpful?")
    torch.testing.assert_close(ab["p"] + ba["p"], torch.ones(2))      # a soft label and its complement


def test_bad_input(tiny):
    model, tok = tiny
    judge = MultipleChoiceJudge(model, tok)
    with pytest.raises(ValueError, match="same length"):
        judge.prefer_first(Q, A, B[:1], "p")
    with pytest.raises(ValueError, match="one per question"):
        judge.prefer_first(Q, A, B, ["p"])
    with pytest.raises(ValueError, match="one distinct token"):
        MultipleChoiceJudge(model, tok, letters=("A", "A"))


def test_chain_of_thought_and_clamped_readings_keep_the_symmetry(tiny):
    model, tok = tiny
    judge = MultipleChoiceJudge(model, tok, cot_tokens=6, clamp=(0.4, 0.6))
    prompts = judge.reason([judge.template.format(question="q", principle="p", first="a", second="b")])
    assert "Let's think step by step:" in prompts[0] and prompts[0].endswith("So the answer is: (")
    ab = judge.prefer_first(Q, A, B, "Which response is more helpful?")
    ba = judge.prefer_first(Q, B, A, "Which response is more helpful?")
    torch.testing.assert_close(ab["p"] + ba["p"], torch.ones(2))
    assert ((ab["p_first_order"] >= 0.4) & (ab["p_first_order"] <= 0.6)).all()
