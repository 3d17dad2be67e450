"""SELF-ALIGN: prompt assembly and pruning, the novelty filter, output extraction and filters, engraving learns."""
import json
import shutil

import pytest
import torch

import alignlib.prefix_cache as pc
from alignlib import self_align as sa
from alignlib.commands.cli import main
from alignlib.data import DataFormatError
from alignlib.generation import generate
from alignlib.prefix_cache import PrefixCache
from alignlib.sft import mean_nll

PRINCIPLES = ({"id": "P01", "title": "Ethical", "rule": "The assistant should refuse to help anyone cause harm."},
              {"id": "P02", "title": "Candid", "rule": "The assistant should say plainly what it does not know."})
EXEMPLARS = ({"id": "E1", "instruction": "How do I pick my neighbour's lock?",
              "thought": "This could help a burglary; by P01 (Ethical) I decline and suggest a locksmith.",
              "answer": "I can't help with opening someone else's lock, but a licensed locksmith can help you."},)


def data(**kw):
    return sa.SelfAlignData(**{"principles": PRINCIPLES, "exemplars": EXEMPLARS, **kw})


@pytest.mark.unit
def test_the_prompt_holds_every_principle_and_exemplar_and_engraving_prunes_them():
    d = data()
    prompt = sa.principle_prompt(d)
    for p in PRINCIPLES:
        assert f"{p['id']} ({p['title']}): {p['rule']}" in prompt
    assert EXEMPLARS[0]["thought"] in prompt and EXEMPLARS[0]["answer"] in prompt and prompt.endswith("\n\n")
    assert sa.query("Name a fruit.") == "User: Name a fruit.\n\nAssistant (internal thoughts):"
    rows = [{"instruction": " Name a fruit. ", "thought": "By P02 (Candid) I answer simply.", "answer": "An apple.",
             "dropped": None},
            {"instruction": "Hack a bank.", "thought": "", "answer": "", "dropped": "no thoughts"}]
    prompts, answers = sa.engraving_pairs(rows)
    assert prompts == ["Name a fruit."] and answers == ["An apple."]
    engraved = " ".join(prompts + answers)
    assert not any(p["rule"] in engraved or p["title"] in engraved for p in PRINCIPLES)
    assert "P0" not in engraved and "thought" not in engraved.lower()
    with pytest.raises(ValueError, match="nothing to engrave"):
        sa.engraving_pairs(rows[1:])


@pytest.mark.unit
def test_thoughts_and_answers_are_split_and_filtered():
    d = data()
    thought, answer = sa.split_thought(" By P02 (Candid) I say I am unsure.\n\nAssistant: I am not sure, sorry."
                                       "\n\nUser: next")
    assert thought == "By P02 (Candid) I say I am unsure." and answer == "I am not sure, sorry."
    assert sa.split_thought("just rambling") == ("just rambling", "")
    assert sa.check_output(thought, answer, d) is None
    assert sa.check_output("", answer, d) == "no thoughts"
    assert sa.check_output(thought, "Ok.", d) == "no answer"
    assert sa.check_output(thought, "As P01 says, no.", d) == "principle id"
    assert sa.check_output(thought, "Sure. Assistant (internal thoughts): hmm", d) == "format marker"
    leak = "A licensed locksmith can help, I think."                             # 5 words of the exemplar
    assert sa.check_output(thought, "I can't help with opening someone else's lock at all.", d) == "copies the prompt"
    assert sa.leaks(leak, d) is None                                              # only 5 shared words in a row
    assert sa.check_output(thought, "The user wants to know what I am unsure about.", d) == "repeats the thoughts"
    assert sa.check_output(thought, "Candid: I say I am unsure.", d) == "repeats the thoughts"   # by ROUGE-L


@pytest.mark.unit
def test_the_adherence_scorer_labels_replies_and_rates_them():
    label = sa.adherence_label
    assert label("I can't help with getting into someone else's shed, but a locksmith can.") == "decline"
    assert label("That would be illegal and could hurt the dog.") == "decline"
    assert label("I don't know: nobody can predict a lottery draw.") == "uncertain"
    assert label("I don't have access to real-time prices; check a financial news site.") == "uncertain"
    assert label("A hexagon has six sides.") == "answer"
    res = sa.adherence(["I can't help with that.", "Six sides.", "Six sides."], ["decline", "answer", "uncertain"])
    assert res["labels"] == ["decline", "answer", "answer"]
    assert res["rate"] == pytest.approx(2 / 3) and res["rates"] == {"decline": 1.0, "uncertain": 0.0, "answer": 1.0}
    assert res["interval"][0] <= res["rate"] <= res["interval"][1]
    acc = sa.scorer_accuracy([{"reply": "Six sides.", "label": "answer"}, {"reply": "Six.", "label": "uncertain"}])
    assert acc["accuracy"] == 0.5 and acc["wrong"][0]["scored"] == "answer"
    with pytest.raises(ValueError, match="one reply per prompt"):
        sa.adherence(["Six sides."], ["answer", "decline"])
    with pytest.raises(ValueError, match="use \\('decline'"):
        sa.adherence(["Six sides."], ["comply"])
    with pytest.raises(ValueError, match="hand-labelled"):
        sa.scorer_accuracy([])


@pytest.mark.unit
def test_the_novelty_filter_rejects_near_duplicates():
    pool = ["Write a short poem about the sea."]
    kept, rejected = sa.novelty_filter(["Write a short poem about the ocean.", "Explain how vaccines work.",
                                        "Explain how a vaccine works.", "  "], pool, threshold=0.7)
    assert kept == ["Explain how vaccines work."]
    assert [r[1] for r in rejected] == ["Write a short poem about the sea.", "Explain how vaccines work."]
    assert all(r[2] >= 0.7 for r in rejected)
    assert sa.rouge_l("a b c", "a b c") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="threshold"):
        sa.novelty_filter(["x"], pool, threshold=0)


@pytest.mark.unit
def test_numbered_lists_for_self_instruct():
    prompt = sa.numbered_list_prompt(["Name a fruit.", "Add 2 and 3."])
    assert prompt.endswith("\n1. Name a fruit.\n2. Add 2 and 3.\n3.")
    assert sa.parse_numbered(" Write a haiku about rain.\n4. Explain what a noun is.\n5. ok", 3) == \
        ["Write a haiku about rain.", "Explain what a noun is."]                 # items under 3 words are dropped
    qt = {"type": "After the cutoff", "description": "Needs recent news.", "topics": ["sports", "prices"],
          "example": "Who won yesterday?"}
    assert sa.topic_prompt(qt).endswith("1. sports\n2. prices\n3.")
    assert sa.question_prompt(qt, "prices").endswith("Topic: prices\nQuestion:")


@pytest.mark.unit
def test_topics_keep_short_items_and_instructions_do_not():
    text = " Weather\n3. Stock prices\n4. Who won the election last week"
    assert sa.parse_numbered(text, 2) == ["Who won the election last week"]          # instructions: >= 3 words
    assert sa.parse_numbered(text, 2, min_words=1) == ["Weather", "Stock prices", "Who won the election last week"]
    with pytest.raises(ValueError, match="min_words"):
        sa.parse_numbered(text, 2, min_words=0)


@pytest.mark.unit
def test_red_team_topics_of_one_word_reach_the_question_prompt(monkeypatch):
    from alignlib import generation

    asked = []

    class Out:
        def __init__(self, responses):
            self.responses = responses

    def fake(model, tok, prompts, **kw):
        asked.extend(prompts)
        return Out([" Weather\n\nShould the answer be yes?\n2. Stock prices" if "Topics:" in p
                    else " What will it cost tomorrow?" for p in prompts])

    monkeypatch.setattr(generation, "generate", fake)
    qt = [{"type": "After the cutoff", "description": "Needs recent news.", "topics": ["sports"],
           "example": "Who won yesterday?"}]
    out = sa.red_team_questions(None, None, qt, topics=3)
    assert [q["topic"] for q in out] == ["Weather", "Stock prices"]


@pytest.mark.unit
def test_red_team_questions_that_copy_their_example_are_rejected_and_a_score_at_the_threshold_is_kept():
    qt = [{"type": "After the cutoff", "description": "d", "example": "Which team won last night's basketball game?"}]
    red = [{"type": "After the cutoff", "topic": "sports", "question": "Which team won last night's basketball game?"},
           {"type": "After the cutoff", "topic": "prices", "question": "What does a litre of milk cost today?"}]
    kept, rejected = sa.red_team_filter(red, ["Name a fruit."], qt)
    assert kept == ["What does a litre of milk cost today?"]
    assert rejected[0][1] == qt[0]["example"] and rejected[0][2] == pytest.approx(1.0)
    a, b = "one two three four five six seven eight nine ten", "one two three four five six seven x y z"
    score = sa.rouge_l(a, b)
    assert score == pytest.approx(0.7)
    assert sa.novelty_filter([b], [a], threshold=score)[0] == [b]                     # equal to the threshold: kept
    assert sa.novelty_filter([b], [a], threshold=score - 1e-9)[0] == []               # above it: rejected


@pytest.mark.unit
def test_answers_with_repeated_sentences_are_filtered_and_cleaned():
    d = data()
    loop = "Drink water every day. It keeps you healthy. drink water every day!"
    assert sa.has_repeated_sentence(loop) and not sa.has_repeated_sentence("Drink water. It helps. Sleep well.")
    assert sa.check_output("By P02 (Candid) I answer.", loop, d) == "repeated sentences"
    assert sa.remove_repeated_sentences(loop) == "Drink water every day. It keeps you healthy."
    assert sa.remove_repeated_sentences("Step one.\nStep two.\nStep one.") == "Step one.\nStep two."


@pytest.mark.unit
def test_verbose_cloning_samples_without_repeats_and_trains_a_fresh_adapter(tiny, fresh_tiny):
    model, tok = tiny
    prompts = ["Tell me about rain.", "Describe a cat."]
    greedy = sa.verbose_answers(model, tok, prompts, "Answer at length.", max_new_tokens=32)
    cleaned = sa.verbose_answers(model, tok, prompts, "Answer at length.", max_new_tokens=32, temperature=0.7,
                                 top_p=0.95, no_repeat_ngram_size=2, dedupe=True)
    assert len(cleaned) == 2 and cleaned != greedy and not any(sa.has_repeated_sentence(a) for a in cleaned)
    with pytest.raises(ValueError, match="temperature"):
        sa.verbose_answers(model, tok, prompts, "x", temperature=-1)
    cfg = sa.SelfAlignConfig()
    assert not cfg.verbose_shortcut and cfg.verbose_temperature > 0 and cfg.verbose_no_repeat_ngram > 0
    base, _ = fresh_tiny()
    engraved, _ = fresh_tiny(lora=sa.ENGRAVING_LORA)
    with torch.no_grad():
        for name, p in engraved.named_parameters():
            if "lora_B" in name:
                p.fill_(0.5)                                     # "trained": B is no longer zero
    fresh = sa.verbose_student(base, engraved)
    b = [p for n, p in fresh.named_parameters() if "lora_B" in n]
    assert b and all(float(p.detach().abs().max()) == 0 for p in b)      # a new adapter: the base model's behaviour
    copied = sa.verbose_student(base, engraved, shortcut=True)
    assert all(float(p.detach().abs().min()) == 0.5 for n, p in copied.named_parameters() if "lora_B" in n)


@pytest.mark.unit
def test_the_control_principle_its_checker_and_the_ablation_prompt():
    ok = sa.summary_first
    assert ok("In short: about nine minutes.") and ok("  **In short:** Ottawa.") and ok("in short, yes.")
    assert not ok("About nine minutes. In short: nine.") and not ok("Shortly: yes.") and not ok("")
    with pytest.raises(ValueError, match="reply must be a string"):
        ok(None)
    control = sa.load_control()
    assert len(control.principles) == 1 and all(ok(e["answer"]) for e in control.exemplars)
    assert all("P01 (Summary First)" in e["thought"] for e in control.exemplars)
    assert sa.relevance("How long should I boil eggs?", "Boil eggs for nine minutes.") == 0.5       # 2 of 4 words
    assert sa.relevance("How long should I boil eggs?", "Paris is in France.") == 0.0
    course = sa.load_self_align()
    one, four = sa.principle_prompt(course, 1), sa.principle_prompt(course, 4)
    assert "P01 (" in one and "P02 (" not in one.split("\n\n")[1] and "P04 (" in four and "P05 (" not in four
    assert sa.principle_prompt(course, 16) == sa.principle_prompt(course)
    assert all(e["answer"] in one for e in course.exemplars)                     # the same exemplars throughout
    with pytest.raises(ValueError, match="principles must be an integer from 1 to 16"):
        sa.principle_prompt(course, 17)


@pytest.mark.unit
def test_bad_input_gets_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no principles"):
        sa.SelfAlignData(principles=(), exemplars=EXEMPLARS)
    with pytest.raises(ValueError, match="unknown principles \\['P09'\\]"):
        data(exemplars=({**EXEMPLARS[0], "thought": "By P09 I decline."},))
    (tmp_path / "principles.jsonl").write_text('{"id": "P01", "title": "x"}\n')
    with pytest.raises(DataFormatError, match="rule"):
        sa.load_self_align(tmp_path)
    with pytest.raises(ValueError, match="unknown set"):
        sa.load_rows("poems")
    (tmp_path / "adherence_prompts.jsonl").write_text(
        '{"id": "A1", "prompt": "Hi.", "expected": "comply", "split": "test"}\n')
    with pytest.raises(DataFormatError, match="expected \\['comply'\\] is not one of"):
        sa.load_rows("adherence", data_dir=tmp_path)


def _course_copy(folder):
    """A copy of data/self_align to spoil one file of."""
    shutil.copytree(sa.DATA_DIR / "self_align", folder)
    return folder


@pytest.mark.unit
def test_duplicate_ids_and_an_empty_verbose_prompt_are_refused_naming_file_line_and_field(tmp_path):
    folder = _course_copy(tmp_path / "dup")
    lines = (folder / "principles.jsonl").read_text().splitlines()
    (folder / "principles.jsonl").write_text("\n".join(lines + [lines[0]]) + "\n")      # P01 again
    with pytest.raises(DataFormatError, match=rf"principles.jsonl:{len(lines) + 1}: field id 'P01' repeats line 1"):
        sa.load_self_align(folder)
    folder = _course_copy(tmp_path / "empty")
    (folder / "verbose_prompt.txt").write_text(" \n\n")
    with pytest.raises(DataFormatError, match="verbose_prompt.txt is empty: write the verbose-cloning prompt"):
        sa.load_self_align(folder)
    folder = _course_copy(tmp_path / "latin")
    (folder / "verbose_prompt.txt").write_bytes("Be thorough.\nCaf\u00e9".encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"verbose_prompt.txt:2: not UTF-8 text \(byte 0xe9"):
        sa.load_self_align(folder)


@pytest.mark.unit
@pytest.mark.parametrize("change, message", [
    ({"answer": True}, r"field answer must be the index of the true choice, an integer from 0 to \d, got True"),
    ({"answer": "B"}, "field answer must be the index"),
    ({"choices": [1, 2, 3]}, r"field choices must be a list of 2-5 non-empty strings, got \[1, 2, 3\]"),
])
def test_multiple_choice_rows_need_string_choices_and_an_integer_answer(tmp_path, change, message):
    folder = _course_copy(tmp_path / "mc")
    rows = [json.loads(x) for x in (folder / "truthfulness_mc.jsonl").read_text().splitlines()]
    rows[3].update(change)
    (folder / "truthfulness_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataFormatError, match=rf"truthfulness_mc.jsonl row {rows[3]['id']}: {message}"):
        sa.load_rows("truthfulness", "train", data_dir=folder)


@pytest.mark.unit
def test_self_align_runs_with_the_cached_prompt(tiny):
    model, tok = tiny
    rows = sa.self_align(model, tok, ["Name a fruit.", "Add two and three."], data(), max_new_tokens=8)
    assert [r["instruction"] for r in rows] == ["Name a fruit.", "Add two and three."]
    assert all(r["dropped"] in (None, "no thoughts", "no answer", "principle id", "format marker", "copies the prompt",
                            "repeated sentences")
               for r in rows)


@pytest.mark.learning
def test_engraving_makes_the_unprompted_model_reproduce_the_prompted_behaviour(fresh_tiny):
    """The tiny model's greedy continuations *with* the principle prompt are the behaviour; after engraving, the
    model without the prompt reproduces them."""
    torch.manual_seed(0)
    model, tok = fresh_tiny(lora={"r": 8, "lora_alpha": 16})
    instructions = ["Name a fruit.", "Add two and three.", "Say hello.", "Pick a colour."]
    with model.disable_adapter():
        prompted = PrefixCache(model, tok, sa.principle_prompt(data())).generate_batch(
            [sa.query(x) for x in instructions], max_new_tokens=6)
        unprompted = generate(model, tok, instructions, max_new_tokens=6, do_sample=False).responses
    assert prompted != unprompted                                   # the prompt changes the behaviour
    before = mean_nll(model, tok, instructions, prompted)
    sa.distil(model, tok, instructions, prompted, epochs=60, lr=5e-3, batch_size=4)
    after = mean_nll(model, tok, instructions, prompted)
    # the targets went through text (invalid bytes became U+FFFD, 3 bytes each): room for their re-encoded length
    engraved = generate(model, tok, instructions, max_new_tokens=24, do_sample=False).responses
    assert after < 0.3 * before
    assert sum(e.startswith(p) for e, p in zip(engraved, prompted)) >= 3      # the prompted answer, unprompted


@pytest.mark.unit
def test_self_instruct_red_teaming_and_mc_accuracy_run_on_the_tiny_model(tiny, monkeypatch):
    model, tok = tiny
    prefixes, init = [], pc.PrefixCache.__init__
    monkeypatch.setattr(pc.PrefixCache, "__init__",
                        lambda self, m, t, prefix, *a, **k:
                            prefixes.append(prefix) or init(self, m, t, prefix, *a, **k))
    seeds = ["Write a haiku about rain.", "Explain what a noun is.", "Add 17 and 25.", "Name three planets."]
    out = sa.self_instruct(model, tok, seeds, prompts=2, shots=2, max_new_tokens=24)
    assert set(out["kept"]) <= set(out["generated"]) and not set(out["kept"]) & set(seeds)
    qt = [{"type": "After the cutoff", "description": "Needs recent news.", "topics": ["sports", "prices"],
           "example": "Who won yesterday?"}]
    assert all(q["type"] == "After the cutoff" for q in sa.red_team_questions(model, tok, qt, max_new_tokens=16))
    rows = [{"question": "Is water wet?", "choices": ["yes", "no"], "answer": 0},
            {"question": "Pick one.", "choices": ["a", "b", "c"], "answer": 2}]
    for method in ("true", "likelihood"):
        res = sa.mc_accuracy(model, tok, rows, method)
        assert len(res["hits"]) == 2 and 0 <= res["interval"][0] <= res["accuracy"] <= res["interval"][1] <= 1
        prompted = sa.mc_accuracy(model, tok, rows, method, preamble=sa.principle_prompt(data()))
        assert len(prompted["hits"]) == 2
        assert prefixes[-1].startswith(sa.principle_prompt(data())) and prefixes[-2] == prefixes[-1][
            len(sa.principle_prompt(data())):]                # the preamble goes before the method's own header
    with pytest.raises(ValueError, match="method"):
        sa.mc_accuracy(model, tok, rows, "vote")


@pytest.mark.unit
def test_the_course_data():
    d = sa.load_self_align()
    assert len(d.principles) == 16 and len({p["id"] for p in d.principles}) == 16
    assert len(d.exemplars) >= 5 and all(sa.PRINCIPLE_ID.search(e["thought"]) for e in d.exemplars)
    assert len(d.seeds) >= 20 and len(d.question_types) >= 10 and d.verbose_prompt
    assert all(len(q.get("topics", [])) >= 1 for q in d.question_types)
    mc = sa.load_rows("truthfulness")
    assert len(mc) >= 60 and {r["split"] for r in mc} == {"train", "test"}
    assert all(2 <= len(r["choices"]) <= 5 for r in mc) and len({r["answer"] for r in mc}) >= 3   # answers spread
    adherence = sa.load_rows("adherence", "test")
    assert {r["expected"] for r in adherence} == {"decline", "answer", "uncertain"}
    prompt = sa.principle_prompt(d)
    assert all(e["answer"] in prompt for e in d.exemplars)
    for e in d.exemplars:                          # answers to imitate carry no principle id or format marker
        assert not sa.PRINCIPLE_ID.search(e["answer"]) and "thought" not in e["answer"].lower()


@pytest.mark.pipeline
def test_the_four_stages_end_to_end_on_the_tiny_model(tmp_path, capsys, monkeypatch):
    # the random tiny model never writes a well-formed thought and answer, so every output would be filtered out
    # (stage 2 itself is tested above); here stage 2 answers every instruction with a fixed well-formed reply
    stage2 = sa.self_align
    monkeypatch.setattr(sa, "self_align", lambda model, tok, pool, data, n: [
        {**r, "thought": "By P01 I answer.", "answer": "Here is a short answer.", "dropped": None}
        for r in stage2(model, tok, pool[:2], data, n)] + [
        {"instruction": x, "thought": "", "answer": "", "dropped": "no thoughts"} for x in pool[2:]])

    small = tmp_path / "data"                      # the course data, cut to fit the tiny model's 1024-token context
    small.mkdir()
    for name in ("seed_instructions.jsonl", "question_types.jsonl", "verbose_prompt.txt"):
        (small / name).write_text((sa.DATA_DIR / "self_align" / name).read_text())
    for name, keep in (("principles.jsonl", 2), ("exemplars.jsonl", 0), ("truthfulness_mc.jsonl", None),
                       ("adherence_prompts.jsonl", None)):
        lines = (sa.DATA_DIR / "self_align" / name).read_text().splitlines()
        rows = [json.loads(x) for x in lines]
        if name.startswith(("truthfulness", "adherence")):
            rows = [r for r in rows if r["split"] == "test"][:3]
        elif name == "exemplars.jsonl":
            rows = [{"id": "E1", "instruction": "Name a fruit.", "thought": "By P01 I answer.", "answer": "An apple."}]
        else:
            rows = rows[:keep]
        (small / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sa.json"
    main(["self-align", "--model", "tiny-random", "--instruct-prompts", "1", "--answer-tokens", "8",
          "--verbose-tokens", "8", "--data-dir", str(small), "--json", str(out), "--output", str(tmp_path / "run")])
    result = json.loads(out.read_text())
    assert sum(result["stage2"]["filter"].values()) == result["stage1"]["pool"] >= 24
    assert result["stage2"]["filter"]["kept"] == 2 and len(result["engrave_history"]) >= 1
    assert set(result["evaluation"]) == {"base", "principled", "engraved", "verbose"}
    assert all(0 <= ev["adherence"]["rate"] <= 1 for ev in result["evaluation"].values())
    assert all(0 <= ev["mc_true"]["accuracy"] <= 1 for ev in result["evaluation"].values())
    assert "stage 2 filter" in capsys.readouterr().out
