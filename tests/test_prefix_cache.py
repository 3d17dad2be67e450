"""The shared prefix's keys and values, computed once, give what a full recompute gives."""
import pytest
import torch

from alignlib.prefix_cache import PrefixCache

pytestmark = pytest.mark.unit

PREFIX = "Principles: be honest, be helpful, decline harm.\nExample: Q: hi A: hello.\n"
SUFFIXES = ["Q: name a fruit A:", "Q: is the sky green? Answer True or False:", "Q: 2+2 A:"]


def full_logits(model, tok, texts):
    out = []
    for t in texts:
        ids = tok(PREFIX, add_special_tokens=False).input_ids + tok(t, add_special_tokens=False).input_ids
        with torch.no_grad():
            out.append(model(input_ids=torch.tensor([ids])).logits[0].float())
    return out


def test_last_logits_equal_a_full_recompute(tiny):
    model, tok = tiny
    cache = PrefixCache(model, tok, PREFIX)
    got = cache.last_logits(SUFFIXES)                                     # (3, V), suffixes of different lengths
    for row, full in zip(got, full_logits(model, tok, SUFFIXES)):
        torch.testing.assert_close(row, full[-1], atol=1e-4, rtol=1e-4)


def test_scores_equal_a_full_recompute(tiny):
    model, tok = tiny
    cache = PrefixCache(model, tok, PREFIX)
    continuations = [" apple", " False", " four, I think"]
    got = cache.score(SUFFIXES, continuations)
    for g, s, c in zip(got, SUFFIXES, continuations):
        head = tok(PREFIX, add_special_tokens=False).input_ids + tok(s, add_special_tokens=False).input_ids
        tail = tok(c, add_special_tokens=False).input_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([head + tail])).logits[0].float(), -1)
        want = sum(logp[len(head) - 1 + j, t].item() for j, t in enumerate(tail))
        assert g.item() == pytest.approx(want, abs=1e-3)


def test_greedy_generation_equals_a_full_recompute(tiny):
    model, tok = tiny
    cache = PrefixCache(model, tok, PREFIX)
    ids = tok(PREFIX, add_special_tokens=False).input_ids + tok(SUFFIXES[0], add_special_tokens=False).input_ids
    full = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert cache.generate(SUFFIXES[0], max_new_tokens=8) == tok.decode(full[0, len(ids):], skip_special_tokens=True)
    assert cache.generate(SUFFIXES[0], max_new_tokens=8) == cache.generate(SUFFIXES[0], max_new_tokens=8)  # reusable


def test_bad_input(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="prefix is empty"):
        PrefixCache(model, tok, "")
    cache = PrefixCache(model, tok, PREFIX)
    with pytest.raises(ValueError, match="list of strings"):
        cache.last_logits("one string")
    with pytest.raises(ValueError, match="one of each"):
        cache.score(["a"], ["b", "c"])
