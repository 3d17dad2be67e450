"""The bench command (smoke runs on the tiny model, no timing assertions) and the fast decoding path of
``generate``: the same greedy output as transformers' ``model.generate``, with and without LoRA."""
import argparse
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, MistralConfig, Qwen2Config, Qwen3Config
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from alignlib.bench import throughput as bench
from alignlib.commands.bench import bench_arguments
from alignlib.engine import decode
from alignlib.engine.decode import fast_decode_supported, sample_next_token
from alignlib.generation import format_prompts, generate
from alignlib.models import tiny_tokenizer

from test_packed_linear import trained_lora  # tests/ is on the path, as for grading_helpers

PROMPTS = ["Hello there", "x", "Tell me a joke about cats and dogs, please", "Why?"]


def bench_args(*argv):
    parser = argparse.ArgumentParser()
    bench_arguments(parser)
    return parser.parse_args(list(argv))


def same_rollout(a, b):
    return (torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
            and torch.equal(a.response_mask, b.response_mask) and torch.equal(a.finished, b.finished)
            and a.responses == b.responses and a.prompt_width == b.prompt_width)


@pytest.mark.pipeline
def test_bench_quick_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    report = bench.run(bench_args("--model", "tiny-random", "--quick", "--in-process", "--hf-baseline",
                                  "--json", str(out)))
    assert set(report["results"]) == set(bench.MEASUREMENTS + bench.HF_BASELINES)
    assert report["matmul_peak"]["gflops"] > 0
    for name, r in report["results"].items():
        for key in ("tokens", "time_s", "tokens_per_s", "gflops", "peak_fraction", "peak_mb", "flops_per_token"):
            assert r[key] > 0, (name, key)
    assert report["results"]["generate/batch16"]["tokens"] > report["results"]["generate/batch1"]["tokens"]
    full, lora = report["results"]["train/full"], report["results"]["train/lora"]
    assert full["flops_per_token"] == 1.5 * lora["flops_per_token"]  # 6(N+DV) vs 4(N+DV)
    assert json.loads(out.read_text())["results"].keys() == report["results"].keys()


@pytest.mark.pipeline
def test_bench_isolated_worker_process():
    report = bench.run(bench_args("--model", "tiny-random", "--quick", "--measure", "train/full"))
    assert report["isolated"] and list(report["results"]) == ["train/full"]
    assert report["results"]["train/full"]["tokens_per_s"] > 0 and report["results"]["train/full"]["peak_mb"] > 0


@pytest.mark.unit
def test_bench_prefix_cache_against_recompute(capsys):
    report = bench.run(bench_args("--model", "tiny-random", "--quick", "--in-process", "--measure", *bench.PREFIX[:2]))
    cached, full = report["results"]["prefix/cached"], report["results"]["prefix/recompute"]
    assert cached["requests"] == full["requests"] == 16
    assert full["tokens"] == 16 * full["prefix_tokens"] + (cached["tokens"] - cached["prefix_tokens"])
    assert "recomputing it per request takes" in capsys.readouterr().out


@pytest.mark.unit
def test_lecture_05_prefix_benchmark_uses_the_constitution_and_held_out_answers():
    prefix, suffixes = bench.cai_requests()          # too long for the tiny model's context: built, not run
    assert prefix.count("Critique request:") == 4 and len(suffixes) == 16
    assert all(s.startswith("Human: ") and s.endswith("Critique:") for s in suffixes)


@pytest.mark.unit
def test_flop_counts_exclude_embeddings_and_adapters(tiny, tiny_lora):
    model, _ = tiny
    lora_model, _ = tiny_lora
    counts = bench.flop_counts(model)
    assert counts == bench.flop_counts(lora_model)
    embed = model.get_input_embeddings().weight.numel()
    assert counts["non_embedding"] == sum(p.numel() for p in model.parameters()) - embed  # tied head
    assert counts["forward_per_token"] == 2 * (counts["non_embedding"] + counts["lm_head"])


# ---------------------------------------------------------------- fast decoding == model.generate (greedy)

@pytest.mark.unit
def test_fast_greedy_matches_hf_generate(tiny):
    model, tok = tiny
    assert fast_decode_supported(model)
    fast = generate(model, tok, PROMPTS, max_new_tokens=16, do_sample=False)
    slow = generate(model, tok, PROMPTS, max_new_tokens=16, do_sample=False, fast=False)
    assert same_rollout(fast, slow)
    raw_fast = generate(model, tok, PROMPTS, max_new_tokens=8, do_sample=False, chat=False)
    raw_slow = generate(model, tok, PROMPTS, max_new_tokens=8, do_sample=False, chat=False, fast=False)
    assert same_rollout(raw_fast, raw_slow)


@pytest.mark.unit
def test_fast_greedy_matches_hf_generate_with_eos(tiny):
    """Rows that stop early are padded, and decoding ends when every row has stopped, as in generate."""
    model, tok = tiny
    free = generate(model, tok, PROMPTS, max_new_tokens=10, do_sample=False)
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = int(free.response_ids[0, 2])  # a token row 0 emits at step 3
    try:
        fast = generate(model, tok, PROMPTS, max_new_tokens=10, do_sample=False)
        slow = generate(model, tok, PROMPTS, max_new_tokens=10, do_sample=False, fast=False)
    finally:
        model.generation_config.eos_token_id = old
    assert fast.finished[0] and fast.response_lengths[0] <= 3
    assert same_rollout(fast, slow)


@pytest.mark.unit
def test_fast_greedy_matches_hf_generate_with_lora(tiny_lora):
    model, tok = tiny_lora
    model = trained_lora(model)  # a trained-looking adapter: B != 0, so LoRA changes the outputs
    assert fast_decode_supported(model)
    fast = generate(model, tok, PROMPTS, max_new_tokens=12, do_sample=False)
    slow = generate(model, tok, PROMPTS, max_new_tokens=12, do_sample=False, fast=False)
    assert same_rollout(fast, slow)
    with model.disable_adapter():
        base_fast = generate(model, tok, PROMPTS, max_new_tokens=12, do_sample=False)
        base_slow = generate(model, tok, PROMPTS, max_new_tokens=12, do_sample=False, fast=False)
    assert same_rollout(base_fast, base_slow) and base_fast.responses != fast.responses


@pytest.mark.unit
@pytest.mark.parametrize("prefill_tokens", [2048, 50, 1])
def test_fast_greedy_with_a_shared_prefix_and_several_samples_per_prompt(tiny, monkeypatch, prefill_tokens):
    """The chat template's common start is encoded once; with k samples per prompt the rest is copied k times.
    The prompts' own tokens are encoded without padding, all in one sequence, or in several (a small
    ``PREFILL_TOKENS``; 1 puts each prompt in a sequence of its own)."""
    monkeypatch.setattr(decode, "PREFILL_TOKENS", prefill_tokens)
    model, tok = tiny
    ids = tok(format_prompts(tok, PROMPTS), add_special_tokens=False).input_ids
    assert len({tuple(i[:3]) for i in ids}) == 1                              # the prompts share their start
    seeds = list(range(len(PROMPTS)))                # per-row random streams: both paths draw the same numbers
    fast = generate(model, tok, PROMPTS, max_new_tokens=10, num_return_sequences=2, row_seeds=seeds)
    slow = generate(model, tok, PROMPTS, max_new_tokens=10, num_return_sequences=2, row_seeds=seeds, fast=False)
    assert same_rollout(fast, slow) and fast.responses[0] != fast.responses[1]


@pytest.mark.model
def test_fast_greedy_matches_hf_generate_on_the_default_model(smol):
    """SmolLM2-135M-Instruct with its weights packed for oneDNN and its system turn encoded once (``fast_decode``)
    decodes the bench's 16 prompts greedily to the same tokens as ``model.generate``."""
    model, tok = smol
    fast = generate(model, tok, bench.PROMPTS, max_new_tokens=24, do_sample=False)
    slow = generate(model, tok, bench.PROMPTS, max_new_tokens=24, do_sample=False, fast=False)
    assert same_rollout(fast, slow)


@pytest.mark.unit
@pytest.mark.parametrize("config_class", [Qwen2Config, Qwen3Config, MistralConfig])
def test_fast_greedy_matches_hf_generate_other_architectures(config_class):
    tok = tiny_tokenizer()
    config = config_class(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, sliding_window=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    assert fast_decode_supported(model)
    fast = generate(model, tok, PROMPTS, max_new_tokens=10, do_sample=False)
    slow = generate(model, tok, PROMPTS, max_new_tokens=10, do_sample=False, fast=False)
    assert same_rollout(fast, slow)


@pytest.mark.unit
def test_unsupported_architecture_falls_back_to_hf_generate():
    tok = tiny_tokenizer()
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=128,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    assert not fast_decode_supported(model)
    r = generate(model, tok, PROMPTS[:2], max_new_tokens=4, do_sample=False)
    assert r.response_ids.shape == (2, 4)


@pytest.mark.unit
def test_fast_sampling_is_seeded_and_expands_samples_per_prompt(tiny):
    model, tok = tiny
    a = generate(model, tok, PROMPTS[:2], max_new_tokens=8, seed=1, num_return_sequences=3)
    b = generate(model, tok, PROMPTS[:2], max_new_tokens=8, seed=1, num_return_sequences=3)
    slow = generate(model, tok, PROMPTS[:2], max_new_tokens=8, seed=1, num_return_sequences=3, fast=False)
    assert same_rollout(a, b)
    assert a.input_ids.shape[0] == slow.input_ids.shape[0] == 6 and a.prompts == slow.prompts
    assert torch.equal(a.input_ids[:, :a.prompt_width], slow.input_ids[:, :slow.prompt_width])
    assert len(set(a.responses[:3])) > 1  # the 3 samples of a prompt are drawn independently


# ---------------------------------------------------------------- the sampler

@pytest.mark.unit
def test_sampler_draws_from_the_softmax():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]])).expand(40000, 5)
    torch.manual_seed(0)
    draws = sample_next_token(logits)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]), atol=0.01)
    assert freq[4] == 0  # probability 0 is never drawn
    assert torch.equal(sample_next_token(logits[:2], do_sample=False), torch.tensor([0, 0]))


@pytest.mark.unit
def test_sampler_filters_like_transformers_warpers():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    for top_k, top_p, temp in [(5, 1.0, 1.0), (0, 0.8, 0.7), (10, 0.5, 1.3)]:
        hf = TemperatureLogitsWarper(temp)(None, logits.clone())
        if top_k:
            hf = TopKLogitsWarper(top_k)(None, hf)
        hf = TopPLogitsWarper(top_p)(None, hf) if top_p < 1 else hf
        allowed = torch.isfinite(hf)                                                  # (4, 50)
        draws = sample_next_token(logits.repeat(1000, 1), True, temp, top_k, top_p).view(1000, 4).T  # (4, 1000)
        assert allowed.gather(1, draws).all()                                         # only allowed tokens
        seen = torch.zeros_like(allowed).scatter_(1, draws, True)
        assert torch.equal(seen, allowed)                                             # and all of them
