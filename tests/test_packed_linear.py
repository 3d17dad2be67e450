"""oneDNN-packed linear layers (``alignlib.engine.packed_linear``) and the shared-prefix prefill of ``fast_decode``:
each must compute what the modules compute, LoRA included, and fall back to calling them where it cannot."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Qwen2Config

from alignlib.engine.decode import _causal_lm, _linears, shared_prefix_length
from alignlib.engine.packed_linear import PackedLinears, effective_weight, packing_available
from alignlib.models import tiny_tokenizer

pytestmark = pytest.mark.unit

needs_onednn = pytest.mark.skipif(not packing_available(torch.zeros(1)), reason="torch built without oneDNN")


def trained_lora(model):
    """Give every adapter a B != 0, as after training, so LoRA changes the outputs."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def outputs(linear, groups, x):
    return [linear(x, *group) if len(group) > 1 else (linear(x, *group),) for group in groups]


def called(groups, x):
    return [tuple(m(x) for m in group) for group in groups]


def assert_close(got, want):
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@needs_onednn
def test_packed_groups_equal_the_modules_with_and_without_lora(tiny_lora):
    model, _ = tiny_lora
    model = trained_lora(model).eval()
    groups = _linears(_causal_lm(model))
    x = torch.randn(3, 5, groups[0][0].in_features)                           # (b, q, D)
    packed = PackedLinears(groups[:1], rows=15)                               # q, k, v as one product
    assert len(packed) == 1
    with torch.no_grad():
        assert_close(outputs(packed, groups[:1], x), called(groups[:1], x))
        with model.disable_adapter():                                         # the adapter is folded in or not
            base = PackedLinears(groups[:1], rows=15)
            assert_close(outputs(base, groups[:1], x), called(groups[:1], x))
        assert not torch.allclose(base(x, *groups[0])[0], packed(x, *groups[0])[0], atol=1e-3)


@needs_onednn
def test_biases_are_packed_with_their_weights():
    tok = tiny_tokenizer()
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    groups = _linears(model)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None          # Qwen2: q, k, v biased; o not
    with torch.no_grad():
        torch.nn.init.normal_(attn.q_proj.bias)
        packed = PackedLinears(groups, rows=2)
        x = torch.randn(2, 64)
        assert len(packed) == len(groups)
        assert_close(outputs(packed, groups[:2], x), called(groups[:2], x))


def test_what_cannot_be_folded_is_called_as_it_is(fresh_tiny):
    dora = get_peft_model(fresh_tiny()[0], LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    q_dora = _causal_lm(dora).model.layers[0].self_attn.q_proj
    assert effective_weight(q_dora) is None                                   # DoRA is not W + BA
    bf16 = torch.nn.Linear(8, 4).to(torch.bfloat16)
    assert not packing_available(bf16.weight)                                 # CPU bf16: never packed
    x = torch.randn(2, q_dora.in_features)
    for group in [(q_dora,), (bf16,)]:
        packed = PackedLinears([group], rows=2)
        assert len(packed) == 0
        inp = x if group[0] is q_dora else torch.randn(2, 8, dtype=torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(packed(inp, *group), group[0](inp))


def test_shared_prefix_length_of_left_padded_prompts():
    pad = 0
    ids = torch.tensor([[pad, 5, 6, 7, 8],
                        [5, 6, 7, 9, 10],
                        [pad, pad, 5, 6, 7]])
    real = ids != pad
    assert shared_prefix_length(ids, real) == 2                               # 5 6; the shortest keeps its 7
    assert shared_prefix_length(ids[:2], real[:2]) == 3                       # 5 6 7
    assert shared_prefix_length(ids[:1], real[:1]) == 0                       # one prompt: nothing to share
    other = torch.tensor([[5, 6], [4, 6]])
    assert shared_prefix_length(other, other != pad) == 0
