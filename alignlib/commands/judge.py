"""``python -m alignlib judge-check``: a feedback model validated against oracles before its labels are used.

For any causal language model (``--model``), every format of ``alignlib.feedback``, (A)/(B) with both orders
averaged, (A)/(B) read in one order, (A)/(B) with ``--shots`` labelled examples of the same principle (the paper's
prefix; examples disjoint from the validated pairs) and True/False, is asked about the oracle pair sets of
``alignlib.judge_validation`` (hand-labelled harmlessness, length, tone, a closing question). The table (accuracy
with a 95% bootstrap interval over pairs, ``*`` where the interval lies above 1/2) is printed and written as JSON to
``--json`` with the time of the model's load and of each format.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .. import DEFAULT_MODEL
from .args import add_shared, count

FORMATS = (  # table label, judge name, reading (None: the judge's p)
    ("AB both orders", "ab", None),
    ("AB one order", "ab", "first_order"),
    ("AB few-shot", "ab_few_shot", None),
    ("True/False", "true_false", None),
)


def add_arguments(parser) -> None:
    add_shared(parser, "model", "seed", "threads", "json", model=DEFAULT_MODEL, json="runs/judge_validation.json")
    parser.add_argument("--pairs", type=count(1), default=None,
                        help="at most this many pairs of each set (default: all, 14-33 per set)")
    parser.add_argument("--shots", type=count(0), default=3,
                        help="labelled examples of the few-shot format (default: 3)")
    parser.add_argument("--batch-size", type=count(1), default=8, help="prompts per forward pass (default: 8)")
    parser.add_argument("--n-boot", type=count(100), default=2000, help="bootstrap resamples (default: 2000)")


def run(args) -> dict:
    from ..feedback import MultipleChoiceJudge, few_shot_template, true_false_judge
    from ..judge_validation import few_shot_examples, format_table, oracle_pair_sets, validate_judge
    from ..models import load_model
    from ..training.checkpoint import check_json_path
    from ..utils import set_threads

    if args.threads:
        set_threads(args.threads)
    check_json_path(args.json)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, device="cpu" if args.threads else None)
    model.eval()
    load_s = time.perf_counter() - start
    sets = oracle_pair_sets(args.pairs)
    kind = lambda name: name.split("-")[0]          # noqa: E731  "harmless-test" -> "harmless"
    judges = {
        "ab": MultipleChoiceJudge(model, tokenizer, batch_size=args.batch_size),
        "ab_few_shot": {name: MultipleChoiceJudge(model, tokenizer, batch_size=args.batch_size,
                                                  template=few_shot_template(few_shot_examples(kind(name), args.shots)))
                        for name in sets},
        "true_false": true_false_judge(model, tokenizer, args.batch_size),
    }
    results, seconds = {name: {} for name in sets}, {}
    for name, judge in judges.items():
        start = time.perf_counter()
        for set_name, rows in validate_judge({name: judge}, sets, n_boot=args.n_boot, seed=args.seed).items():
            results[set_name].update(rows)
        seconds[name] = round(time.perf_counter() - start, 1)
        print(f"{name}: {sum(len(v) for v in sets.values())} pairs in {seconds[name]:.1f} s", flush=True)
    table = []
    for set_name, by_judge in results.items():
        for label, judge_name, reading in FORMATS:
            row = by_judge[judge_name]
            r = row[reading] if reading else row
            table.append({"principle": set_name, "format": label, "n": row["n"], "accuracy": r["accuracy"],
                          "low": r["low"], "high": r["high"],
                          "decisiveness": None if reading else row["decisiveness"],
                          "above_chance": r["low"] > 0.5, "chosen_longer": row["chosen_longer"]})
    out = {"model": args.model, "device": str(next(model.parameters()).device), "threads": args.threads,
           "shots": args.shots, "seed": args.seed, "n_boot": args.n_boot,
           "true_false_words": list(judges["true_false"].letters),
           "principles": {name: {"comparison": rows[0]["principle"], "statement": rows[0]["statement"]}
                          for name, rows in sets.items()},
           "load_s": round(load_s, 1), "seconds": seconds, "table": table, "results": results}
    print(format_table(results, FORMATS))
    print(f"load {load_s:.1f} s; " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
          + f" (threads: {args.threads or 'torch default'})")
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")
    return out
