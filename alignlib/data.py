"""Course data sets (``data/*.jsonl``) and the Hub data sets used at full scale, mapped to one schema.

Schema (every loader returns a ``datasets.Dataset`` with at least these columns):
- prompt sets: ``prompt`` (str) [+ ``id``, ``category``]
- preference sets: ``prompt``, ``chosen``, ``rejected`` (str)

Hub data sets (lab GPUs) are read by ``load_hub_dataset``; ``path=`` reads a local copy in the same format
(the tests use small fixtures), so the mapping code is the same offline and on the lab machine.
"""
from __future__ import annotations

import json
from pathlib import Path

from datasets import Dataset

from .utils import check_count

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
COURSE_SETS = {
    "movie_openings": ("movie_openings.jsonl", ("id", "prompt", "split")),
    "helpful_prompts": ("helpful_prompts.jsonl", ("id", "prompt", "category", "split")),
    "red_team_prompts": ("red_team_prompts.jsonl", ("id", "prompt", "category", "split")),
    "preference_pairs": ("preference_pairs.jsonl", ("id", "prompt", "chosen", "rejected", "split")),
    # test only: pairs written to differ from preference_pairs in topic, style and length (reward-model shift)
    "preference_pairs_shift": ("preference_pairs_shift.jsonl", ("id", "prompt", "chosen", "rejected", "split")),
    # Constitutional AI (lecture 05): the course's constitution
    "constitution_critiques": ("constitution/critique_revision.jsonl",
                               ("id", "critique_request", "revision_request", "split")),
    "constitution_principles": ("constitution/comparison_principles.jsonl", ("id", "principle", "split")),
    "constitution_few_shot": ("constitution/few_shot.jsonl",
                              ("id", "prompt", "response", "critique_request", "critique", "revision", "split")),
    # hand-labelled answers to red-team and helpful prompts, for the independent scorer and the judge's accuracy
    "constitution_eval": ("constitution/eval_set.jsonl",
                          ("id", "prompt_id", "kind", "prompt", "response", "harmful", "evasive", "split")),
}
BOOLEAN_FIELDS = ("harmful", "evasive")   # true/false labels, never strings ("false" would read as true)
HUB_SETS = {"Anthropic/hh-rlhf": "preference", "stanfordnlp/imdb": "sentiment"}


class DataFormatError(ValueError):
    """A data file does not follow its schema."""


def read_text(path: str | Path) -> str:
    """The text of a course data file (JSONL, or a prompt such as ``verbose_prompt.txt``): UTF-8, or a
    ``DataFormatError`` naming the file and the first bad byte (every loader reads through here)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; data files live in {DATA_DIR}.")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise DataFormatError(f"{path}:{line}: not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start}); "
                              "course data files are UTF-8: re-save the file as UTF-8.") from None


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> list[dict]:
    """Read a JSONL file; every line must be a JSON object holding ``required`` fields as non-empty strings, or as
    booleans for the fields named in ``BOOLEAN_FIELDS`` (hand labels such as ``harmful``). An ``id`` must not
    repeat within the file."""
    path = Path(path)
    rows, seen = [], {}
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}:{lineno}: not valid JSON ({err.msg}); each line must be one "
                                  "JSON object, e.g. {\"prompt\": \"...\"}.") from err
        if not isinstance(row, dict):
            raise DataFormatError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}.")
        missing = [k for k in required if not (isinstance(row.get(k), bool) if k in BOOLEAN_FIELDS
                                               else isinstance(row.get(k), str) and row[k].strip())]
        if missing:
            raise DataFormatError(f"{path}:{lineno}: missing or empty fields {missing}; required: {list(required)} "
                                  f"(strings; {', '.join(BOOLEAN_FIELDS)}: true or false).")
        if isinstance(row.get("id"), (str, int)):
            if row["id"] in seen:
                raise DataFormatError(f"{path}:{lineno}: field id {row['id']!r} repeats line {seen[row['id']]}; "
                                      "every row needs its own id.")
            seen[row["id"]] = lineno
        rows.append(row)
    if not rows:
        raise DataFormatError(f"{path} holds no rows.")
    return rows


def load_course_dataset(name: str, split: str | None = "train", data_dir: str | Path | None = None) -> Dataset:
    """One of the course sets (``COURSE_SETS``), filtered to ``split`` ("train", "test", or None for all)."""
    if name not in COURSE_SETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(COURSE_SETS)}.")
    filename, required = COURSE_SETS[name]
    rows = read_jsonl(Path(data_dir or DATA_DIR) / filename, required)
    if split is not None:
        if split not in {r["split"] for r in rows}:
            raise ValueError(f"split {split!r} not in {name}; splits: {sorted({r['split'] for r in rows})}.")
        rows = [r for r in rows if r["split"] == split]
    return Dataset.from_list(rows)


def load_prompts(name: str, split: str = "train", n: int | None = None) -> list[str]:
    """The first ``n`` prompts of a course set (all if ``n`` is None)."""
    check_count(n, "n")
    prompts = list(load_course_dataset(name, split)["prompt"])
    if n is not None and n > len(prompts):
        raise ValueError(f"asked for n={n} prompts but {name}/{split} has {len(prompts)}.")
    return prompts[:n]


# ---------------------------------------------------------------- Hub formats -> course schema

def split_hh_transcript(text: str) -> tuple[str, str]:
    """Split an hh-rlhf transcript ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` into (prompt, final reply).

    The prompt is the dialogue before the last assistant turn; for a single exchange it is the human turn.
    """
    marker = "\n\nAssistant:"
    cut = text.rfind(marker)
    if cut < 0 or "Human:" not in text[:cut]:
        raise DataFormatError("an hh-rlhf transcript needs '\\n\\nHuman: ...' then '\\n\\nAssistant: ...'; "
                              f"got {text[:80]!r}.")
    prompt, reply = text[:cut].strip(), text[cut + len(marker):].strip()
    if prompt.startswith("Human:") and prompt.count("Human:") == 1:
        prompt = prompt[len("Human:"):].strip()
    return prompt, reply


def hh_to_pairs(rows) -> list[dict]:
    """hh-rlhf rows {chosen, rejected} (full transcripts) -> {prompt, chosen, rejected}."""
    out = []
    for i, row in enumerate(rows):
        prompt, chosen = split_hh_transcript(row["chosen"])
        prompt_r, rejected = split_hh_transcript(row["rejected"])
        if prompt != prompt_r:
            raise DataFormatError(f"row {i}: chosen and rejected transcripts start differently.")
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def imdb_to_prompts(rows, n_words: int = 8) -> list[dict]:
    """imdb rows {text, label} -> {prompt: the review's first ``n_words`` words, text, label}."""
    out = []
    for row in rows:
        words = row["text"].replace("<br />", " ").split()
        out.append({"prompt": " ".join(words[:n_words]), "text": row["text"], "label": int(row["label"])})
    return out


def load_hub_dataset(name: str, split: str = "train", path: str | Path | None = None, n: int | None = None,
                     **kwargs) -> Dataset:
    """A Hub data set mapped to the course schema.

    Args:
        name: ``"Anthropic/hh-rlhf"`` (preference pairs) or ``"stanfordnlp/imdb"`` (review-opening prompts).
        path: a local file or directory in the Hub format (JSONL or Parquet); default: the Hub.
        n: keep the first ``n`` rows.
    """
    import datasets

    if name not in HUB_SETS:
        raise ValueError(f"unknown Hub data set {name!r}; supported: {sorted(HUB_SETS)}.")
    check_count(n, "n")
    if path is None:
        from .hub import hub_kwargs

        hub_kwargs("data set", name, "pass path= to a local copy in the Hub's format (JSONL or Parquet), or set "
                                     "HF_HUB_OFFLINE=1 to use a copy already in the datasets cache.")
        raw = datasets.load_dataset(name, split=split)
    else:
        path = Path(path)
        files = [path] if path.is_file() else sorted(
            p for p in path.rglob("*") if p.suffix in (".jsonl", ".json", ".parquet") and split in p.name)
        if not files:
            raise FileNotFoundError(f"no '{split}' JSONL/Parquet file under {path}.")
        kind = "parquet" if files[0].suffix == ".parquet" else "json"
        raw = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    if n is not None:
        raw = raw.select(range(min(n, len(raw))))
    rows = hh_to_pairs(raw) if HUB_SETS[name] == "preference" else imdb_to_prompts(raw, **kwargs)
    return Dataset.from_list(rows)


def load_task_queries(spec: str, split: str = "train", n: int | None = None) -> list[dict]:
    """Rows with a ``prompt`` and, where the data set has them, ``chosen``/``rejected`` responses (RRHF)."""
    check_count(n, "n")                                          # -1 would keep all but the last row
    kind, _, name = spec.partition(":")
    if kind == "course":
        ds = load_course_dataset(name, split)
    elif kind == "hub":
        ds = load_hub_dataset(name, split, n=n)
    else:
        raise ValueError(f"prompts spec {spec!r} must start with 'course:' or 'hub:'.")
    keys = [k for k in ("prompt", "chosen", "rejected") if k in ds.column_names]
    columns = [list(ds[k]) for k in keys]                       # column access: far faster than row iteration
    rows = [dict(zip(keys, values)) for values in zip(*columns)]
    return rows[:n] if n else rows


def load_task_prompts(spec: str, split: str = "train", n: int | None = None) -> list[str]:
    """Prompts named by ``course:<set>`` or ``hub:<data set>``."""
    return [row["prompt"] for row in load_task_queries(spec, split, n)]
