"""The command line: argument parsing and a tiny end-to-end PPO run that writes its outputs."""
import json
import types

import pytest

from alignlib.cli import build_parser


def test_parser_knows_the_commands():
    parser = build_parser()
    assert parser.parse_args(["tour"]).command == "tour"
    args = parser.parse_args(["ppo", "--preset", "lab-gpu", "--steps", "3"])
    assert (args.preset, args.steps) == ("lab-gpu", 3)
    with pytest.raises(SystemExit):
        parser.parse_args(["ppo", "--preset", "tpu"])


def test_ppo_run_writes_history_and_adapter(tmp_path):
    from alignlib.runs import run_ppo

    args = types.SimpleNamespace(preset="cpu", model="tiny-random", reward="length", steps=2, seed=0,
                                 output=str(tmp_path / "ppo"))
    record = run_ppo(args)
    saved = json.loads((tmp_path / "ppo" / "history.json").read_text())
    assert len(saved["history"]) == 2 and saved["config"]["steps"] == 2
    assert "reward/mean" in saved["before"] and "reward/mean" in saved["after"]
    assert (tmp_path / "ppo" / "adapter" / "adapter_model.safetensors").exists()
    assert record["history"][-1]["kl/ref"] == saved["history"][-1]["kl/ref"]


def test_unknown_reward_is_a_clear_error():
    from alignlib.presets import build_reward

    with pytest.raises(ValueError, match="sentiment"):
        build_reward("bleu")
