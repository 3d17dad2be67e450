"""Multiple-choice scoring by "true" probability and by choice log-likelihood."""
import pytest
import torch

from alignlib.multiple_choice import (LIKELIHOOD_HEADER, TRUE_HEADER, TRUE_QUERY, accuracy, likelihood_scores,
                                      true_scores)
from alignlib.prefix_cache import PrefixCache

pytestmark = pytest.mark.unit

QUESTION = "What colour is a clear daytime sky?"
CHOICES = ["Blue", "Green", "Bright purple with stripes"]


def test_true_scores_match_a_direct_reading(tiny):
    model, tok = tiny
    scores = true_scores(PrefixCache(model, tok, TRUE_HEADER), QUESTION, CHOICES)
    assert scores.shape == (3,) and ((scores > 0) & (scores < 1)).all()
    head = tok(TRUE_HEADER, add_special_tokens=False).input_ids + tok(
        TRUE_QUERY.format(question=QUESTION, choice=CHOICES[1]), add_special_tokens=False).input_ids

    def logprob(word):                         # a full recompute of log p(word | header, query)
        tail = tok(word, add_special_tokens=False).input_ids
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([head + tail])).logits[0].float(), -1)
        return sum(lp[len(head) - 1 + j, t].item() for j, t in enumerate(tail))

    want = torch.sigmoid(torch.tensor(logprob(" True") - logprob(" False"))).item()
    assert scores[1].item() == pytest.approx(want, abs=1e-4)


def test_likelihood_scores_and_length_normalisation(tiny):
    model, tok = tiny
    cache = PrefixCache(model, tok, LIKELIHOOD_HEADER)
    total = likelihood_scores(cache, QUESTION, CHOICES)
    per_token = likelihood_scores(cache, QUESTION, CHOICES, normalize=True)
    lengths = torch.tensor([len(tok(" " + c, add_special_tokens=False).input_ids) for c in CHOICES])
    torch.testing.assert_close(per_token, total / lengths)
    assert (total < 0).all() and total[2] < total[0]            # a longer choice has a smaller summed log-prob


def test_accuracy_and_bad_input(tiny):
    assert accuracy([torch.tensor([0.9, 0.1]), torch.tensor([0.2, 0.5, 0.5])], [0, 2]) == \
        {"accuracy": 0.5, "hits": [True, False]}                # a tie goes to the first choice
    with pytest.raises(ValueError, match="one row per question"):
        accuracy([torch.tensor([1.0, 0.0])], [0, 1])
    with pytest.raises(ValueError, match="outside"):
        accuracy([torch.tensor([1.0, 0.0])], [2])
    model, tok = tiny
    with pytest.raises(ValueError, match="at least 2"):
        true_scores(PrefixCache(model, tok, TRUE_HEADER), QUESTION, ["Blue"])
