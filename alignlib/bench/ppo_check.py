"""Does PPO learn soundly on the real model, whatever the seed and thread count? ``python -m alignlib ppo-check``.

A learning assert in a lecture must not pass by luck. This check runs lecture 01's PPO run (the ``cpu``
preset on the course's sentiment task: SmolLM2-135M-Instruct + LoRA answers the opening of a movie review,
VADER scores the answer) for several seeds, torch thread counts and KL coefficients beta, each run in its own
process, and tests every run against the lecture's criteria:

- ``gain``:     held-out reward (40 test openings, 2 answers each, fixed sampling seed) rises by ``--min-gain``;
- ``entropy``:  the policy's entropy per token does not climb (mean of the last 3 steps <= first 3 + 0.3);
- ``value``:    the value head explains part of the returns (mean explained variance of the last 3 steps > 0);
- ``kl``:       the summed KL to the reference stays inside ``--kl-budget`` nats per sequence (last 3 steps);
- ``readable``: the held-out answers stay fluent English for the initial model: their perplexity under it (chat
  template, response tokens only) is at most twice that of the initial model's own answers to the same prompts.

The variety of the answers (distinct-2 over the 80 held-out answers, before and after) is reported beside them,
not judged: a policy that opens every answer with the same pleasant phrase is readable and still narrower, and
lecture 01 shows that as what it is, the first step of reward hacking.

``--task reward-model`` closes the RLHF loop instead (lecture 01's last part): each run trains two Bradley-Terry
reward models (MiniLM, the ``cpu`` preset with 3 epochs, the run's seed) on disjoint halves of the course's
preference pairs, then runs PPO on the helpful prompts against the first (the *proxy*), with rewards whitened per
batch, 24 new tokens and 8 steps. The second (the *judge*) never reaches PPO: it scores the held-out answers
beside the proxy, so a proxy gain the judge does not share shows where the proxy is exploited. ``gain`` is then
the proxy's held-out gain (default threshold 0.02: Bradley-Terry scores here span about +-0.5); the judge's gain
is reported, not judged, as are both reward models' accuracies on held-out and on shifted preference pairs.

The JSON it writes (``--json``) holds every run's history, held-out rewards and samples; lecture 01 reads the
stored copies in ``lectures/results/`` to show the spread over seeds and the effect of beta. Exit code 1 if any
run at the preset's beta fails a criterion (runs at other betas are reported, not judged: beta = 0 is expected
to break the KL budget).

``--json`` is checked before any run: an existing file is refused unless ``--overwrite`` or ``--resume``. Each
finished run is kept at once in ``<json stem>.runs/stages/`` (``StageStore``). SIGINT/SIGTERM terminates the
running workers, keeps the finished runs and exits with 128 + the signal; ``--resume`` runs only the runs that
had not finished (the same seeds, threads, betas, task and steps; ``--resume`` refuses others).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from ..commands.bench import ppo_check_arguments

EVAL_SEED = 1234
N_EVAL = 40          # all held-out openings
EVAL_SAMPLES = 2     # answers per opening: the held-out reward of a prompt is the mean of its answers
TASKS = ("sentiment", "reward-model")
MIN_GAIN = {"sentiment": 0.1, "reward-model": 0.02}


def train_reward_models(seed: int) -> tuple[dict, dict]:
    """Proxy and judge Bradley-Terry models on disjoint halves of the training pairs; their accuracies."""
    from .. import reward_model as rm
    from ..data import load_course_dataset
    from ..reward_backbones import load_reward_model

    config = rm.RewardModelConfig.preset("cpu", epochs=3, seed=seed)
    pairs = load_course_dataset("preference_pairs", "train")
    tests = {"held_out": load_course_dataset("preference_pairs", "test"),
             "shifted": load_course_dataset("preference_pairs_shift", "test")}
    models, accuracy = {}, {}
    for name, start in (("proxy", 0), ("judge", 1)):
        model, tok = load_reward_model(config.model, seed=seed)
        rm.train_reward_model(model, tok, pairs.select(range(start, len(pairs), 2)), config, progress=False)
        models[name] = rm.as_reward_function(model, tok)
        accuracy[name] = {k: rm.pairwise_accuracy(model, tok, v)["accuracy"] for k, v in tests.items()}
    return models, accuracy


def worker(spec: dict) -> dict:
    """One PPO run in this process: held-out evaluation, training, evaluation again. ``run`` calls it in a fresh
    worker process (``workers.run_workers``) with ``OMP_NUM_THREADS`` = ``spec["threads"]``."""
    import torch

    torch.set_num_threads(spec["threads"])
    from .. import ppo
    from ..data import load_prompts
    from ..generation import generate
    from ..models import load_model
    from ..raft import distinct_n
    from ..rewards import SentimentReward
    from ..utils import seed_everything

    seed_everything(spec["seed"])
    task = spec.get("task", "sentiment")
    overrides = {"steps": spec["steps"]} if spec.get("steps") else {}
    extra, judges = {}, {}
    if task == "reward-model":
        models, extra["rm_accuracy"] = train_reward_models(spec["seed"])
        reward, judges = models["proxy"], {"judge": models["judge"]}
        prompt_set = "helpful_prompts"
        overrides = {"steps": 8, "max_new_tokens": 24, "whiten_rewards": True, **overrides}
    else:
        reward, prompt_set = SentimentReward(), "movie_openings"
    seed_everything(spec["seed"])
    config = ppo.PPOConfig.preset("cpu", seed=spec["seed"], kl_coef=spec["kl_coef"], **overrides)
    policy, tok = load_model("smollm2-135m-instruct", lora=True)
    train, held_out = load_prompts(prompt_set, "train"), load_prompts(prompt_set, "test", n=N_EVAL)

    def evaluate(key):
        roll = generate(policy, tok, held_out, max_new_tokens=config.max_new_tokens, chat=config.chat,
                        temperature=config.temperature, seed=EVAL_SEED, num_return_sequences=EVAL_SAMPLES)
        for name, fn in {"reward": reward, **judges}.items():
            per_answer = fn(roll.prompts, roll.responses)                      # (N * EVAL_SAMPLES,)
            extra[f"{name}_{key}"] = per_answer.view(len(held_out), EVAL_SAMPLES).mean(-1).tolist()  # (N,)
            extra[f"{name}_answers_{key}"] = per_answer.tolist()
        return roll.responses

    before = evaluate("before")
    start = time.perf_counter()
    history = ppo.PPOTrainer(policy, tok, reward, train, config).train(progress=False)
    seconds = time.perf_counter() - start
    after = evaluate("after")
    keep = ("reward/mean", "kl/ref", "policy/entropy", "value/explained_var", "policy/clipfrac", "loss/value",
            "response/length", "time/step_s")
    answered = [p for p in held_out for _ in range(EVAL_SAMPLES)]  # the prompt of each answer
    return {**spec, "task": task, "seconds": seconds, "prompts": answered, "before": before, "after": after,
            **extra, "distinct2_before": distinct_n(before, 2), "distinct2_after": distinct_n(after, 2),
            "history": [{k: h[k] for k in keep if k in h} for h in history]}


def reference_perplexity(runs: list[dict], model_name: str = "smollm2-135m-instruct") -> None:
    """Add ``ppl_before`` / ``ppl_after``: perplexity of each run's held-out answers under the initial model.

    A run is a dict with ``prompts`` and the answers ``before`` and ``after`` (one prompt per answer)."""
    import torch

    from ..logprobs import score_responses
    from ..models import load_model
    from ..sft import encode_sft

    model, tok = load_model(model_name)
    model.eval()
    for run in runs:
        for key in ("before", "after"):
            batch = encode_sft(tok, run["prompts"], run[key], chat=True, add_eos=False)
            normalized = score_responses(model, batch.input_ids, batch.attention_mask,
                                         batch.response_mask)["normalized"]
            # exp of the mean over answers of each answer's NLL per token, as ``divergence_from_reference`` gives it
            run[f"ppl_{key}"] = torch.exp(-normalized.mean()).item()


def judge(run: dict, min_gain: float, kl_budget: float) -> dict:
    """The five criteria of the module docstring for one run: name -> (passed, value)."""
    h = run["history"]
    first, last = h[:3], h[-3:]
    mean = lambda rows, k: statistics.fmean(r[k] for r in rows)  # noqa: E731
    gain = statistics.fmean(run["reward_after"]) - statistics.fmean(run["reward_before"])
    entropy = mean(last, "policy/entropy") - mean(first, "policy/entropy")
    ev = mean(last, "value/explained_var")
    kl = mean(last, "kl/ref")
    fluency = run["ppl_after"] / run["ppl_before"]
    return {"gain": (gain >= min_gain, gain), "entropy": (entropy <= 0.3, entropy), "value": (ev > 0, ev),
            "kl": (kl <= kl_budget, kl), "readable": (fluency <= 2.0, fluency)}


def run(args) -> int:
    from .. import ppo
    from ..training.checkpoint import graceful_stop, prepare_results
    from .workers import Job, WorkerError, run_workers

    preset_beta = ppo.PPOConfig.preset("cpu").kl_coef
    out = Path(args.json)
    if args.min_gain is None:
        args.min_gain = MIN_GAIN[args.task]
    if args.rejudge:
        return report(json.loads(out.read_text())["runs"], preset_beta, args, out)
    betas = args.kl_coefs or [preset_beta]
    common = dict(steps=args.steps, task=args.task)
    specs = [dict(seed=s, threads=t, kl_coef=preset_beta, **common)
             for s, t in itertools.product(args.seeds, args.threads)] if preset_beta in betas else []
    specs += [dict(seed=args.seeds[0], threads=args.threads[0], kl_coef=b, **common)
              for b in betas if b != preset_beta]
    specs.sort(key=lambda s: s["threads"])  # 1-thread runs first, so that --parallel 2 can pair them
    steps = args.steps or (8 if args.task == "reward-model" else ppo.PPOConfig.preset("cpu").steps)
    identity = {"command": "ppo-check", "task": args.task, "ppo_steps": steps, "seeds": list(args.seeds),
                "threads": list(args.threads), "kl_coefs": betas}
    store = prepare_results(out, getattr(args, "resume", False), getattr(args, "overwrite", False), identity,
                            flag="--json")
    name = lambda spec: f"seed-{spec['seed']}_threads-{spec['threads']}_beta-{spec['kl_coef']}"  # noqa: E731
    runs = {i: store.load(name(spec)) for i, spec in enumerate(specs) if store.done(name(spec))}
    if runs:
        print(f"[ppo-check] {len(runs)} of {len(specs)} runs finished before: read from {store.root}", flush=True)
    pending = [(i, spec) for i, spec in enumerate(specs) if i not in runs]
    with graceful_stop() as stop:
        while pending:
            batch = [pending.pop(0)]
            while (pending and len(batch) < args.parallel and batch[0][1]["threads"] == 1
                   and pending[0][1]["threads"] == 1):
                batch.append(pending.pop(0))
            jobs = [Job("alignlib.bench.ppo_check:worker", spec, name(spec), {"OMP_NUM_THREADS": spec["threads"]})
                    for _, spec in batch]
            outcomes = run_workers(jobs, stop)
            for (i, spec), outcome in zip(batch, outcomes):   # keep every run that finished, even when stopped
                if not isinstance(outcome, WorkerError):
                    runs[i] = outcome
                    store.save(name(spec), runs[i])
                    print(f"done: seed {spec['seed']}, {spec['threads']} thread(s), beta {spec['kl_coef']}: "
                          f"{runs[i]['seconds']:.0f} s", flush=True)
            failed = [outcome for outcome in outcomes if isinstance(outcome, WorkerError)]
            if stop.signum:
                print(f"[ppo-check] stopped: {len(runs)} of {len(specs)} runs finished, kept in {store.root}. Run the "
                      "same command with --resume to continue.", flush=True)
                raise SystemExit(128 + stop.signum)
            if failed:
                raise RuntimeError("a PPO run failed: " + "\n".join(map(str, failed)) + "\nThe finished runs are "
                                   "kept: fix the cause and run the same command with --resume.") from failed[0]
    return report([runs[i] for i in range(len(specs))], preset_beta, args, out)


def report(runs: list[dict], preset_beta: float, args, out: Path) -> int:
    """Judge every run, print the table, write the JSON; 1 if a run at the preset's beta failed."""
    reference_perplexity(runs)
    failed = 0
    names = ("gain", "entropy", "value", "kl", "readable")
    print(f"\n{'seed':>4} {'thr':>3} {'beta':>5} " + " ".join(f"{n:>14}" for n in names) + "  distinct-2")
    for r in runs:
        verdict = judge(r, args.min_gain, args.kl_budget)
        r["checks"] = {k: {"passed": bool(p), "value": v} for k, (p, v) in verdict.items()}
        judged = r["kl_coef"] == preset_beta
        failed += judged and not all(p for p, _ in verdict.values())
        cells = " ".join(f"{v:+9.3f} {'ok' if p else ('FAIL' if judged else '-'):>4}" for p, v in verdict.values())
        judged_by = (f"  judge gain {statistics.fmean(r['judge_after']) - statistics.fmean(r['judge_before']):+.3f}"
                     if "judge_after" in r else "")
        print(f"{r['seed']:>4} {r['threads']:>3} {r['kl_coef']:>5} {cells}  "
              f"{r['distinct2_before']:.2f} -> {r['distinct2_after']:.2f}{judged_by}")
    from ..training.checkpoint import atomic_write

    atomic_write(out, json.dumps({"task": runs[0].get("task", "sentiment") if runs else args.task,
                                  "criteria": {"min_gain": args.min_gain, "kl_budget": args.kl_budget},
                                  "preset_kl_coef": preset_beta, "runs": runs}, indent=1))
    print(f"\n{len(runs)} runs, {failed} failed at the preset's beta; written to {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m alignlib ppo-check", description=__doc__.split("\n")[0])
    ppo_check_arguments(parser)
    sys.exit(run(parser.parse_args()))
