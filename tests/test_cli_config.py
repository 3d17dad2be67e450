"""The command line built from the config dataclasses: every field a flag, ``--config`` files, one-line errors."""
import dataclasses
import subprocess
import sys

import pytest

from alignlib.commands.args import UsageError, config_fields
from alignlib.commands.cli import COMMANDS, build_parser, entry, parse
from alignlib.ppo import PPOConfig
from alignlib.raft import RAFTConfig
from alignlib.rrhf import RRHFConfig

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("command, config", [("ppo", PPOConfig), ("rrhf", RRHFConfig), ("raft", RAFTConfig)])
def test_every_config_field_is_a_flag_with_its_docstring(command, config):
    fields, _ = config_fields(config.__module__, config.__name__)
    assert [f.name for f in fields] == [f.name for f in dataclasses.fields(config)]        # read without importing
    assert all(f.help for f in fields), "every field is documented"
    help_text = build_parser(only=command)._subparsers._group_actions[0].choices[command].format_help()
    for f in dataclasses.fields(config):
        assert "--" + f.name.replace("_", "-") in help_text, f.name


def test_config_file_sets_fields_and_the_command_line_wins(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("kl_coef: 0.2\nlr: 1.0e-4\nbatch-size: 4\nwhiten_rewards: true\n")
    args = parse(["ppo", "--config", str(path), "--kl-coef", "0.1"])
    assert (args.kl_coef, args.lr, args.batch_size, args.whiten_rewards) == (0.1, 1e-4, 4, True)
    assert not hasattr(args, "cliprange")                                       # not given: the preset's value holds
    from alignlib.commands.args import config_overrides

    assert config_overrides(args) == {"batch_size": 4, "lr": 1e-4, "kl_coef": 0.1, "whiten_rewards": True}


@pytest.mark.parametrize("text, message", [("kl_cof: 1\n", "unknown keys \\['kl_cof'\\]"),
                                           ("- 1\n- 2\n", "must hold a mapping"),
                                           ("a: [1\n", "not valid YAML")])
def test_a_bad_config_file_is_one_line_naming_the_fix(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        parse(["ppo", "--config", str(path)])
    assert entry(["ppo", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_known_error_is_one_line_and_nothing_is_written(tmp_path, capsys):
    pytest.importorskip("alignlib.models")
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        assert entry(["ppo", "--report-to", "wandb", "--output", str(tmp_path / "w")]) == 2
        assert "pip install wandb" in capsys.readouterr().err
        assert not (tmp_path / "w").exists()                      # refused before the run directory is made
    assert entry(["ppo", "--model", "no-such-model", "--output", str(tmp_path / "m"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and len(err.strip().splitlines()) == 1


def test_parsing_and_help_import_no_torch():
    """Every command's ``--help`` (and parsing) runs before any heavy import, so it answers at once."""
    code = ("import contextlib, io, sys\nfrom alignlib.commands.cli import COMMANDS, parse\n"
            "for c in COMMANDS:\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
            "        parse([c, '--help'])\n"
            "    assert '--' in out.getvalue(), c\n"
            "parse(['ppo', '--kl-coef', '0.1'])\n"
            "assert 'torch' not in sys.modules, 'torch imported while parsing'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_commands_table_matches_the_parser():
    choices = build_parser(only="")._subparsers._group_actions[0].choices
    assert list(choices) == list(COMMANDS)


def test_every_trainer_follows_the_protocol(tiny):
    """PPO, RRHF, RAFT and the reward model conform to ``alignlib.training.protocol.Trainer``."""
    from alignlib.models import load_model
    from alignlib.reward_model import RewardModelConfig, RewardModelTrainer, load_reward_model
    from alignlib.rewards import LengthReward
    from alignlib.training.protocol import Trainer
    from alignlib.training.registry import make_trainer

    for method in ("ppo", "rrhf", "raft"):
        policy, tokenizer = load_model("tiny-random", lora=True)
        trainer = make_trainer(method, policy, tokenizer, LengthReward(), ["a b", "c d"] * 4, steps=1)
        assert isinstance(trainer, Trainer) and trainer.iterations == 1
        assert set(trainer.checkpoint_state()) == {"optimizer", "scheduler", "rng", "extra"}
    model, tokenizer = load_reward_model("tiny-random")
    pairs = [{"prompt": "p", "chosen": "good", "rejected": "bad"}] * 4
    rm = RewardModelTrainer(model, tokenizer, pairs, RewardModelConfig(epochs=1, batch_size=2))
    assert isinstance(rm, Trainer) and rm.trainable_module() is model
    assert isinstance(rm.train_step(), dict) and len(rm.history) == 1
