"""``python -m alignlib tour``: the course's main job, end to end on the default model.

It grows with the course: each method that lands adds a step. Today: load the model, sample responses to
course prompts, score them (log-probs, sentiment, length), and print a table; then a few steps of PPO
(lecture 01), RRHF (lecture 02) and RAFT (lecture 03) on the same sentiment task, with the reward, the KL to
the initial model and the seconds of each step; then two soup experts and their interpolations (lecture 04);
then Constitutional AI's critique, revision and AI feedback, each measured (lecture 05); then SELF-ALIGN's
principle-driven answers, their filter and the truthfulness and adherence evaluations (lecture 06). At the end
it writes a report (a markdown page with tables and a plot, and the raw histories as JSON) to a directory it prints.

The report directory (``--report``, default ``runs/tour``) is checked before any work and refused if it holds an
earlier tour, unless ``--resume`` or ``--overwrite``. Every step is stored in it when it finishes; Ctrl-C (or
SIGTERM) stops after the running step, and ``--resume`` continues after the last finished one.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from ..data import load_prompts
from ..generation import generate
from ..logprobs import score_responses
from ..models import DEFAULT_MODEL, load_model
from ..rewards import LengthReward, SentimentReward
from ..utils import seed_everything


def shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def print_table(rows: list[dict], columns: list[tuple[str, str, int]]) -> None:
    """Print ``rows`` as a fixed-width table; columns are (key, header, width)."""
    print("  ".join(h.ljust(w) for _, h, w in columns))
    print("  ".join("-" * w for _, _, w in columns))
    for row in rows:
        cells = []
        for key, _, w in columns:
            v = row[key]
            cells.append((f"{v:+.3f}" if isinstance(v, float) else shorten(str(v), w)).ljust(w))
        print("  ".join(cells))


def run(model_name: str = DEFAULT_MODEL, n_prompts: int = 4, max_new_tokens: int = 40, seed: int = 0,
        steps: int = 3, report: str | Path | None = "runs/tour", resume: bool = False, overwrite: bool = False) -> dict:
    """Every step below on ``model_name``; with ``report``, also writes the report there (see ``write_report``).

    ``report`` is a run directory, checked before any work: an earlier tour there is refused unless ``resume`` or
    ``overwrite``. Each step's result is a stage in ``<report>/stages/`` (``StageStore``); SIGINT/SIGTERM stops
    after the running step (exit code 128 + the signal), ``resume`` continues after the last finished step, and the
    report is written from the stored steps, as the uninterrupted tour writes it."""
    from contextlib import nullcontext

    from ..training.checkpoint import StageStore, prepare_output
    from ..training.loop import staged_run

    store = None
    if report is not None:
        identity = {"command": "tour", "model": model_name, "prompts": n_prompts, "max_new_tokens": max_new_tokens,
                    "seed": seed, "method_steps": steps}     # not "steps": --resume may not lengthen finished steps
        store = StageStore(prepare_output(report, resume=resume, overwrite=overwrite, identity=identity,
                                          flag="--report"))
    seed_everything(seed)
    start = t0 = time.perf_counter()
    model, tokenizer = load_model(model_name)
    print(f"[tour] loaded {model_name} on {next(model.parameters()).device} in {time.perf_counter() - t0:.1f} s")
    compute = {"sample": lambda: tour_sample(model, tokenizer, n_prompts, max_new_tokens, seed),
               "soups": lambda: tour_soups(model_name, steps=steps, seed=seed),
               "cai": lambda: tour_cai(model, tokenizer, n_prompts=min(n_prompts, 4), seed=seed),
               "self_align": lambda: tour_self_align(model, tokenizer, n_prompts=min(n_prompts, 4))}
    titles = [("sample", "Step 0: sample and score (lecture 00)")] + TOUR_STEPS
    done = {}
    with staged_run("tour", Path(report)) if store is not None else nullcontext() as stop:   # no report: at once
        for method, title in titles:
            print(f"\n== {title} ==")
            work = compute.get(method, lambda: tour_method(method, model_name, steps=steps, seed=seed))
            if store is None:
                done[method] = work()
                continue
            if store.done(method):
                print(f"[tour] finished before: {store.path(method)}")
            done[method] = store.run(method, work, stop)
    if store is not None:
        done = {method: store.load(method) for method, _ in titles}   # the report from the stored steps
    result = {**done.pop("sample"), **done, "seconds": time.perf_counter() - start}
    if report is not None:
        path = write_report(result, report, model_name)
        print(f"\n[tour] done in {result['seconds'] / 60:.1f} min; report: {path}")
    return result


def tour_sample(model, tokenizer, n_prompts: int, max_new_tokens: int, seed: int) -> dict:
    """Step 0: answers to helpful prompts (chat) and review openings (raw), scored by the model's log-probs, VADER
    and length, printed as a table."""
    prompts = load_prompts("helpful_prompts", "test", n_prompts) + load_prompts("movie_openings", "test", n_prompts)
    chat = [True] * n_prompts + [False] * n_prompts
    t0 = time.perf_counter()
    helpful = generate(model, tokenizer, prompts[:n_prompts], max_new_tokens=max_new_tokens, seed=seed, progress=True)
    reviews = generate(model, tokenizer, prompts[n_prompts:], max_new_tokens=max_new_tokens, chat=False,
                       seed=seed, progress=True)
    gen_s = time.perf_counter() - t0
    sentiment, length = SentimentReward(), LengthReward()
    rows = []
    for rollout in (helpful, reviews):
        scores = score_responses(model, rollout.input_ids, rollout.attention_mask, rollout.response_mask)
        sent = sentiment(rollout.prompts, rollout.responses)
        words = length(rollout.prompts, rollout.responses)
        for i in range(len(rollout)):
            rows.append({"prompt": rollout.prompts[i], "response": rollout.responses[i],
                         "logp/token": scores["normalized"][i].item(), "sentiment": sent[i].item(),
                         "words": int(words[i]), "ended": "yes" if rollout.finished[i] else "no"})
    print_table(rows, [("prompt", "prompt", 30), ("response", "response", 46), ("logp/token", "logp/tok", 8),
                       ("sentiment", "VADER", 7), ("words", "words", 5), ("ended", "EOS", 3)])
    print(f"\n[tour] {len(rows)} responses in {gen_s:.1f} s (chat prompts: {sum(chat[:n_prompts])}, "
          f"raw review openings: {n_prompts}).")
    return {"rows": rows, "time/generate_s": gen_s}


def write_report(result: dict, directory: str | Path, model_name: str = DEFAULT_MODEL) -> Path:
    """The tour's report in ``directory``: ``report.md`` (a table per step and the plots), ``training.png`` (reward
    and KL per step of PPO, RRHF and RAFT) and ``histories.json`` (everything the steps returned). Returns the
    path of ``report.md``."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    methods = [m for m in ("ppo", "rrhf", "raft") if m in result]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for m in methods:
        axes[0].plot([h["reward/mean"] for h in result[m]], "o-", label=m.upper())
        axes[1].plot([h["kl/ref"] for h in result[m]], "o-", label=m.upper())
    axes[0].set_title("batch reward (VADER)")
    axes[1].set_title("KL(policy || initial), nats")
    for a in axes:
        a.set_xlabel("step")
        a.legend()
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=100)
    plt.close(fig)

    lines = [f"# alignlib tour on {model_name}", "",
             f"{result['seconds'] / 60:.1f} min in all. Each method ran a few steps; the lectures run the full "
             "versions.", "", "## Sampling and scoring (lecture 00)", "",
             "| prompt | response | log-prob/token | VADER | words |", "|---|---|---|---|---|"]
    lines += [f"| {shorten(r['prompt'], 40)} | {shorten(r['response'], 60)} | {r['logp/token']:+.2f} | "
              f"{r['sentiment']:+.2f} | {r['words']} |" for r in result["rows"]]
    lines += ["", "## PPO, RRHF and RAFT on the sentiment task (lectures 01-03)", "",
              "| method | steps | first reward | last reward | last KL | median s/step | peak MB |",
              "|---|---|---|---|---|---|---|"]
    for m in methods:
        h = result[m]
        lines.append(f"| {m.upper()} | {len(h)} | {h[0]['reward/mean']:+.3f} | {h[-1]['reward/mean']:+.3f} | "
                     f"{h[-1]['kl/ref']:.3f} | {statistics.median(x['time/step_s'] for x in h):.1f} | "
                     f"{h[-1]['memory/peak_mb']:.0f} |")
    lines += ["", "![reward and KL per step](training.png)", ""]
    if "soups" in result:
        lines += ["## Rewarded soups (lecture 04)", "", "| lambda | positive | neutral | KL |", "|---|---|---|---|"]
        lines += [f"| {r['lambda']} | {r['positive']:+.3f} | {r['neutral']:+.3f} | {r['kl']:.3f} |"
                  for r in result["soups"]]
        lines.append("")
    if "cai" in result:
        j, sc = result["cai"]["judge"], result["cai"]["scorer"]
        lines += ["## Constitutional AI (lecture 05)", "",
                  f"The model as an (A)/(B) judge picks the hand-labelled harmless answer in {j['debiased']:.2f} of "
                  f"{j['pairs']} pairs (both orders averaged); the independent scorer's held-out accuracy is "
                  f"{sc['harmful']:.2f} (harmful) and {sc['evasive']:.2f} (evasive).", ""]
    if "self_align" in result:
        sa = result["self_align"]
        kept = sum(not r["dropped"] for r in sa["rows"])
        lines += ["## SELF-ALIGN (lecture 06)", "",
                  f"{kept} of {len(sa['rows'])} principle-driven answers passed the filter; multiple choice by "
                  f"p(True): {sa['mc']['accuracy']:.2f} [{sa['mc']['interval'][0]:.2f}, {sa['mc']['interval'][1]:.2f}]"
                  f" on {len(sa['mc']['hits'])} held-out questions; the adherence scorer agrees with "
                  f"{sa['scorer']['n']} hand labels {sa['scorer']['accuracy']:.2f} of the time.", ""]
    lines += ["Raw histories: `histories.json`."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "histories.json").write_text(json.dumps(result, indent=1, default=str))
    return out / "report.md"


def tour_soups(model_name: str, steps: int, seed: int = 0) -> list[dict]:
    """Rewarded soups in miniature: two PPO experts (positive and neutral tone) from one initialisation, and the
    soups lambda = 0, 0.5, 1 between them, scored by both rewards on 8 held-out openings."""
    from ..soups import SoupModel, SoupsConfig, lora_soup, make_reward, train_policy

    names = ("positive", "neutral")
    rewards = {n: make_reward(n) for n in names}
    config = SoupsConfig(model=model_name, steps=steps, seed=seed)
    prompts = load_prompts("movie_openings", "train")
    experts = []
    for n in names:
        experts.append(train_policy(config, rewards[n], prompts))
        print(f"[tour] expert {n}: {experts[-1]['seconds']:.0f} s")
    soup = SoupModel(model_name)
    rows = []
    for lam in (0.0, 0.5, 1.0):
        soup.set(lora_soup([e["adapter"] for e in experts], [1 - lam, lam], "product",
                           [e["scaling"] for e in experts]))
        ev = soup.evaluate(load_prompts("movie_openings", "test", 8), rewards, config.max_new_tokens,
                           config.temperature, samples=1)
        rows.append({"lambda": f"{lam:.1f}", **{n: sum(v) / len(v) for n, v in ev["rewards"].items()},
                     "kl": ev["kl"], "example": ev["examples"][0]})
    print_table(rows, [("lambda", "lambda", 6), ("positive", "positive", 8), ("neutral", "neutral", 8),
                       ("kl", "KL", 6), ("example", "first answer", 50)])
    print("[tour] full comparison with MORL: python -m alignlib soups --preset cpu")
    return rows


def tour_cai(model, tokenizer, n_prompts: int = 3, seed: int = 0) -> dict:
    """Constitutional AI in miniature: one critique-revision round on held-out red-team prompts by the model
    prompted with two worked examples (their keys and values computed once), the model as a multiple-choice judge
    of hand-labelled pairs (both orders), and the independent scorer's accuracy on held-out hand labels."""
    from .. import cai
    from ..feedback import MultipleChoiceJudge

    constitution = cai.load_constitution("train")
    prompts = load_prompts("red_team_prompts", "test", n_prompts)
    t0 = time.perf_counter()
    answers = generate(model, tokenizer, prompts, max_new_tokens=32, temperature=0.7, seed=seed).responses
    prefix = cai.few_shot_prefix(constitution, 2)
    if len(tokenizer(prefix).input_ids) > model.config.max_position_embeddings // 2:
        prefix = None                              # a small test model's context has no room for the examples
    critic = cai.Critic(model, tokenizer, prefix, max_new_tokens=40)
    rows = cai.critique_and_revise(critic, prompts, answers, constitution, seed=seed)
    print_table([{"prompt": r["prompt"], "answer": r["initial"], "critique": r["rounds"][0]["critique"],
                  "revision": r["final"]} for r in rows],
                [("prompt", "red-team prompt", 26), ("answer", "answer", 26), ("critique", "critique", 26),
                 ("revision", "revision", 26)])
    pairs = [p for p in cai.labelled_pairs(cai.eval_rows("test")) if p["kind"] == "red_team"][:8]
    judge = cai.judge_accuracy(MultipleChoiceJudge(model, tokenizer), pairs, constitution, seed)
    scorer = cai.Scorer().fit(cai.eval_rows("train")).accuracy(cai.eval_rows("test"))
    print(f"[tour] critiques and revisions by prompting in {time.perf_counter() - t0:.0f} s; as an (A)/(B) judge the "
          f"model picks the harmless answer in {judge['debiased']:.2f} of {judge['pairs']} hand-labelled pairs "
          f"(both orders; p(A) {judge['mean_p_A_first_order']:.2f} in one order); the independent scorer: "
          f"{scorer['harmful']:.2f} (harmful) and {scorer['evasive']:.2f} (evasive) on {scorer['rows']} held-out rows")
    print("[tour] full run: python -m alignlib cai-sl --preset cpu, then cai-rl --preset cpu")
    return {"rows": rows, "judge": judge, "scorer": scorer}


def tour_self_align(model, tokenizer, n_prompts: int = 4) -> dict:
    """SELF-ALIGN in miniature: held-out prompts answered after the 16 principles and the exemplars (encoded once),
    split into thoughts and answer and filtered; the base model's multiple-choice truthfulness by p(True) on the
    held-out questions; and the adherence scorer's accuracy against the hand labels."""
    from .. import self_align as sa

    data = sa.load_self_align()
    if len(tokenizer(sa.principle_prompt(data)).input_ids) > model.config.max_position_embeddings // 2:
        first = data.principles[0]                # a small test model's short context: one rule, one short exemplar
        data = sa.SelfAlignData(principles=[first], exemplars=[
            {"id": "E0", "instruction": "Say hello.", "thought": f"By {first['id']} I greet back.",
             "answer": "Hello!"}])
    held = sa.load_rows("adherence", "test")[:n_prompts]
    t0 = time.perf_counter()
    rows = sa.self_align(model, tokenizer, [r["prompt"] for r in held], data, max_new_tokens=64)
    print_table([{**r, "expected": h["expected"], "dropped": r["dropped"] or "kept"} for r, h in zip(rows, held)],
                [("instruction", "held-out prompt", 28), ("expected", "expected", 9), ("thought", "thoughts", 34),
                 ("answer", "answer", 30), ("dropped", "filter", 12)])
    mc = sa.mc_accuracy(model, tokenizer, sa.load_rows("truthfulness", "test"), "true")
    scorer = sa.scorer_accuracy(sa.load_rows("adherence_labels"))
    print(f"[tour] {sum(not r['dropped'] for r in rows)}/{len(rows)} principle-driven answers kept, "
          f"{time.perf_counter() - t0:.0f} s with the evaluation; multiple choice by p(True): "
          f"{mc['accuracy']:.2f} [{mc['interval'][0]:.2f}, {mc['interval'][1]:.2f}] on {len(mc['hits'])} held-out "
          f"questions; the adherence scorer agrees with {scorer['n']} hand labels {scorer['accuracy']:.2f} of the time")
    print("[tour] all four stages: python -m alignlib self-align --preset cpu")
    return {"rows": rows, "mc": mc, "scorer": {k: v for k, v in scorer.items() if k != "wrong"}}


def tour_method(method: str, model_name: str, steps: int, seed: int = 0) -> list[dict]:
    """A few steps of one method on the sentiment task (answer review openings in chat, VADER reward), printed."""
    from ..training.registry import make_trainer

    policy, tokenizer = load_model(model_name, lora=True)
    trainer = make_trainer(method, policy, tokenizer, SentimentReward(), load_prompts("movie_openings", "train"), "cpu",
                           steps, chat=True, seed=seed)
    history = trainer.train(steps)
    print_table([{"step": i, "reward": h["reward/mean"], "kl": h["kl/ref"], "time": h["time/step_s"]}
                 for i, h in enumerate(history)],
                [("step", f"{method.upper()} step", 9), ("reward", "reward", 7), ("kl", "KL(pi||ref)", 11),
                 ("time", "seconds", 7)])
    print(f"[tour] peak memory {history[-1]['memory/peak_mb']:.0f} MB; "
          f"full run: python -m alignlib {method} --preset cpu")
    return history


TOUR_STEPS = [  # (method, title): one per lecture that has landed
    ("ppo", "Step 1: RLHF with PPO on the sentiment task (lecture 01)"),
    ("rrhf", "Step 2: RRHF, ranking policy and initial-model samples by the reward (lecture 02)"),
    ("raft", "Step 3: RAFT, fine-tuning on the best of 4 samples per prompt (lecture 03)"),
    ("soups", "Step 4: rewarded soups, two experts and the weights between them (lecture 04)"),
    ("cai", "Step 5: Constitutional AI, a critique and a revision, AI feedback and its accuracy (lecture 05)"),
    ("self_align", "Step 6: SELF-ALIGN, answers under 16 principles, the filter, truthfulness (lecture 06)"),
]
