"""Lecture 07's comparison: read from the stored runs, with intervals, and clear errors when a run is missing."""
import pytest

from alignlib import summary

pytestmark = pytest.mark.unit


def test_the_sentiment_rows_come_from_the_stored_runs_with_intervals():
    rows = {r["method"]: r for r in summary.sentiment_rows()}
    assert list(rows)[:4] == ["initial model", "PPO", "RRHF", "RAFT"] and len(rows) == 6
    assert [rows[m]["trainings"] for m in ("PPO", "RRHF", "RAFT")] == [3, 3, 3]
    for r in rows.values():
        c = r["reward"]
        assert c["low"] <= c["mean"] <= c["high"] and -1 <= c["mean"] <= 1
    assert rows["PPO"]["reward"]["mean"] > rows["initial model"]["reward"]["mean"]     # the stored runs learned
    soup = rows["RS soup 0.5 positive + 0.5 neutral"]
    assert soup["trainings"] == 2 and soup["neutral"]["mean"] > rows["RS expert (positive)"]["neutral"]["mean"]


def test_alignment_rows_and_supervision_counts():
    a = summary.alignment_rows()
    assert set(a["cai"]) == {"initial", "SL-CAI", "RL-CAI"} and a["cai"]["initial"]["harmless"]["n"] == 30
    assert set(a["self_align"]) == {"base", "principled", "engraved", "verbose"}
    assert all(v["mc_true"]["n"] == 24 and v["adherence"]["n"] == 16 for v in a["self_align"].values())
    sup = {s["method"]: s for s in summary.human_supervision()}
    assert sup["SELF-ALIGN"]["labels"] == 0 and "16 principles" in sup["SELF-ALIGN"]["written"]
    assert sup["PPO, learned reward model (lecture 01)"]["labels"] > 0


def test_a_missing_run_names_what_makes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="method_bench.json"):
        summary.sentiment_rows(tmp_path)
