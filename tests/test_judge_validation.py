"""Judges validated against oracles: the accounting checked with fake judges whose answers are known, the oracle
sets checked against their oracles, and the judge-check command end to end on the tiny model."""
import json
import re

import pytest
import torch

from alignlib.judge_validation import (CLOSING_QUESTION, LENGTH_RATIO, TONE_MARGIN, few_shot_examples, format_table,
                                       oracle_pair_sets, validate_judge)

pytestmark = pytest.mark.unit


class PrefersLonger:
    """Says the longer reply is better, whatever the principle; 1/2 for equal lengths. Its first order names the
    letter A always (position bias), its swapped order the content."""

    def prefer_first(self, questions, first, second, principles):
        n1 = torch.tensor([len(a.split()) for a in first], dtype=torch.float32)
        n2 = torch.tensor([len(b.split()) for b in second], dtype=torch.float32)
        p = 0.5 + 0.5 * torch.sign(n1 - n2)
        return {"p": p, "p_first_order": torch.full_like(p, 0.9), "p_swapped": p}


def _pairs(n, chosen_longer):
    short, long_ = "a b", "a b c d e f"
    return [{"prompt": f"q{i}", "chosen": long_ if chosen_longer else short,
             "rejected": short if chosen_longer else long_, "principle": "p"} for i in range(n)]


def test_a_judge_that_prefers_the_longer_reply_scores_one_and_zero():
    res = validate_judge({"longer": PrefersLonger()}, {"longer": _pairs(6, True), "shorter": _pairs(6, False)},
                         n_boot=200)
    long_, short = res["longer"]["longer"], res["shorter"]["longer"]
    assert long_["accuracy"] == 1.0 and long_["low"] == 1.0 and long_["n"] == 6 and long_["decisiveness"] == 0.5
    assert short["accuracy"] == 0.0 and short["high"] == 0.0
    assert long_["chosen_longer"] == 1.0 and short["chosen_longer"] == 0.0
    # one order read alone: always "A", and the better reply is first in every other pair -> 1/2
    assert long_["first_order"]["accuracy"] == 0.5 and long_["mean_p_A"] == pytest.approx(0.9)
    assert long_["swapped"]["accuracy"] == 1.0
    table = format_table(res)
    assert re.search(r"longer\s+longer\s+6\s+1\.00 \[1\.00, 1\.00\].*\*", table)


def test_a_tie_counts_half_and_a_judge_per_set_is_used():
    class Half:
        def prefer_first(self, q, a, b, p):
            return {"p": torch.full((len(q),), 0.5)}

    res = validate_judge({"half": {"s": Half()}}, {"s": _pairs(4, True)}, n_boot=100)
    assert res["s"]["half"]["accuracy"] == 0.5 and res["s"]["half"]["decisiveness"] == 0.0
    assert "first_order" not in res["s"]["half"]


def test_bad_input_is_refused_naming_the_argument():
    judge = {"j": PrefersLonger()}
    with pytest.raises(ValueError, match="judges is empty"):
        validate_judge({}, {"s": _pairs(2, True)})
    with pytest.raises(ValueError, match="pair_sets is empty"):
        validate_judge(judge, {})
    with pytest.raises(ValueError, match=r"pair_sets\['s'\] is empty"):
        validate_judge(judge, {"s": []})
    unlabelled = [{"prompt": "q", "first": "a", "second": "b"}]
    with pytest.raises(ValueError, match=r"pair_sets\['s'\]\[0\] has no \['chosen', 'rejected'\]"):
        validate_judge(judge, {"s": unlabelled})
    with pytest.raises(ValueError, match="no judge for the set 's'"):
        validate_judge({"j": {"other": PrefersLonger()}}, {"s": _pairs(2, True)})

    class ReadsStatements(PrefersLonger):
        principle_field = "statement"

    with pytest.raises(ValueError, match="lacks the field 'statement'"):
        validate_judge({"tf": ReadsStatements()}, {"s": _pairs(2, True)})


def test_oracle_sets_hold_their_oracle_and_the_few_shot_examples_are_disjoint():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    sets = oracle_pair_sets()
    assert {k: len(v) for k, v in sets.items()} == {"harmless-train": 28, "harmless-test": 14, "length": 33,
                                                    "tone": 22, "question": 30}
    words = lambda t: len(t.split())                                               # noqa: E731
    assert all(words(p["rejected"]) >= LENGTH_RATIO * words(p["chosen"]) for p in sets["length"])
    vader = SentimentIntensityAnalyzer().polarity_scores
    assert all(vader(p["chosen"])["compound"] - vader(p["rejected"])["compound"] >= TONE_MARGIN for p in sets["tone"])
    assert sum(words(p["chosen"]) > words(p["rejected"]) for p in sets["tone"]) == 11   # length balanced
    assert all(CLOSING_QUESTION.search(p["chosen"]) and not CLOSING_QUESTION.search(p["rejected"])
               for p in sets["question"])
    assert all(p["statement"] and p["principle"].startswith("Which") for v in sets.values() for p in v)
    validated = {p["prompt"] for v in sets.values() for p in v} | {p["chosen"] for v in sets.values() for p in v}
    for kind in ("harmless", "length", "tone", "question"):
        ex = few_shot_examples(kind, 3)
        assert len(ex) == 3 and [e["answer"] for e in ex] == ["A", "B", "A"]
        assert not {e["question"] for e in ex} & validated
        assert not {e["first"] for e in ex} & validated
    assert len(oracle_pair_sets(max_pairs=2)["length"]) == 2
    with pytest.raises(ValueError, match="kind"):
        few_shot_examples("rudeness")


def test_judge_check_command_on_the_tiny_model(tmp_path, capsys):
    from alignlib.commands.cli import main

    out = tmp_path / "judge.json"
    assert main(["judge-check", "--model", "tiny-random", "--pairs", "2", "--shots", "1", "--n-boot", "100",
                 "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["table"]) == 5 * 4 and {r["n"] for r in result["table"]} == {2}
    assert {r["format"] for r in result["table"]} == {"AB both orders", "AB one order", "AB few-shot", "True/False"}
    assert all(0 <= r["low"] <= r["accuracy"] <= r["high"] <= 1 for r in result["table"])
    assert result["true_false_words"] == ["True", "False"] and result["load_s"] >= 0
    assert set(result["seconds"]) == {"ab", "ab_few_shot", "true_false"}
    assert "harmless-test" in capsys.readouterr().out
