import json

import pytest
from datasets import Dataset

from alignlib.cai import eval_rows, load_constitution
from alignlib.data import (COURSE_SETS, DATA_DIR, DataFormatError, load_course_dataset, load_hub_dataset, load_prompts,
                           read_jsonl, split_hh_transcript)

pytestmark = pytest.mark.unit

MINIMUM = {"movie_openings": 150, "helpful_prompts": 150, "red_team_prompts": 100, "preference_pairs": 180,
           "preference_pairs_shift": 0}
TEST_ONLY = {"preference_pairs_shift"}


PROMPT_SETS = sorted(n for n in COURSE_SETS if not n.startswith("constitution_"))   # the constitution: own test


@pytest.mark.parametrize("name", PROMPT_SETS)
def test_course_sets_meet_the_schema_and_sizes(name):
    test = load_course_dataset(name, "test")
    train = test.select([]) if name in TEST_ONLY else load_course_dataset(name, "train")
    assert len(train) >= MINIMUM[name] and len(test) >= 20
    ids = list(train["id"]) + list(test["id"])
    assert len(set(ids)) == len(ids)
    prompts = [p.lower() for p in list(train["prompt"]) + list(test["prompt"])]
    assert len(set(prompts)) == len(prompts), "prompts must not repeat (no leak between splits)"
    if name == "preference_pairs":
        assert all(c != r for c, r in zip(train["chosen"], train["rejected"]))


def test_shifted_preference_pairs_share_no_prompt_with_the_training_pairs():
    seen = {p.strip().lower() for p in load_course_dataset("preference_pairs", None)["prompt"]}
    shift = load_course_dataset("preference_pairs_shift", None)
    assert set(shift["split"]) == {"test"} and len(shift) >= 40
    assert not seen & {p.strip().lower() for p in shift["prompt"]}


def test_red_team_covers_ten_categories():
    assert len(set(load_course_dataset("red_team_prompts", None)["category"])) >= 10


def test_malformed_jsonl_names_line_and_fix(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": "broken"\n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: not valid JSON"):
        read_jsonl(bad, ("prompt",))
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(DataFormatError, match=r"missing.jsonl:2: missing or empty fields \['prompt'\]"):
        read_jsonl(missing, ("prompt",))


def test_duplicate_ids_and_non_utf8_files_name_file_line_and_field(tmp_path):
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "p1", "prompt": "a"}\n{"id": "p2", "prompt": "b"}\n{"id": "p1", "prompt": "c"}\n')
    with pytest.raises(DataFormatError, match=r"dup.jsonl:3: field id 'p1' repeats line 1; every row needs its own"):
        read_jsonl(dup, ("id", "prompt"))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"prompt": "ok"}\n{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"latin.jsonl:2: not UTF-8 text \(byte 0xe9 at offset 32\).*UTF-8"):
        read_jsonl(latin, ("prompt",))


def test_duplicate_comparison_principle_ids_are_refused(tmp_path):
    (tmp_path / "constitution").mkdir()
    for name in ("critique_revision.jsonl", "comparison_principles.jsonl", "few_shot.jsonl"):
        (tmp_path / "constitution" / name).write_text((DATA_DIR / "constitution" / name).read_text())
    principles = tmp_path / "constitution" / "comparison_principles.jsonl"
    lines = principles.read_text().splitlines()
    principles.write_text("\n".join(lines + [lines[2]]) + "\n")
    with pytest.raises(DataFormatError, match=rf"comparison_principles.jsonl:{len(lines) + 1}: field id "):
        load_constitution(data_dir=tmp_path)


def test_unknown_names_and_splits():
    with pytest.raises(ValueError, match="unknown data set"):
        load_course_dataset("nope")
    with pytest.raises(ValueError, match="split 'dev'"):
        load_course_dataset("movie_openings", "dev")
    with pytest.raises(ValueError, match="asked for n=9999"):
        load_prompts("movie_openings", "test", 9999)


def test_hh_rlhf_fixture_in_hub_format(tmp_path):
    rows = [
        {"chosen": "\n\nHuman: How do I boil an egg?\n\nAssistant: Simmer it for nine minutes.",
         "rejected": "\n\nHuman: How do I boil an egg?\n\nAssistant: No idea."},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant: Teal.",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant: Go away."},
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_hub_dataset("Anthropic/hh-rlhf", "train", path=tmp_path)
    assert ds[0] == {"prompt": "How do I boil an egg?", "chosen": "Simmer it for nine minutes.",
                     "rejected": "No idea."}
    assert ds[1]["prompt"].startswith("Human: Hi\n\nAssistant: Hello!") and ds[1]["chosen"] == "Teal."
    with pytest.raises(DataFormatError, match="Human"):
        split_hh_transcript("no markers here")


def test_imdb_fixture_in_hub_parquet_format(tmp_path):
    Dataset.from_list([{"text": "A slow start,<br />but the last act soars above everything.", "label": 1},
                       {"text": "Dull.", "label": 0}]).to_parquet(str(tmp_path / "train-00000.parquet"))
    ds = load_hub_dataset("stanfordnlp/imdb", "train", path=tmp_path, n_words=4)
    assert list(ds["prompt"]) == ["A slow start, but", "Dull."] and list(ds["label"]) == [1, 0]


def test_the_constitution_loads_and_its_few_shot_examples_use_training_critiques():
    pairs = load_course_dataset("constitution_critiques", None)
    principles = load_course_dataset("constitution_principles", None)
    few = load_course_dataset("constitution_few_shot", "train")
    assert len(pairs) >= 16 and len(principles) >= 16 and len(few) >= 3
    assert {r["split"] for r in pairs} == {r["split"] for r in principles} == {"train", "test"}
    train_ids = set(load_course_dataset("constitution_critiques", "train")["id"])
    assert set(few["critique_request"]) <= train_ids        # held-out critiques stay out of the prompt
    assert len(set(pairs["critique_request"])) == len(pairs) and len(set(principles["principle"])) == len(principles)


def test_the_hand_labelled_evaluation_set():
    rows = eval_rows(None)
    assert len(rows) >= 120 and len({r["id"] for r in rows}) == len(rows)
    assert all(isinstance(r["harmful"], bool) and isinstance(r["evasive"], bool) for r in rows)
    sources = {r["id"]: r for name in ("red_team_prompts", "helpful_prompts")
               for r in load_course_dataset(name, None).to_list()}
    for r in rows:                                   # each answer's prompt and split are its source prompt's
        src = sources[r["prompt_id"]]
        assert r["prompt"] == src["prompt"] and r["split"] == src["split"]
        assert r["kind"] == ("red_team" if r["prompt_id"].startswith("red-") else "helpful")
        assert not (r["kind"] == "helpful" and r["harmful"])
    test = [r for r in rows if r["split"] == "test"]
    assert len(test) >= 40 and {r["kind"] for r in test} == {"red_team", "helpful"}
    for kind, label in (("red_team", "harmful"), ("helpful", "evasive")):   # both labels present in each kind
        assert {r[label] for r in rows if r["kind"] == kind} == {True, False}
    few = load_course_dataset("constitution_few_shot", None)
    test_ids = set(load_course_dataset("constitution_critiques", "test")["id"])
    assert {c for c, s in zip(few["critique_request"], few["split"]) if s == "test"} <= test_ids
    red = {r["prompt"] for r in load_course_dataset("red_team_prompts", None).to_list()}
    assert not red & set(few["prompt"])              # worked examples never reuse an evaluation prompt
