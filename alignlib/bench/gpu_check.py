"""GPU throughput of the course's update steps: ``python -m alignlib gpu-check``.

The model is a decoder of Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 query and 2 key/value heads, MLP
4864, vocabulary 151936, tied embeddings; about 494M parameters) built from its config with **random** weights:
nothing is downloaded, and throughput does not depend on the weights' values. Full fine-tuning in bf16 (bf16
weights and AdamW states, no fp32 master copy; ``fused=True`` on CUDA), SDPA attention, TF32 matmuls allowed.

Measurements (random token ids; each is timed after its warm-up steps, the table shows the median step):

- ``sft``:  one optimizer step (forward, cross-entropy on every next token, backward, AdamW) on B x T tokens.
- ``rrhf``: one RRHF update: P prompts x k candidates of T tokens in one forward, length-normalised log-probs
  of each candidate's second half (the "response"), ``alignlib.rrhf.rrhf_loss`` with random rewards, backward,
  AdamW. All P*k*T tokens count.
- ``ppo``:  one PPO minibatch step: policy forward on B x T tokens, per-token log-probs,
  ``alignlib.ppo.clipped_policy_loss`` with random old log-probs and advantages on the second half of each
  sequence, a value head (Linear(hidden, 1) on the last hidden state) with ``alignlib.ppo.clipped_value_loss``,
  backward, AdamW. B*T tokens count.
- ``rollout``: ``model.generate`` with a KV cache (sampling, top_k=0, exactly N new tokens) for G prompts of
  P_len tokens. Only generated tokens count: G*N per call; the prefill is in the time, not in the count.

MFU (model FLOPs utilisation; Chowdhery et al. 2022, "PaLM", Appendix B):

    FLOPs per token = 6 N + 12 L H T          MFU = FLOPs per token x tokens/s / peak FLOP/s

with N the parameters that do matmuls, counted once: the transformer blocks plus the LM head's V x H (the tied
embedding lookup costs no FLOPs, the head's matmul does), L layers, H the hidden size (= heads x head dim) and T
the sequence length: 6 = forward 2 + backward 4 per parameter, 12 L H T the attention scores and their weighted
sum, forward and backward, counted in full (as PaLM does) although causal kernels skip half. Recomputation under
``--grad-checkpointing`` is not counted: MFU counts the model's FLOPs, not the hardware's. The rollout row
reports 2 N x tokens/s / peak for information only (decoding is bound by memory bandwidth, not FLOPs).

Peak bf16 dense FLOP/s from the device name: H100 SXM and H200 989e12, A100 312e12; otherwise give
``--peak-tflops`` (MFU is null without it). Goal: a training MFU of 35% or more on one H100/H200.

Without a CUDA device the command prints that it needs one and exits 0; ``--cpu-smoke`` instead runs every code
path on the CPU in fp32 with a tiny config and tiny shapes (a test, not a measurement).
"""
from __future__ import annotations

import gc
import json
import platform
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096,
                  bos_token_id=151643, eos_token_id=151643)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, tie_word_embeddings=True, max_position_embeddings=256, bos_token_id=0, eos_token_id=1)

DEFAULTS = {  # on a GPU (estimated: a few minutes, under 80 GiB on one H100/H200) and with --cpu-smoke
    "gpu": dict(sft_batch=16, sft_len=1024, rrhf_prompts=4, rrhf_k=4, rrhf_len=512, ppo_batch=16, ppo_len=1024,
                rollout_batch=64, prompt_len=128, new_tokens=256, warmup=3, steps=10, rollout_warmup=1,
                rollout_steps=3),
    "smoke": dict(sft_batch=2, sft_len=32, rrhf_prompts=2, rrhf_k=2, rrhf_len=32, ppo_batch=2, ppo_len=32,
                  rollout_batch=2, prompt_len=8, new_tokens=4, warmup=1, steps=1, rollout_warmup=1, rollout_steps=1),
}
MEASUREMENTS = ("sft", "rrhf", "ppo", "rollout")
PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0))  # bf16 dense, by substring of the device name


def peak_tflops(device_name: str) -> float | None:
    """The bf16 dense peak of a known GPU in TFLOP/s; None when unknown (H100 PCIe/NVL have lower peaks)."""
    if "H100" in device_name and ("PCIe" in device_name or "NVL" in device_name):
        return None
    return next((peak for key, peak in PEAK_TFLOPS if key in device_name), None)


def count_params(model) -> dict:
    """Matmul parameters, each counted once: blocks (everything but the embeddings) + the LM head's V x H."""
    from .throughput import flop_counts

    f = flop_counts(model)
    return {"blocks": f["non_embedding"], "head": f["lm_head"], "total": f["non_embedding"] + f["lm_head"]}


def flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward), PaLM Appendix B: 6 N + 12 L H T."""
    return 6 * n_params + 12 * n_layers * hidden * seq_len


def build_model(config_kwargs: dict, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**config_kwargs)
    with torch.device(device):  # initialise directly on the device: no 0.5B-parameter copy from the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    return model.train()


def timed(fn, warmup: int, steps: int, device: torch.device) -> list[float]:
    """Seconds of each of ``steps`` calls of ``fn`` after ``warmup`` untimed ones, the device synchronised."""
    from .throughput import _timed

    return _timed(lambda rep: fn(), warmup + steps, device)[warmup:]


def second_half_mask(n: int, length: int, device) -> torch.Tensor:
    """(n, length) float mask of the "response": the second half of every sequence."""
    mask = torch.zeros(n, length, device=device)
    mask[:, length // 2:] = 1.0
    return mask


def make_steps(model, decoder, value_head, optimizer, shapes: dict, device: torch.device) -> dict:
    """Per measurement: (step function, tokens per step, T of the attention term (None: rollout), shape dict)."""
    from ..logprobs import length_normalized_logprob, token_logprobs_from_logits
    from ..ppo import PPOConfig, clipped_policy_loss, clipped_value_loss
    from ..rrhf import rrhf_loss

    V = model.config.vocab_size
    s = shapes

    def forward(ids):  # ids (B, T) -> last hidden state (B, T, H), logits (B, T, V)
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
        return hidden, model.lm_head(hidden)

    def update(loss):
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    B, T = s["sft_batch"], s["sft_len"]
    sft_ids = torch.randint(V, (B, T), device=device)                            # (B, T)

    def sft():
        _, logits = forward(sft_ids)                                             # (B, T, V)
        update(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), sft_ids[:, 1:].flatten()))

    P, k, Tr = s["rrhf_prompts"], s["rrhf_k"], s["rrhf_len"]
    rrhf_ids = torch.randint(V, (P * k, Tr), device=device)                      # (P*k, T)
    rrhf_mask = second_half_mask(P * k, Tr, device)                              # (P*k, T)
    rewards = torch.randn(P, k, device=device)                                   # (P, k)

    def rrhf():
        _, logits = forward(rrhf_ids)                                            # (P*k, T, V)
        lp = token_logprobs_from_logits(logits, rrhf_ids)                        # (P*k, T)
        scores = length_normalized_logprob(lp, rrhf_mask).view(P, k)             # (P, k)
        loss, _ = rrhf_loss(scores, -scores, rewards)                            # alpha = 1: nll = -p
        update(loss / P)                                                         # the trainer's mean over queries

    Bp, Tp = s["ppo_batch"], s["ppo_len"]
    ppo_ids = torch.randint(V, (Bp, Tp), device=device)                          # (B, T)
    ppo_mask = second_half_mask(Bp, Tp, device)                                  # (B, T)
    old_logp = -torch.log(torch.tensor(float(V))) + 0.1 * torch.randn(Bp, Tp, device=device)  # ~ a random model's
    advantages, old_values, returns = torch.randn(3, Bp, Tp, device=device)      # (B, T) each

    def ppo():
        hidden, logits = forward(ppo_ids)                                        # (B, T, H), (B, T, V)
        logp = token_logprobs_from_logits(logits, ppo_ids)                       # (B, T)
        v = value_head(hidden).float().squeeze(-1)                               # (B, T): V after token t
        values = F.pad(v[:, :-1], (1, 0))                                        # (B, T): V before token t
        pg_loss, _ = clipped_policy_loss(logp, old_logp, advantages, ppo_mask)
        vf_loss, _ = clipped_value_loss(values, old_values, returns, ppo_mask)
        update(pg_loss + PPOConfig.vf_coef * vf_loss)

    G, Lp, N = s["rollout_batch"], s["prompt_len"], s["new_tokens"]
    prompts = torch.randint(V, (G, Lp), device=device)                           # (G, P_len)

    def rollout():
        model.eval()
        out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_k=0,
                             max_new_tokens=N, min_new_tokens=N, use_cache=True,
                             pad_token_id=model.config.eos_token_id)             # (G, P_len + N)
        model.train()
        assert out.shape == (G, Lp + N), f"generate returned {tuple(out.shape)}, expected {(G, Lp + N)}"

    return {"sft": (sft, B * T, T, {"B": B, "T": T}),
            "rrhf": (rrhf, P * k * Tr, Tr, {"P": P, "k": k, "T": Tr}),
            "ppo": (ppo, Bp * Tp, Tp, {"B": Bp, "T": Tp}),
            "rollout": (rollout, G * N, None, {"G": G, "P_len": Lp, "N": N})}


def print_table(results: dict) -> None:
    print(f"{'measurement':<12}{'shape':<26}{'median s':>10}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}")
    for name, r in results.items():
        shape = " ".join(f"{k}={v}" for k, v in r["shape"].items())
        if r["error"]:
            print(f"{name:<12}{shape:<26}  {r['error']}")
            continue
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        print(f"{name:<12}{shape:<26}{r['median_s']:>10.4f}{r['tokens_per_s']:>12,.0f}{r['tflops']:>10.1f}{mfu:>8}"
              f"{mem:>10}")


def main(args) -> dict | None:
    """``python -m alignlib gpu-check``: build the random model, run the measurements, print and write them."""
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print("gpu-check needs a CUDA GPU and none was found; nothing measured "
              "(--cpu-smoke runs the code paths on the CPU instead).")
        return None
    import transformers

    shapes = {key: default if getattr(args, key) is None else getattr(args, key)
              for key, default in DEFAULTS["smoke" if args.cpu_smoke else "gpu"].items()}
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    on_gpu = device.type == "cuda"
    if args.threads or not on_gpu:
        torch.set_num_threads(args.threads or 1)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(args.seed)
    device_name = torch.cuda.get_device_name() if on_gpu else " ".join(["cpu", platform.processor()]).strip()
    peak = args.peak_tflops if args.peak_tflops is not None else (peak_tflops(device_name) if on_gpu else None)
    if on_gpu and peak is None:
        print(f"unknown peak FLOP/s for {device_name!r}: MFU is null; give --peak-tflops")
    if args.json:  # fail on an unwritable path before the measurements, not after
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)

    config_kwargs = TINY if args.cpu_smoke else QWEN25_05B
    model = build_model(config_kwargs, dtype, device)
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n = count_params(model)
    cfg = model.config
    value_head = torch.nn.Linear(cfg.hidden_size, 1, device=device, dtype=dtype)
    params = list(model.parameters()) + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=on_gpu)
    decoder = torch.compile(model.model) if args.compile else model.model  # shares the parameters
    steps = make_steps(model, decoder, value_head, optimizer, shapes, device)
    print(f"gpu-check on {device_name}: {n['total'] / 1e6:.1f}M matmul parameters, {dtype}, "
          f"peak {peak if peak is not None else '?'} TFLOP/s")

    results = {}
    for name in args.only:
        fn, tokens, seq_len, shape = steps[name]
        warmup, count = ((shapes["rollout_warmup"], shapes["rollout_steps"]) if name == "rollout"
                         else (shapes["warmup"], shapes["steps"]))
        fpt = 2 * n["total"] if seq_len is None else flops_per_token(n["total"], cfg.num_hidden_layers,
                                                                      cfg.hidden_size, seq_len)
        row = {"shape": shape, "tokens_per_step": tokens, "warmup": warmup, "flops_per_token": fpt, "step_s": [],
               "median_s": None, "tokens_per_s": None, "tflops": None, "mfu": None, "peak_memory_gib": None,
               "error": None}
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            row["step_s"] = timed(fn, warmup, count, device)
        except torch.cuda.OutOfMemoryError as e:
            row["error"] = "out of memory: " + (str(e).splitlines() or [""])[0]
        if row["error"] is None:
            row["median_s"] = statistics.median(row["step_s"])
            row["tokens_per_s"] = tokens / row["median_s"]
            row["tflops"] = fpt * row["tokens_per_s"] / 1e12
            row["mfu"] = None if peak is None else row["tflops"] / peak
        else:  # free what the failed step held before the next measurement
            optimizer.zero_grad(set_to_none=True)
            model.train()
            gc.collect()
        if on_gpu:
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        results[name] = row
        print(f"  {name}: " + (row["error"] or f"median {row['median_s']:.4f} s, {row['tokens_per_s']:,.0f} tokens/s"),
              flush=True)

    print_table(results)
    record = {"device": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
              "dtype": str(dtype).removeprefix("torch."), "config": {"model_type": cfg.model_type, **config_kwargs},
              "n_params": n, "peak_tflops": peak,
              "flops_per_token": "6 N + 12 L H T (training; PaLM, Chowdhery et al. 2022, App. B); rollout 2 N",
              "settings": {"grad_checkpointing": args.grad_checkpointing, "compile": args.compile,
                           "cpu_smoke": args.cpu_smoke, "seed": args.seed, "tf32": True, "attention": "sdpa",
                           "optimizer": f"AdamW(fused={on_gpu})", **shapes},
              "measurements": results}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
        print(f"wrote {args.json}")
    return record
