"""The command line: argument parsing and a tiny end-to-end PPO run that writes its outputs."""
import json
import types

import pytest

from alignlib.commands.cli import build_parser


@pytest.mark.unit
def test_parser_knows_the_commands():
    parser = build_parser()
    assert parser.parse_args(["tour"]).command == "tour"
    args = parser.parse_args(["ppo", "--preset", "lab-gpu", "--steps", "3"])
    assert (args.preset, args.steps) == ("lab-gpu", 3)
    with pytest.raises(SystemExit):
        parser.parse_args(["ppo", "--preset", "tpu"])


@pytest.mark.pipeline
@pytest.mark.parametrize("method,field", [("ppo", "steps"), ("rrhf", "steps"), ("raft", "stages")])
def test_method_run_writes_history_and_adapter(tmp_path, method, field):
    from alignlib.commands.run import run_named

    args = types.SimpleNamespace(preset="cpu", model="tiny-random", reward="length", steps=2, seed=0,
                                 output=str(tmp_path / method))
    record = run_named(method, args)
    saved = json.loads((tmp_path / method / "history.json").read_text())
    assert saved["method"] == method
    assert len(saved["history"]) == 2 and saved["config"][field] == 2
    assert "reward/mean" in saved["before"] and "reward/mean" in saved["after"]
    assert (tmp_path / method / "adapter" / "adapter_model.safetensors").exists()
    assert saved["status"] == "finished" and (tmp_path / method / "checkpoints" / "step-000002").is_dir()
    assert record["history"][-1]["kl/ref"] == saved["history"][-1]["kl/ref"]


@pytest.mark.unit
def test_method_presets_exist_for_both_machines():
    from alignlib.ppo import PPOConfig
    from alignlib.raft import RAFTConfig
    from alignlib.rrhf import RRHFConfig

    for config in (PPOConfig, RRHFConfig, RAFTConfig):
        assert set(config.PRESETS) == {"cpu", "lab-gpu"}
        with pytest.raises(ValueError, match="unknown preset"):
            config.preset("tpu")
    assert RAFTConfig.preset("cpu", stages=3).stages == 3


@pytest.mark.unit
def test_task_queries_carry_stored_responses():
    from alignlib.data import load_task_queries

    rows = load_task_queries("course:preference_pairs", "test", n=3)
    assert len(rows) == 3 and set(rows[0]) == {"prompt", "chosen", "rejected"}
    assert set(load_task_queries("course:movie_openings", "test", n=2)[0]) == {"prompt"}


@pytest.mark.unit
def test_unknown_reward_is_a_clear_error():
    from alignlib.reward_model import build_reward

    with pytest.raises(ValueError, match="sentiment"):
        build_reward("bleu")


@pytest.mark.pipeline
def test_tour_runs_every_method_on_the_tiny_model_and_writes_its_report(capsys, tmp_path):
    import json

    from alignlib.commands.tour import TOUR_STEPS, run

    result = run("tiny-random", n_prompts=2, max_new_tokens=6, steps=1, report=tmp_path / "tour")
    assert [m for m, _ in TOUR_STEPS] == ["ppo", "rrhf", "raft", "soups", "cai", "self_align"]
    assert all(len(result[m]) == 1 and "kl/ref" in result[m][0] for m in ("ppo", "rrhf", "raft"))
    assert [row["lambda"] for row in result["soups"]] == ["0.0", "0.5", "1.0"]
    assert len(result["cai"]["rows"]) == 2 and result["cai"]["judge"]["pairs"] == 8
    assert len(result["self_align"]["rows"]) == 2 and len(result["self_align"]["mc"]["hits"]) == 24
    out = capsys.readouterr().out
    assert "RRHF step" in out and "RAFT step" in out and "expert neutral" in out and "cai-sl" in out
    assert "self-align --preset cpu" in out and f"report: {tmp_path / 'tour' / 'report.md'}" in out
    page = (tmp_path / "tour" / "report.md").read_text()
    assert "| PPO | 1 |" in page and "| RAFT | 1 |" in page and "## SELF-ALIGN" in page and "training.png" in page
    assert (tmp_path / "tour" / "training.png").stat().st_size > 1000
    histories = json.loads((tmp_path / "tour" / "histories.json").read_text())
    assert histories["ppo"][0]["reward/mean"] == result["ppo"][0]["reward/mean"]
