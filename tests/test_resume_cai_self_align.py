"""cai-sl, cai-rl and self-align under the run protocol: the output is checked before any model loads, each
finished stage is kept, SIGINT stops after the running stage, and --resume ends with the uninterrupted result."""
import json
import os
import signal

import pytest
import torch

from alignlib import cai
from alignlib.commands import cai as cai_cmd
from alignlib import self_align as sa
from alignlib.training.checkpoint import RunDirectoryError, StageStore, prepare_output, release
from alignlib.commands.cli import build_parser, main

VOLATILE = ("timings", "seconds", "time/", "memory/")          # wall-clock and memory fields
CAI = ["--model", "tiny-random", "--red-team", "4", "--helpful", "2", "--few-shot", "1", "--format-epochs", "1",
       "--study-prompts", "2"]
RL = ["--ppo-steps", "1", "--eval", "3", "--feedback-model", "tiny-random", "--human-helpful-pairs", "4"]


def stable(path) -> str:
    """The JSON file at ``path`` without wall-clock and memory fields (dumped, so that NaN equals NaN)."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if not k.startswith(VOLATILE)}
        return [strip(v) for v in x] if isinstance(x, list) else x
    return json.dumps(strip(json.loads(path.read_text())), sort_keys=True)


def sigint_on_first_call(fn):
    """``fn`` that sends SIGINT to this process when it is first called (then runs as usual): Ctrl-C mid-stage."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return fn(*args, **kwargs)
    return wrapped


def stored(out, names) -> list[str]:
    return [name for name in names if StageStore(out).done(name)]


def stopped(monkeypatch, capsys, owner, name: str, argv: list[str]) -> str:
    """Run the command ``argv`` with Ctrl-C pressed when ``owner.name`` is first called; it must exit with
    128 + SIGINT and say how to continue. Returns the stage it stopped after."""
    with monkeypatch.context() as patch:
        patch.setattr(owner, name, sigint_on_first_call(getattr(owner, name)))
        with pytest.raises(SystemExit) as stop:
            main(argv)
    assert stop.value.code == 128 + signal.SIGINT
    said = capsys.readouterr().out
    assert ". Run the same command with --resume to continue." in said
    return said.split("stopped after ")[1].split(";")[0]


def no_model(*args, **kwargs):
    raise AssertionError("a model was loaded before the output was checked")


@pytest.mark.unit
def test_an_unwritable_output_or_json_fails_before_any_model_loads(tmp_path, monkeypatch):
    import alignlib.models

    monkeypatch.setattr(alignlib.models, "load_model", no_model)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    for argv in (["cai-sl", *CAI, "--output", str(blocker / "run")],
                 ["self-align", "--model", "tiny-random", "--output", str(blocker / "run"),
                  "--json", str(tmp_path / "sa.json")]):
        with pytest.raises(RunDirectoryError, match="cannot write to the output directory"):
            main(argv)
    for argv in (["cai-sl", *CAI, "--output", str(tmp_path / "cai"), "--json", str(blocker / "cai.json")],
                 ["self-align", "--model", "tiny-random", "--output", str(tmp_path / "sa"),
                  "--json", str(blocker / "sa.json")]):
        with pytest.raises(RunDirectoryError, match="cannot write --json"):
            main(argv)
    assert not (tmp_path / "cai").exists() and not (tmp_path / "sa").exists()      # refused before claiming


@pytest.mark.unit
def test_cai_sl_refuses_an_earlier_run_and_cai_rl_an_unfinished_sl_before_any_model_loads(tmp_path, monkeypatch):
    import alignlib.models

    monkeypatch.setattr(alignlib.models, "load_model", no_model)
    old = tmp_path / "old"                           # what cai-sl wrote before the run protocol
    (old / "sl_adapter").mkdir(parents=True)
    (old / "sl.json").write_text("{}")
    with pytest.raises(RunDirectoryError, match="already holds a run; pass --resume"):
        main(["cai-sl", *CAI, "--output", str(old)])
    with pytest.raises(RunDirectoryError, match="not written by alignlib's run protocol"):
        main(["cai-sl", *CAI, "--output", str(old), "--overwrite"])
    assert (old / "sl.json").read_text() == "{}"     # nothing replaced, nothing deleted

    args = build_parser().parse_args(["cai-sl", *CAI])
    identity = cai_cmd.run_identity(cai_cmd.config_from_args(args), args.preset, "sl")
    cut = prepare_output(tmp_path / "cut", identity=identity)
    StageStore(cut).save("sl-start", {})             # a cai-sl that was stopped after its first stage
    release(cut)
    with pytest.raises(FileNotFoundError, match="no finished cai-sl run.*cai-sl --resume --output"):
        main(["cai-rl", *CAI, "--output", str(cut)])


@pytest.mark.unit
def test_cai_rl_overwrite_redoes_only_cai_rl_with_its_new_settings(tmp_path):
    def args(*extra):
        return build_parser().parse_args(["cai-rl", *CAI, *RL, "--output", str(tmp_path / "run"), *extra])

    first = args()
    out = prepare_output(first.output, identity=cai_cmd.run_identity(cai_cmd.config_from_args(first), "cpu", "rl"))
    store = StageStore(out)
    for name in ("sl-sft", "rl-pairs", "rl-ppo"):    # a finished cai-sl and a cai-rl stopped after PPO
        store.save(name, {"stage": name})
    (out / "sl.json").write_text("{}")
    (out / "rl.json").write_text("{}")
    release(out)
    with pytest.raises(RunDirectoryError, match="already holds a cai-rl run; pass --resume"):
        cai_cmd.claim_output(args("--ppo-steps", "2"), "rl", cai_cmd.config_from_args(args("--ppo-steps", "2")))
    with pytest.raises(RunDirectoryError, match="ppo_steps: the run used 1, this command asks for 2"):
        cai_cmd.claim_output(args("--ppo-steps", "2", "--resume"), "rl",
                             cai_cmd.config_from_args(args("--ppo-steps", "2")))
    again = args("--ppo-steps", "2", "--overwrite")
    assert cai_cmd.claim_output(again, "rl", cai_cmd.config_from_args(again)) == out
    assert [n for n in (*cai.SL_STAGES, *cai.RL_STAGES) if store.done(n)] == ["sl-sft"]   # cai-sl's part is kept
    assert (out / "sl.json").exists() and not (out / "rl.json").exists()
    assert json.loads((out / ".alignlib-run.json").read_text())["identity"]["ppo_steps"] == 2
    release(out)


@pytest.mark.pipeline
def test_cai_stopped_by_sigint_in_a_stage_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, capsys):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    torch.manual_seed(0)                             # both runs start from the same process state
    main(["cai-sl", *CAI, "--output", str(whole)])
    main(["cai-rl", *CAI, *RL, "--output", str(whole)])

    import alignlib.reward_model
    import alignlib.training.registry
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    sl, rl = ["cai-sl", *CAI, "--output", str(cut)], ["cai-rl", *CAI, *RL, "--output", str(cut)]
    torch.manual_seed(0)
    assert stopped(monkeypatch, capsys, cai, "train_critic", sl) == "sl-critic"       # Ctrl-C in the 2nd stage
    assert stored(cut, cai.SL_STAGES) == ["sl-start", "sl-answers", "sl-critic"] and not (cut / "sl.json").exists()
    with pytest.raises(RunDirectoryError, match="already holds a run; pass --resume"):
        main(sl)
    with pytest.raises(FileNotFoundError, match="cai-sl --resume"):
        main(rl)
    torch.manual_seed(5)                             # a new process, whatever its state
    assert stopped(monkeypatch, capsys, cai, "revision_study", [*sl, "--resume"]) == "sl-study"  # the critic reloaded
    main([*sl, "--resume"])
    assert stable(cut / "sl.json") == stable(whole / "sl.json")
    adapter = "sl_adapter/adapter_model.safetensors"
    assert (cut / adapter).read_bytes() == (whole / adapter).read_bytes()
    policy = cai.run_sl(cai_cmd.config_from_args(build_parser().parse_args(sl)), out=cut)["policy"]   # every stage read
    saved = load_file(str(whole / adapter))
    assert all(torch.equal(v, saved[k]) for k, v in get_peft_model_state_dict(policy).items())
    with pytest.raises(RunDirectoryError, match="already holds a run; pass --resume"):
        main(sl)                                     # a second cai-sl does not replace the first
    with pytest.raises(RunDirectoryError, match="red_team: the run used 4, this command asks for 48"):
        main(["cai-rl", "--model", "tiny-random", "--output", str(cut)])    # cai-rl continues this run only

    assert stopped(monkeypatch, capsys, cai, "judge_accuracy", rl) == "rl-feedback"    # Ctrl-C in the 2nd stage
    assert stored(cut, cai.RL_STAGES) == ["rl-pairs", "rl-feedback"] and not (cut / "rl.json").exists()
    with pytest.raises(RunDirectoryError, match="already holds a cai-rl run; pass --resume"):
        main(rl)
    torch.manual_seed(5)
    assert stopped(monkeypatch, capsys, alignlib.reward_model, "train_reward_model", [*rl, "--resume"]) == \
        "rl-preference-model"
    # PM reloaded
    assert stopped(monkeypatch, capsys, alignlib.training.registry, "make_trainer", [*rl, "--resume"]) == "rl-ppo"
    main([*rl, "--resume"])                          # PPO's adapter reloaded for the evaluation
    assert stable(cut / "rl.json") == stable(whole / "rl.json")
    assert stable(cut / "sl.json") == stable(whole / "sl.json")               # cai-rl left cai-sl's part alone
    release(whole), release(cut)


def small_self_align_data(folder):
    """The course data of SELF-ALIGN, cut to fit the tiny model's 1024-token context."""
    folder.mkdir()
    for name in ("seed_instructions.jsonl", "question_types.jsonl", "verbose_prompt.txt"):
        (folder / name).write_text((sa.DATA_DIR / "self_align" / name).read_text())
    for name in ("principles.jsonl", "truthfulness_mc.jsonl", "adherence_prompts.jsonl"):
        rows = [json.loads(x) for x in (sa.DATA_DIR / "self_align" / name).read_text().splitlines()]
        rows = rows[:2] if name == "principles.jsonl" else [r for r in rows if r["split"] == "test"][:3]
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "exemplars.jsonl").write_text(json.dumps({"id": "E1", "instruction": "Name a fruit.",
                                                        "thought": "By P01 I answer.", "answer": "An apple."}) + "\n")
    return folder


@pytest.mark.pipeline
def test_self_align_stopped_by_sigint_in_a_stage_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, capsys):
    real = sa.self_align

    def stage2(model, tok, pool, data, n):    # the tiny model never writes a well-formed answer: two fixed ones
        return [{**r, "thought": "By P01 I answer.", "answer": "Here is a short answer.", "dropped": None}
                for r in real(model, tok, pool[:2], data, n)] + [
            {"instruction": x, "thought": "", "answer": "", "dropped": "no thoughts"} for x in pool[2:]]

    data = small_self_align_data(tmp_path / "data")

    def argv(name, *extra):
        return ["self-align", "--model", "tiny-random", "--instruct-prompts", "1", "--answer-tokens", "8",
                "--verbose-tokens", "8", "--data-dir", str(data), "--output", str(tmp_path / name),
                "--json", str(tmp_path / f"{name}.json"), *extra]

    monkeypatch.setattr(sa, "self_align", stage2)
    main(argv("whole"))
    assert stopped(monkeypatch, capsys, sa, "self_align", argv("cut")) == "stage2-principle-driven"   # the 2nd stage
    assert stored(tmp_path / "cut", sa.STAGES) == list(sa.STAGES[:2]) and not (tmp_path / "cut.json").exists()
    with pytest.raises(RunDirectoryError, match="already holds a run; pass --resume"):
        main(argv("cut"))
    with pytest.raises(RunDirectoryError, match="answer_tokens: the run used 8, this command asks for 9"):
        main([*argv("cut", "--resume"), "--answer-tokens", "9"])
    torch.manual_seed(5)                             # a new process, whatever its state
    assert stopped(monkeypatch, capsys, sa, "distil", argv("cut", "--resume")) == "stage3-engraving"
    assert stopped(monkeypatch, capsys, sa, "verbose_answers", argv("cut", "--resume")) == \
        "stage4-verbose-cloning"                     # from the engraved adapter stage 3 stored
    main(argv("cut", "--resume"))                    # the evaluation, from both stored adapters
    assert stable(tmp_path / "cut.json") == stable(tmp_path / "whole.json")
    assert stable(tmp_path / "cut" / "self_align.json") == stable(tmp_path / "whole.json")
    release(tmp_path / "whole"), release(tmp_path / "cut")
