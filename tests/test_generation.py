import pytest
import torch

from alignlib.generation import diverse_beam_search, generate, response_mask_from_ids

pytestmark = pytest.mark.unit


def test_response_mask_keeps_tokens_through_first_eos():
    ids = torch.tensor([[5, 6, 2, 2, 2], [5, 6, 7, 8, 9], [2, 2, 2, 2, 2]])
    mask, finished = response_mask_from_ids(ids, eos=[2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert finished.tolist() == [True, False, True]


def test_generation_stops_at_eos(tiny):
    """Declare a token the sampler emits mid-response to be EOS: the response then ends right there."""
    model, tok = tiny
    free = generate(model, tok, ["Stop here"], max_new_tokens=12, seed=5)
    tokens = free.response_ids[0].tolist()
    k = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])  # first new token after the 1st
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = tokens[k]
    try:
        r = generate(model, tok, ["Stop here"], max_new_tokens=12, seed=5)  # same seed, same draws
    finally:
        model.generation_config.eos_token_id = old
    assert r.finished.tolist() == [True]
    assert r.response_lengths.tolist() == [k + 1]  # through the EOS token, inclusive
    assert r.response_ids[0, : k + 1].tolist() == tokens[: k + 1]
    assert r.response_ids.shape[1] == k + 1  # generation stopped right after EOS


def test_seed_reproducible_and_layout(tiny):
    model, tok = tiny
    a = generate(model, tok, ["x", "yy"], max_new_tokens=6, seed=3, num_return_sequences=2)
    b = generate(model, tok, ["x", "yy"], max_new_tokens=6, seed=3, num_return_sequences=2)
    assert a.responses == b.responses
    assert a.prompts == ["x", "x", "yy", "yy"]
    assert a.input_ids.shape == a.attention_mask.shape == a.response_mask.shape
    assert torch.all(a.response_mask[:, : a.prompt_width] == 0)
    assert torch.all(a.response_mask <= a.attention_mask)


def test_batch_size_chunks_give_same_greedy_output(tiny):
    model, tok = tiny
    prompts = ["one", "two two", "three three three"]
    whole = generate(model, tok, prompts, max_new_tokens=6, do_sample=False)
    chunked = generate(model, tok, prompts, max_new_tokens=6, do_sample=False, batch_size=2)
    assert whole.responses == chunked.responses


def test_chat_template_is_applied(tiny):
    model, tok = tiny
    r = generate(model, tok, ["hello"], max_new_tokens=2, do_sample=False)
    prompt_text = tok.decode(r.input_ids[0, : r.prompt_width][r.attention_mask[0, : r.prompt_width].bool()])
    assert prompt_text.startswith("<|im_start|>user\nhello<|im_end|>") and prompt_text.endswith("assistant\n")


def test_bad_prompts_are_clear_errors(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="prompts is empty"):
        generate(model, tok, [])
    with pytest.raises(TypeError, match="wrap it"):
        generate(model, tok, "just a string")
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tok, ["a"], temperature=0.0)


@pytest.mark.parametrize("chat", [True, False])
def test_an_empty_or_lone_surrogate_prompt_is_named_by_its_index(tiny, chat):
    model, tok = tiny
    with pytest.raises(ValueError, match=r"prompts\[1\] is an empty string"):
        generate(model, tok, ["Hello", ""], max_new_tokens=2, chat=chat)
    with pytest.raises(ValueError, match=r"prompts\[2\] is not valid Unicode text: '\\ud800' at position 3"):
        generate(model, tok, ["Hello", "Hi", "abc\ud800"], max_new_tokens=2, chat=chat)


def test_diverse_beam_search_gives_distinct_candidates(tiny):
    model, tok = tiny
    r = diverse_beam_search(model, tok, ["Tell me", "Why"], num_beams=4, num_groups=4, max_new_tokens=6,
                            diversity_penalty=2.0)
    assert len(r) == 8 and r.prompts[:4] == ["Tell me"] * 4
    for i in (0, 4):
        first_tokens = r.response_ids[i:i + 4, 0].tolist()
        assert len(set(first_tokens)) == 4, "groups must not pick the same first token under the penalty"
    with pytest.raises(ValueError, match="multiple"):
        diverse_beam_search(model, tok, ["a"], num_beams=4, num_groups=3)


def test_diverse_beam_search_one_group_is_beam_search(tiny):
    """With one group and one beam, diverse beam search is greedy decoding."""
    model, tok = tiny
    greedy = generate(model, tok, ["Tell me"], max_new_tokens=6, do_sample=False)
    beam = diverse_beam_search(model, tok, ["Tell me"], num_beams=1, num_groups=1, max_new_tokens=6)
    assert beam.responses == greedy.responses


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": float("nan")}, "temperature must be a finite number > 0"),
    ({"temperature": 0.0}, "temperature must be a finite number > 0"),
    ({"max_new_tokens": 2_000_000}, "exceeds the model's context of 1024 tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
    ({"num_return_sequences": 0}, "num_return_sequences must be an integer >= 1"),
    ({"top_p": float("nan")}, r"top_p must be a number in \(0, 1\]"),
    ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\]"),
    ({"top_p": 2.0}, r"top_p must be a number in \(0, 1\]"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
])
def test_bad_sampling_arguments_are_refused_before_decoding(kwargs, message, tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match=message):
        generate(model, tok, ["Hello"], **kwargs)


def test_a_prompt_longer_than_the_context_raises_instead_of_decoding(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="shorten the prompt"):
        generate(model, tok, ["x" * 1100], max_new_tokens=4, chat=False)


def _repeats(out, i, n):
    """Whether a response n-gram of row i repeats an n-gram earlier in its prompt or response."""
    ids = out.input_ids[i][out.attention_mask[i].bool()].tolist()
    start = len(ids) - int(out.response_lengths[i])
    grams = [tuple(ids[j - n + 1:j + 1]) for j in range(n - 1, len(ids))]      # gram k ends at token k + n - 1
    return any(grams[k] in grams[:k] for k in range(max(0, start - n + 1), len(grams)))


@pytest.mark.unit
def test_no_repeat_ngram_size_bans_repeated_ngrams(tiny):
    model, tok = tiny
    prompts = ["Tell me a story.", "Count to ten."]
    loose = generate(model, tok, prompts, max_new_tokens=40, do_sample=False)
    assert any(_repeats(loose, i, 2) for i in range(2))                    # the random model loops when left alone
    for kwargs in ({"do_sample": False}, {"temperature": 0.7, "seed": 0}, {"temperature": 0.7, "row_seeds": [1, 2]}):
        out = generate(model, tok, prompts, max_new_tokens=40, no_repeat_ngram_size=2, **kwargs)
        for i in range(2):
            assert not _repeats(out, i, 2), kwargs
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        generate(model, tok, prompts, no_repeat_ngram_size=-1)
