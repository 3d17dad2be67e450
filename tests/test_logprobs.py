import math

import pytest
import torch

from alignlib.generation import generate
from alignlib.logprobs import (entropy_from_logits, gather_logprobs, length_normalized_logprob, masked_mean,
                               score_responses, sequence_logprob, token_logprobs, token_logprobs_from_logits)

pytestmark = pytest.mark.unit


def manual_token_logprobs(logits, ids):
    """Direct loops over softmax, the definition itself."""
    B, T, V = logits.shape
    out = torch.zeros(B, T)
    for b in range(B):
        for t in range(1, T):
            probs = torch.softmax(logits[b, t - 1].double(), -1)
            out[b, t] = math.log(probs[ids[b, t]].item())
    return out


def test_token_logprobs_match_manual_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g) * 3
    ids = torch.randint(0, 11, (3, 6), generator=g)
    got = token_logprobs_from_logits(logits, ids)
    assert got.shape == (3, 6)
    assert torch.allclose(got, manual_token_logprobs(logits, ids), atol=1e-5)
    assert torch.all(got[:, 0] == 0)


def test_sequence_scores_match_manual_sums():
    lp = torch.tensor([[0.0, -1.0, -2.0, -3.0], [0.0, -0.5, -0.5, 0.0]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]])
    assert torch.allclose(sequence_logprob(lp, mask), torch.tensor([-6.0, -0.5]))
    assert torch.allclose(length_normalized_logprob(lp, mask), torch.tensor([-2.0, -0.5]))
    assert torch.allclose(length_normalized_logprob(lp, mask, alpha=0.0), torch.tensor([-6.0, -0.5]))
    assert torch.allclose(length_normalized_logprob(lp, mask, alpha=0.5), torch.tensor([-6 / math.sqrt(3), -0.5]))
    assert masked_mean(lp, mask).item() == pytest.approx(-6.5 / 4)


def test_entropy_of_uniform_and_one_hot():
    uniform = torch.zeros(1, 1, 8)
    peaked = torch.tensor([[[100.0] + [0.0] * 7]])
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(8), abs=1e-6)
    assert entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-6)


def test_left_padding_does_not_change_logprobs(tiny):
    """The same prompt+response scored alone and inside a left-padded batch gives the same numbers."""
    model, tok = tiny
    batch = generate(model, tok, ["Hi", "A much longer prompt than the first one"], max_new_tokens=6, do_sample=False)
    assert batch.attention_mask[0, 0] == 0, "the short prompt should be left-padded"
    alone = generate(model, tok, ["Hi"], max_new_tokens=6, do_sample=False)
    lp_batch = token_logprobs(model, batch.input_ids, batch.attention_mask)
    lp_alone = token_logprobs(model, alone.input_ids, alone.attention_mask)
    # compare the real tokens of row 0 (batch) with the single row, right-aligned on the prompt
    pad = batch.prompt_width - alone.prompt_width
    n = int(alone.attention_mask.sum())
    real_b = lp_batch[0, pad:pad + n]
    assert torch.equal(batch.input_ids[0, pad:pad + n], alone.input_ids[0, :n])
    assert torch.allclose(real_b[1:], lp_alone[0, 1:n], atol=1e-4)


def test_score_responses_micro_batches_agree(tiny):
    model, tok = tiny
    r = generate(model, tok, ["a", "bb", "ccc"], max_new_tokens=5, seed=0)
    full = score_responses(model, r.input_ids, r.attention_mask, r.response_mask, batch_size=16)
    small = score_responses(model, r.input_ids, r.attention_mask, r.response_mask, batch_size=1)
    assert torch.allclose(full["logprob"], small["logprob"], atol=1e-5)
    assert torch.all(full["logprob"] < 0)


def test_shape_mismatch_and_empty_mask_are_clear_errors():
    with pytest.raises(ValueError, match="shapes must match"):
        sequence_logprob(torch.zeros(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="empty response mask"):
        length_normalized_logprob(torch.zeros(2, 3), torch.tensor([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="disagree"):
        gather_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_logprobs_from_kept_logits_match_the_full_computation(tiny):
    """logits_to_keep=L computes the LM head on the last L positions only; the response log-probs are the same."""
    model, tok = tiny
    r = generate(model, tok, ["a", "a longer prompt"], max_new_tokens=5, seed=0)
    full = model(input_ids=r.input_ids, attention_mask=r.attention_mask).logits
    keep = r.input_ids.shape[1] - r.prompt_width + 1
    tail = model(input_ids=r.input_ids, attention_mask=r.attention_mask, logits_to_keep=keep).logits
    assert tail.shape[1] == keep
    lp_full = token_logprobs_from_logits(full, r.input_ids)
    lp_tail = token_logprobs_from_logits(tail, r.input_ids)
    m = r.response_mask.bool()
    assert torch.allclose(lp_full[m], lp_tail[m], atol=1e-5)
    assert torch.all(lp_tail[:, : r.prompt_width] == 0)


def test_divergence_from_reference_reads_the_sampling_temperature(tiny, fresh_tiny):
    from alignlib.logprobs import divergence_from_reference

    model, tok = tiny
    torch.manual_seed(0)
    other, _ = fresh_tiny()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))                      # a reference that differs from the policy
    ids = tok(["the film was good"], return_tensors="pt").input_ids
    mask = torch.ones_like(ids)
    resp = torch.zeros_like(ids)
    resp[:, 3:] = 1                                                 # the last tokens are the response
    for t in (1.0, 0.7):
        out = divergence_from_reference(model, ids, mask, resp, ref_model=other, temperature=t)
        with torch.no_grad():
            lp = manual_token_logprobs(model(ids).logits / t, ids)
            ref = manual_token_logprobs(other(ids).logits / t, ids)
        assert torch.allclose(out["kl"], ((lp - ref) * resp).sum(-1), atol=1e-4)
    cold = divergence_from_reference(model, ids, mask, resp, ref_model=other, temperature=0.7)["kl"]
    assert not torch.allclose(out["kl"], divergence_from_reference(model, ids, mask, resp, ref_model=other)["kl"])
    assert torch.equal(cold, out["kl"])
    with pytest.raises(ValueError, match="temperature"):
        divergence_from_reference(model, ids, mask, resp, ref_model=other, temperature=0)
