"""Prompt-masked SFT: layout of the encoded batch, the loss ignores prompts, and fine-tuning learns."""
import pytest
import torch

from alignlib.sft import SFTConfig, encode_sft, mean_nll, sft_loss, train_sft


@pytest.mark.unit
def test_encode_layout_masks_prompt_and_appends_eos(tiny):
    _, tok = tiny
    batch = encode_sft(tok, ["hi there", "a"], ["yes", "no way"], chat=False, add_eos=[True, False])
    P = batch.prompt_width
    assert P == len("hi there")  # byte tokenizer: one token per character
    assert batch.input_ids.shape == (2, P + len("no way"))
    # row 0: prompt fills [0, P), then "yes" + EOS, then right padding
    assert batch.response_mask[0].tolist() == [0] * P + [1] * 4 + [0] * 2
    assert batch.input_ids[0, P + 3].item() == tok.eos_token_id
    # row 1: left-padded one-character prompt, response without EOS runs to the last column
    assert batch.attention_mask[1].tolist() == [0] * (P - 1) + [1] * 7
    assert batch.response_mask[1, P:].tolist() == [1] * 6
    assert batch.logits_to_keep == batch.input_ids.shape[1] - P + 1


@pytest.mark.unit
def test_encode_rejects_bad_input(tiny):
    _, tok = tiny
    with pytest.raises(ValueError, match="same length"):
        encode_sft(tok, ["a", "b"], ["x"], chat=False)
    with pytest.raises(ValueError, match="max_length"):
        encode_sft(tok, ["abc"], ["defgh"], chat=False, max_length=5)
    with pytest.raises(ValueError, match="empty"):
        encode_sft(tok, ["abc"], [""], chat=False, add_eos=False)
    with pytest.raises(ValueError, match="add_eos"):
        encode_sft(tok, ["a", "b"], ["x", "y"], chat=False, add_eos=[True])


@pytest.mark.unit
def test_loss_does_not_depend_on_the_prompt_targets(tiny):
    """Changing the prompt changes the context but a prompt token is never a target: the loss equals the
    mean NLL of response tokens computed by hand from full logits."""
    model, tok = tiny
    batch = encode_sft(tok, ["abc", "hello"], ["xy", "z"], chat=False)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    mask = batch.response_mask[:, 1:].float()
    expected = -(lp * mask).sum() / mask.sum()
    with torch.no_grad():
        assert torch.allclose(sft_loss(model, batch), expected, atol=1e-5)


@pytest.mark.learning
def test_sft_learns_the_responses(tiny_lora):
    model, tok = tiny_lora
    prompts, responses = ["abc", "xyz", "hello"] * 4, ["def", "uvw", "world"] * 4
    before = mean_nll(model, tok, prompts, responses, chat=False)
    history = train_sft(model, tok, prompts, responses, SFTConfig(epochs=6, batch_size=4, lr=1e-2, chat=False))
    after = mean_nll(model, tok, prompts, responses, chat=False)
    assert len(history) == 6 * 3
    assert after < 0.5 * before, (before, after)
