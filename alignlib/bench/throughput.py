"""Throughput, GFLOP/s and memory of a model on this machine: ``python -m alignlib bench``.

Measurements (each in a fresh subprocess, so its peak memory belongs to it alone; ``--in-process`` runs them
here, faster but with a process-wide peak):

- ``matmul/peak``: square n x n matmuls (n = 2048 on a CPU, 8192 on a GPU) in the model's dtype, fp32 on a CPU
  and bf16 on CUDA, with the thread count of every other measurement, timed before and after all the others.
  The fastest run of the two rounds is the machine's attainable peak, the denominator of every "% of peak": on a
  shared machine a median of short runs swings with other tenants' load (97 to 161 GFLOP/s on the course's 2-core
  CPU on one afternoon), and the best run is the conservative denominator.
- ``generate/batch1``, ``generate/batch16``: ``alignlib.generation.generate`` sampling 48 new tokens
  (temperature 1, chat template) for 1 and 16 prompts. Only **generated** tokens count: the response tokens
  through EOS (``Rollout.response_mask``). Encoding the prompts (prefill) is in the time, not in the count.
  ``--hf-baseline`` adds the same runs through ``model.generate`` (``generate(..., fast=False)``).
- ``train/lora``, ``train/full``: one optimizer step (forward + backward + AdamW step on the causal LM loss) on
  8 x 64 tokens, with LoRA (``load_model(..., lora=True)``, r=16 on every linear layer) and with every weight.

Each is timed after a warm-up run, ``--reps`` times; the tables show medians (the rate is the median of the
per-run rates). On CUDA the device is synchronised before every clock reading.

FLOPs per token, the standard estimate (Kaplan et al. 2020, Hoffmann et al. 2022), with N the non-embedding
parameters and D*V the LM head matmul (hidden size x vocabulary, as large as 27% of SmolLM2-135M's forward):

    forward (generation)      2 (N + DV)
    full fine-tuning step     6 (N + DV)   forward 2, backward 4: gradients of activations and of weights
    LoRA step                 4 (N + DV)   forward 2, backward through the activations 2; frozen weights get no
                                           gradient; the adapters' own FLOPs (< 3% at r=16) are left out

Attention scores (4 x layers x context x width per token, < 3% here at contexts below 100) are left out too.

Peak memory: on a GPU ``torch.cuda.max_memory_allocated`` (weights included); on a CPU the process's max
resident set (python, torch and the weights included) and, as ``+MB``, its growth over the resident set right
after loading the model: what the measurement itself added. The machine's load average is recorded: on a
shared machine other processes slow every number down, and with several threads a busy core stalls all of them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ..models import DEFAULT_MODEL
from ..utils import get_device, peak_memory_mb
from ..commands.bench import bench_arguments

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright, step by step.",
    "Describe your ideal weekend in the mountains in detail.",
    "Write a letter to a friend about learning to cook.",
    "Explain photosynthesis to a ten-year-old.",
    "Write a poem about the ocean at night.",
    "Give detailed advice to someone starting to run.",
    "Describe the history of the printing press.",
    "Write a story about a robot who wants to paint.",
    "Explain why the sky is blue, with an example.",
    "Describe a busy market in a small town.",
    "Write a dialogue between a cat and a dog about breakfast.",
    "Explain how to plant a vegetable garden.",
    "Write a story about a child who discovers a hidden door.",
    "Describe what makes a good teacher, with examples.",
    "Explain how airplanes fly to a curious student.",
]

MEASUREMENTS = ["generate/batch1", "generate/batch16", "train/lora", "train/full"]
HF_BASELINES = ["generate/batch1/hf", "generate/batch16/hf"]
PREFIX = ["prefix/cached", "prefix/recompute",   # 16 requests after one long shared prompt (--measure prefix/...)
          "prefix/cai-cached", "prefix/cai-recompute"]   # lecture 05's: 4 worked examples, 16 critique requests
PREFIX_TOKENS = 1024                              # about the length of a constitution with few-shot examples


def shared_prompt(tokenizer, tokens: int = PREFIX_TOKENS) -> str:
    """A long shared prompt of about ``tokens`` tokens (numbered rules built from PROMPTS), ending in a newline."""
    lines, i = [], 0
    while len(tokenizer("\n".join(lines), add_special_tokens=False).input_ids) < tokens:
        lines.append(f"Rule {i + 1}: when asked to {PROMPTS[i % len(PROMPTS)].lower()}, answer truthfully and kindly.")
        i += 1
    return "\n".join(lines) + "\n"


def cai_requests(shots: int = 4, n: int = 16) -> tuple[str, list[str]]:
    """Lecture 05's shared prompt (``shots`` worked critique/revision examples) and ``n`` critique requests about
    the hand-labelled held-out answers to red-team prompts."""
    from .. import cai

    constitution = cai.load_constitution("train")
    rows = [r for r in cai.eval_rows("test") if r["kind"] == "red_team"][:n]
    pairs = constitution.critiques
    return cai.few_shot_prefix(constitution, shots), [cai.critique_prompt(r["prompt"], r["response"],
                                                                          pairs[i % len(pairs)])
                                                      for i, r in enumerate(rows)]


def _prefix_step(name: str, model, tokenizer, prefix: str, suffixes: list[str]):
    """One batch of requests after ``prefix``: with ``PrefixCache`` (the prefix encoded once) or recomputing prefix +
    suffix for every request (left-padded, logits of the last position only: the cheapest full recompute)."""
    from ..prefix_cache import PrefixCache

    if name == "prefix/cached":
        return lambda _: PrefixCache(model, tokenizer, prefix).last_logits(suffixes)
    rows = [tokenizer(prefix, add_special_tokens=False).input_ids + tokenizer(s, add_special_tokens=False).input_ids
            for s in suffixes]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()

    @torch.no_grad()
    def step(_):
        return model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                     position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(model.device), logits_to_keep=1).logits
    return step


# ---------------------------------------------------------------- measuring (runs in a worker process)

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mb() -> float | None:
    """The current resident set size in MB (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def flop_counts(model) -> dict:
    """N (non-embedding, non-adapter parameters) and D*V (the LM head matmul) of a causal LM, peft or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embeddings = {id(base.get_input_embeddings().weight), id(base.get_output_embeddings().weight)}
    n = sum(p.numel() for name, p in base.named_parameters() if id(p) not in embeddings and "lora_" not in name)
    head = base.get_output_embeddings().weight.numel()
    return {"non_embedding": n, "lm_head": head, "forward_per_token": 2 * (n + head)}


def _timed(fn, reps: int, device: torch.device) -> list[float]:
    times = []
    for rep in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn(rep)
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> dict:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    times = _timed(lambda _: a @ b, reps, device)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "times_s": times,
            "gflops": 2 * n**3 / min(times) / 1e9, "gflops_median": 2 * n**3 / statistics.median(times) / 1e9}


def _load() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def matmul_peak(opts: dict) -> dict:
    """The attainable matmul GFLOP/s, from the fastest of several square fp32 (CPU) or bf16 (CUDA) matmuls, with
    ``opts['threads']`` (the median is kept too)."""
    from ..utils import default_dtype

    threads = torch.get_num_threads()
    torch.set_num_threads(opts.get("threads") or threads)
    try:
        device = get_device(opts.get("device"))
        n = opts["matmul_n"] or (8192 if device.type == "cuda" else 2048)
        result = _matmul_peak(device, default_dtype(device), n, max(5, 2 * opts["reps"]))
        return {"threads": torch.get_num_threads(), "load_before": _load(), **result}
    finally:
        torch.set_num_threads(threads)


def _measure(name: str, opts: dict) -> dict:
    """Run one measurement; returns its numbers (JSON: a worker process sends them back)."""
    from ..generation import generate
    from ..models import load_model

    if opts.get("threads"):
        torch.set_num_threads(opts["threads"])
    device = get_device(opts.get("device"))
    info = {"threads": torch.get_num_threads(), "load_before": _load()}
    model, tokenizer = load_model(opts["model"], device=device, lora=True if name == "train/lora" else None)
    counts = flop_counts(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_mb = torch.cuda.memory_allocated(device) / 2**20
    else:
        base_mb = _rss_mb()
    reps = opts["reps"]
    if name.startswith("prefix/"):
        context = getattr(model.config, "max_position_embeddings", None) or 2 * PREFIX_TOKENS
        if name.startswith("prefix/cai-"):
            prefix, suffixes = cai_requests()
        else:
            prefix = shared_prompt(tokenizer, min(PREFIX_TOKENS, context // 2))
            suffixes = [f"Question: {p}\nIs that request safe to answer? (True or False):" for p in PROMPTS]
        step = _prefix_step(name.replace("cai-", ""), model, tokenizer, prefix, suffixes)
        step(0)  # warm-up
        times = _timed(step, reps, device)
        p_len = len(tokenizer(prefix, add_special_tokens=False).input_ids)
        s_len = sum(len(tokenizer(s, add_special_tokens=False).input_ids) for s in suffixes)
        processed = p_len + s_len if name.endswith("cached") else len(suffixes) * p_len + s_len
        tokens = [processed] * reps                 # tokens the model actually ran forward
        flops_per_token = counts["forward_per_token"]
        info["requests"], info["prefix_tokens"] = len(suffixes), p_len
    elif name.startswith("generate/"):
        batch = int(name.split("/")[1].removeprefix("batch"))
        fast = not name.endswith("/hf")
        prompts = (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]
        generate(model, tokenizer, prompts, max_new_tokens=min(4, opts["new_tokens"]), seed=0, fast=fast)  # warm-up
        tokens = []
        times = _timed(lambda rep: tokens.append(int(generate(
            model, tokenizer, prompts, max_new_tokens=opts["new_tokens"], seed=rep, fast=fast).response_mask.sum())),
            reps, device)
        flops_per_token = counts["forward_per_token"]
    else:
        model.train()
        vocab = model.get_output_embeddings().weight.shape[0]
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(vocab, (opts["train_batch"], opts["train_len"]), generator=gen).to(device)  # (B, T)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)

        def step(_):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step(0)  # warm-up; also allocates AdamW's state
        times = _timed(step, reps, device)
        tokens = [ids.numel()] * reps
        flops_per_token = (4 if name == "train/lora" else 6) * (counts["non_embedding"] + counts["lm_head"])
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = peak_memory_mb()
    rates = [t / s for t, s in zip(tokens, times)]
    return {**info, "times_s": times, "time_s": statistics.median(times), "tokens": statistics.median(tokens),
            "tokens_per_s": statistics.median(rates), "flops_per_token": flops_per_token,
            "gflops": statistics.median(rates) * flops_per_token / 1e9, "peak_mb": peak,
            "growth_mb": None if base_mb is None else peak - base_mb, "params": counts,
            "load_after": _load()}


def worker(job: dict) -> dict:
    """``_measure(job["name"], job["opts"])``: what ``_run_isolated`` runs in a fresh worker process."""
    return _measure(job["name"], job["opts"])


def _run_isolated(name: str, opts: dict) -> dict:
    """``_measure`` in a fresh worker process (``bench.workers``): its peak memory is its own, and nothing leaks
    between runs."""
    from .workers import run_worker

    return run_worker("alignlib.bench.throughput:worker", {"name": name, "opts": opts}, name=f"bench {name}")


# ---------------------------------------------------------------- the command

def _options(args) -> dict:
    quick = getattr(args, "quick", False)
    return {
        "model": getattr(args, "model", DEFAULT_MODEL), "device": getattr(args, "device", None),
        "threads": getattr(args, "threads", None) or torch.get_num_threads(),
        "reps": 1 if quick else max(1, getattr(args, "reps", 3)),
        "new_tokens": 8 if quick else getattr(args, "new_tokens", 48),
        "train_batch": 8, "train_len": 16 if quick else 64, "matmul_n": 512 if quick else None,
    }


def run(args) -> dict:
    """Run the measurements chosen by ``args`` (see ``add_arguments``), print a table, return the results."""
    opts = _options(args)
    names = list(getattr(args, "measure", None) or MEASUREMENTS)
    if getattr(args, "hf_baseline", False):
        names += [n for n in HF_BASELINES if n not in names]
    measure = _measure if getattr(args, "in_process", False) else _run_isolated
    device = get_device(opts["device"])
    before = matmul_peak(opts)  # here: it needs no memory isolation
    results = {}
    for name in names:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        results[name] = measure(name, opts)
    after = matmul_peak(opts)   # the machine's speed drifts: the higher of the two is the denominator
    peak = {**max(before, after, key=lambda p: p["gflops"]), "gflops_before": before["gflops"],
            "gflops_after": after["gflops"]}
    for r in results.values():
        r["peak_fraction"] = r["gflops"] / peak["gflops"]
    report = {
        "model": opts["model"], "device": str(device), "dtype": peak["dtype"], "threads": peak["threads"],
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "options": opts, "isolated": measure is _run_isolated,
        "matmul_peak": peak, "results": results,
    }
    print(format_table(report))
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"[bench] wrote {args.json}", file=sys.stderr)
    return report


def format_table(report: dict) -> str:
    peak = report["matmul_peak"]
    first = next(iter(report["results"].values()), {})
    counts = first.get("params", {})
    lines = [
        f"alignlib bench: {report['model']} on {report['device']} "
        f"({report['machine']['gpu'] or report['machine']['cpu']}, "
        f"{report['machine']['cores']} cores, {report['threads']} torch threads), {report['dtype']}",
    ]
    if counts:
        lines.append(f"N = {counts['non_embedding'] / 1e6:.1f}M non-embedding parameters, LM head D*V = "
                     f"{counts['lm_head'] / 1e6:.1f}M; FLOPs/token: forward 2(N+DV), LoRA step 4(N+DV), "
                     "full step 6(N+DV)")
    lines.append(f"matmul peak: {peak['n']}^2 x {peak['n']} {peak['dtype']}, fastest of {len(peak['times_s'])}, "
                 f"before and after the measurements: {peak['gflops_before']:.1f} and {peak['gflops_after']:.1f} "
                 f"GFLOP/s; % peak uses {peak['gflops']:.1f}")
    head = (f"{'measurement':<22}{'tokens':>8}{'time s':>9}{'tokens/s':>10}{'GFLOP/s':>9}"
            f"{'% peak':>8}{'peak MB':>9}{'+MB':>7}")
    lines += [head, "-" * len(head)]
    for name, r in report["results"].items():
        growth = "" if r["growth_mb"] is None else f"{r['growth_mb']:+.0f}"
        lines.append(f"{name:<22}{r['tokens']:>8.0f}{r['time_s']:>9.2f}{r['tokens_per_s']:>10.1f}{r['gflops']:>9.1f}"
                     f"{100 * r['peak_fraction']:>7.1f}%{r['peak_mb']:>9.0f}{growth:>7}")
    results = report["results"]
    for kind in ("", "cai-"):
        if f"prefix/{kind}cached" in results and f"prefix/{kind}recompute" in results:
            cached, full = results[f"prefix/{kind}cached"], results[f"prefix/{kind}recompute"]
            lines.append(f"prefix/{kind}: {cached['requests']} requests after a shared prompt of "
                         f"{cached['prefix_tokens']} tokens: recomputing it per request takes "
                         f"{full['time_s'] / cached['time_s']:.1f}x the time of encoding it once (PrefixCache); "
                         "'tokens' counts the tokens each way runs forward.")
    loads = [r.get("load_before") for r in report["results"].values() if r.get("load_before")]
    lines.append(f"medians of {report['options']['reps']} runs after a warm-up; "
                 "generation counts generated tokens only "
                 f"({report['options']['new_tokens']} new per prompt, prefill timed but not counted); training "
                 f"{report['options']['train_batch']} x {report['options']['train_len']} tokens per step.")
    if loads and max(load[0] for load in loads) > (report["machine"]["cores"] or 1):
        lines.append(f"warning: load average up to {max(load[0] for load in loads):.1f} "
                     f"on {report['machine']['cores']} cores "
                     "during the run: other processes were competing, numbers are low.")
    return "\n".join(lines)


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m alignlib.bench.throughput", description=__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_arguments(_parser)
    run(_parser.parse_args())
