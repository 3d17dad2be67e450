"""SL-CAI's positive control: its constitution, the copy filter, bad input, and the chain end to end (tiny model)."""
import json

import pytest

from alignlib import cai_sl_control as slc
from alignlib.commands.cli import main
from alignlib.data import DataFormatError
from alignlib.self_align import summary_first


@pytest.mark.unit
def test_the_summary_constitution_teaches_its_principle_by_example():
    con = slc.load_summary_constitution()
    assert con.critiques and con.principles and len(con.few_shot) == 3
    for shot in con.few_shot:                        # every example revises an answer that breaks the rule
        assert summary_first(shot["revision"]) and not summary_first(shot["response"])
        assert "In short" in con.pair(shot["critique_request"])["revision_request"]


@pytest.mark.unit
def test_copied_example_catches_copies_only():
    examples = ["In short: about every three months. Change it sooner if the bristles fray."]
    assert slc.copied_example("In short: about every three months. Change it sooner if bristles fray.", examples, 0.5)
    assert not slc.copied_example("In short: boil the pasta in plenty of salted water and stir it.", examples, 0.5)


@pytest.mark.unit
def test_loops_flags_a_phrase_said_three_times():
    assert slc.loops("In short: list, tuple, list, tuple, list, tuple, list, tuple.")
    assert not slc.loops("In short: a list can change, a tuple cannot. Use a tuple for fixed pairs.")


@pytest.mark.unit
def test_bad_config_and_malformed_files_raise_clearly(tmp_path):
    with pytest.raises(ValueError, match="copy_threshold"):
        slc.SLControlConfig(copy_threshold=0)
    with pytest.raises(ValueError, match="train_prompts"):
        slc.SLControlConfig(train_prompts=0)
    for name in ("critique_revision.jsonl", "comparison_principles.jsonl", "few_shot.jsonl"):
        (tmp_path / name).write_text((slc.SUMMARY_DIR / name).read_text())
    (tmp_path / "few_shot.jsonl").write_text('{"id": "x", "prompt": "no other fields"}\n')
    with pytest.raises(DataFormatError, match="few_shot.jsonl"):
        slc.load_summary_constitution(tmp_path)


@pytest.mark.pipeline
def test_sl_control_end_to_end_and_resumed_on_the_tiny_model(tmp_path, capsys):
    args = ["cai-sl-control", "--model", "tiny-random", "--train-prompts", "4", "--eval-prompts", "3",
            "--few-shot", "1", "--max-new-tokens", "8", "--revision-tokens", "8", "--epochs", "1", "--batch-size", "2",
            "--copy-threshold", "1.0", "--n-boot", "50", "--output", str(tmp_path)]
    main(args)
    out = json.loads((tmp_path / "control.json").read_text())
    rev, ev = out["revisions"], out["evaluation"]
    assert len(rev["rows"]) == 4 and rev["kept"] == out["sft"]["pairs"] == 4 - sum(r["copied"] or r["repeats"]
                                                                                  for r in rev["rows"])
    models = ev["models"]
    assert len(models["base"]["replies"]) == len(models["sl_cai"]["replies"]) == 3
    diff = [a - b for a, b in zip(models["sl_cai"]["hits"], models["base"]["hits"])]
    assert out["effect"]["mean"] == pytest.approx(sum(diff) / 3)
    assert "held-out pass rate" in capsys.readouterr().out
    main(args + ["--resume"])                        # every stage read back: the same result
    assert json.loads((tmp_path / "control.json").read_text())["evaluation"] == ev
