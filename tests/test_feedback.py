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


# ---------------------------------------------------------------- labelled few-shot examples

EXAMPLES = [{"question": "Which {brace} stays?", "principle": "Which response is shorter?", "first": "a {b} c",
             "second": "one two three four", "answer": "A"},
            {"question": "q2", "principle": "Which response is shorter?", "first": "x y z w", "second": "v",
             "answer": "B"}]


def test_few_shot_template_prefixes_answered_examples_and_escapes_braces():
    from alignlib.feedback import COMPARISON, few_shot_template

    template = few_shot_template(EXAMPLES)
    filled = template.format(question="Q?", principle="P?", first="F", second="S")   # braces did not break format
    assert filled.count("The answer is: (") == 3 and filled.endswith("(A) F\n(B) S\nThe answer is: (")
    assert "Which {brace} stays?" in filled and "(A) a {b} c" in filled               # examples' braces kept literal
    first, second, _ = filled.split("Consider the following question")[1:]
    assert first.rstrip().endswith("The answer is: (A)") and second.rstrip().endswith("The answer is: (B)")
    assert few_shot_template([]) == COMPARISON
    with pytest.raises(ValueError, match="answer"):
        few_shot_template([{**EXAMPLES[0], "answer": "C"}])
    with pytest.raises(ValueError, match=r"examples\[0\] lacks \['second'\]"):
        few_shot_template([{k: v for k, v in EXAMPLES[0].items() if k != "second"}])


def test_course_feedback_examples_alternate_letters_and_avoid_the_evaluation_set():
    from alignlib.cai import eval_rows
    from alignlib.feedback import load_feedback_examples

    ex = load_feedback_examples(4)
    assert [e["answer"] for e in ex] == ["A", "B", "A", "B"] and len(load_feedback_examples()) == 18
    assert all(e["principle"].startswith("Which") for e in ex)
    assert not {e["question"] for e in load_feedback_examples()} & {r["prompt"] for r in eval_rows(None)}
    with pytest.raises(ValueError, match="split"):
        load_feedback_examples(split="dev")


def test_few_shot_judge_keeps_the_symmetry(tiny):
    from alignlib.feedback import few_shot_template

    model, tok = tiny
    judge = MultipleChoiceJudge(model, tok, template=few_shot_template(EXAMPLES), batch_size=3)
    ab, ba = judge.prefer_first(Q, A, B, "Which is shorter?"), judge.prefer_first(Q, B, A, "Which is shorter?")
    torch.testing.assert_close(ab["p"] + ba["p"], torch.ones(2))
    # the shared few-shot prefix encoded once gives the full recompute's readings
    prompts = [judge.template.format(question=q, principle="P", first=a, second=b) for q, a, b in zip(Q, A, B)] * 2
    calls, encode = [], judge.shared_prefix_logprobs
    judge.shared_prefix_logprobs = lambda rows, shared, device: calls.append(shared) or encode(rows, shared, device)
    cached = judge.option_logprobs(prompts)
    assert calls and calls[0] >= judge.shared_prefix_tokens                       # the prefix was encoded once
    full = MultipleChoiceJudge(model, tok, template=judge.template, shared_prefix_tokens=0).option_logprobs(prompts)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(cached[0], cached[1])


# ---------------------------------------------------------------- True/False

def test_true_false_judge_is_symmetric_and_reads_each_response_alone(tiny):
    from alignlib.feedback import TrueFalseJudge

    model, tok = tiny
    judge = TrueFalseJudge(model, tok, letters=("True", "False"), batch_size=3)
    ab, ba = judge.prefer_first(Q, A, B, "The reply is helpful."), judge.prefer_first(Q, B, A, "The reply is helpful.")
    torch.testing.assert_close(ab["p"] + ba["p"], torch.ones(2))                     # swapping gives 1 - p
    torch.testing.assert_close(ab["p_true_first"], ba["p_true_second"])              # each response read alone
    r1, r2 = ab["p_true_first"].double(), ab["p_true_second"].double()
    expected = torch.sigmoid(torch.logit(r1) - torch.logit(r2)).float()           # the docstring's formula
    torch.testing.assert_close(ab["p"], expected)
    assert not torch.allclose(ab["p"], torch.full((2,), 0.5), atol=1e-4)
    same = judge.prefer_first(Q, A, A, "The reply is helpful.")
    torch.testing.assert_close(same["p"], torch.full((2,), 0.5))
    with pytest.raises(ValueError, match="first tokens differ"):                 # the character tokenizer: ' T' vs ' F'
        TrueFalseJudge(model, tok)                                                # both start with the space
    with pytest.raises(ValueError, match="same length"):
        judge.prefer_first(Q, A, B[:1], "p")
