"""Command-line flags built from the config dataclasses, the flags every command shares, and ``--config run.yaml``.

In the way of transformers' ``HfArgumentParser``: every field of a config dataclass (``PPOConfig``, ...) becomes a
flag (``kl_coef`` -> ``--kl-coef``) whose help is the field's docstring, with its default and the preset's value.
The fields are read from the module's source with ``ast``, so ``--help`` answers without importing torch. A flag
the user does not give stays out of the namespace, so the preset's value holds; ``--config run.yaml`` sets fields
(and any other flag) from a file, and flags on the command line override the file.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .. import DEFAULT_MODEL
from ..training import CHECKPOINT_EVERY
from ..validate import count, threads_arg


class UsageError(ValueError):
    """A command line or a config file that cannot be run as written (the message names the fix)."""


@dataclass(frozen=True)
class ConfigField:
    name: str
    annotation: str      # as written in the source, e.g. "int | None"
    default: object      # the dataclass default (``...`` where it is not a literal)
    help: str            # the field's docstring


_FIELDS: dict[tuple[str, str], tuple[list[ConfigField], dict]] = {}


def source_of(module: str) -> str:
    """The source of ``module`` (dotted), found from its top-level package without importing the module or its
    parent packages (``alignlib.checks`` imports torch)."""
    top, *rest = module.split(".")
    path = Path(importlib.util.find_spec(top).origin).parent.joinpath(*rest)
    return (path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py").read_text()


def config_fields(module: str, cls: str) -> tuple[list[ConfigField], dict]:
    """The fields of dataclass ``cls`` in ``module`` (e.g. ``"alignlib.ppo", "PPOConfig"``) and its ``PRESETS``,
    read from the source without importing the module."""
    if (module, cls) not in _FIELDS:
        source = source_of(module)
        node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == cls)
        fields, presets = [], {}
        for i, stmt in enumerate(node.body):
            if isinstance(stmt, ast.Assign) and [t.id for t in stmt.targets if isinstance(t, ast.Name)] == ["PRESETS"]:
                try:
                    presets = ast.literal_eval(stmt.value)
                except ValueError:
                    presets = {}
            if not isinstance(stmt, ast.AnnAssign) or not isinstance(stmt.target, ast.Name):
                continue
            if stmt.target.id.isupper() or ast.unparse(stmt.annotation).startswith("ClassVar"):
                continue
            nxt = node.body[i + 1] if i + 1 < len(node.body) else None
            doc = nxt.value.value if (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                                       and isinstance(nxt.value.value, str)) else ""
            try:
                default = ast.literal_eval(stmt.value) if stmt.value is not None else ...
            except ValueError:
                default = ...
            fields.append(ConfigField(stmt.target.id, ast.unparse(stmt.annotation), default, " ".join(doc.split())))
        _FIELDS[(module, cls)] = fields, presets
    return _FIELDS[(module, cls)]


def _parse_scalar(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _optional(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = f"{kind.__name__} or none"
    return parse


def _flag_kwargs(field: ConfigField) -> dict:
    """argparse keywords for one field from its annotation."""
    kinds = {"int": int, "float": float, "str": str}
    ann = field.annotation.replace(" ", "")
    if ann == "bool":
        return {"action": argparse.BooleanOptionalAction}
    if ann in kinds:
        return {"type": kinds[ann]}
    if ann.endswith("|None") and ann[:-5] in kinds:
        return {"type": _optional(kinds[ann[:-5]]), "metavar": ann[:-5].upper()}
    if ann.startswith(("tuple", "list")):
        return {"nargs": "+", "type": _parse_scalar}
    return {"type": _parse_scalar}


def _literal(node: ast.AST):
    """``ast.literal_eval``, also through ``dict(key=literal, ...)`` calls."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {k.arg: _literal(k.value) for k in node.keywords}
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def module_literal(module: str, name: str):
    """The literal value of the module-level assignment ``name = ...`` in ``module``, read without importing it."""
    for node in ast.parse(source_of(module)).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return _literal(node.value)
    raise LookupError(f"{module} has no literal {name}")


def add_config_arguments(parser: argparse.ArgumentParser, module: str, cls: str, preset: str = "cpu",
                         skip: tuple = (), minimums: dict | None = None) -> list[str]:
    """One flag per field of ``cls`` not already a flag of ``parser`` and not in ``skip`` (fields no flag can
    spell, e.g. nested tuples); ``minimums`` makes a count field's flag refuse smaller values at parsing. Returns
    the field names that became flags."""
    fields, presets = config_fields(module, cls)
    taken = {a.dest for a in parser._actions} | set(skip)
    minimums = minimums or {}
    group = parser.add_argument_group(f"{cls} (each overrides the --preset's value; also settable in --config)")
    names = []
    for f in fields:
        if f.name in taken:
            continue
        shown = "" if f.default is ... else f" (default: {f.default!r}"
        if shown and f.name in presets.get(preset, {}) and presets[preset][f.name] != f.default:
            shown += f"; {preset} preset: {presets[preset][f.name]!r}"
        shown += ")" if shown else ""
        kwargs = _flag_kwargs(f)
        if f.name in minimums:
            kwargs["type"] = count(minimums[f.name])
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
                           help=(f.help + shown).replace("%", "%%"), **kwargs)
        names.append(f.name)
    parser.set_defaults(_config_fields=names)
    return names


def config_overrides(args: argparse.Namespace) -> dict:
    """The config fields given on the command line or in ``--config`` (the rest keep the preset's values)."""
    given = {name: getattr(args, name) for name in getattr(args, "_config_fields", []) if hasattr(args, name)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}      # nargs and YAML give lists


SHARED = {  # the flags several commands take, declared once: name -> argparse keywords
    "model": {"default": None, "help": "the policy: a name of alignlib.models, a Hub id or a local directory "
                                       f"(default: the preset's; {DEFAULT_MODEL} on cpu)"},
    "preset": {"default": "cpu", "choices": ["cpu", "lab-gpu"],
               "help": "task and hyper-parameter preset: cpu (the course machine) or lab-gpu (Hub model and data)"},
    "seed": {"type": int, "default": 0, "help": "seed of sampling, shuffling and initialisation (default: 0)"},
    "threads": {"type": threads_arg, "default": None, "help": "torch CPU threads (default: torch's choice)"},
    "output": {"help": "the run directory: checkpoints, finished stages, results"},
    "max_new_tokens": {"type": count(1), "default": None, "help": "response length limit in tokens"},
    "report_to": {"default": "none", "choices": ["none", "tensorboard", "wandb"],
                  "help": "also log every step's metrics: tensorboard (offline, into <output>/tensorboard) or wandb"},
    "json": {"metavar": "PATH", "default": None, "help": "also write the results as JSON to PATH"},
    "resume": {"action": "store_true", "help": "continue the run in --output where it stopped (same settings)"},
    "overwrite": {"action": "store_true", "help": "delete the run in --output and start again"},
    "checkpoint_every": {"type": count(0), "default": CHECKPOINT_EVERY, "metavar": "N",
                         "help": "checkpoint every N steps (0: only at the end and when stopped); "
                                 f"default {CHECKPOINT_EVERY}"},
    "config": {"metavar": "YAML", "default": None,
               "help": "read flags and config fields from a YAML mapping (keys as the flags, - or _); flags given "
                       "on the command line override it"},
}


def add_shared(parser: argparse.ArgumentParser, *names: str, **defaults) -> None:
    """Add the shared flags ``names`` (keys of ``SHARED``); ``defaults`` overrides a default, e.g. ``output=...``."""
    unused = set(defaults) - set(names)
    if unused:
        raise TypeError(f"defaults for flags not added: {sorted(unused)}")
    for name in names:
        kwargs = dict(SHARED[name])
        if name in defaults:
            kwargs["default"] = defaults[name]
            kwargs["help"] += f" (default: {defaults[name]})"
        parser.add_argument("--" + name.replace("_", "-"), dest=name, **kwargs)


def read_config_file(path: str | Path, parser: argparse.ArgumentParser) -> dict:
    """The mapping in the YAML file ``path``, its keys checked against ``parser``'s flags."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file; write a YAML mapping of flags, e.g. 'kl_coef: 0.1'.")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"--config {path} is not valid YAML ({str(err).splitlines()[0]}); fix the file.") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path} must hold a mapping of flags to values, e.g. 'kl_coef: 0.1'.")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    known = {a.dest for a in parser._actions if a.dest not in ("help", "config")}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"--config {path}: unknown keys {unknown}; `--help` lists the flags this command takes.")
    return values


def check_report_to(report_to: str | None) -> None:
    """Refuse ``--report-to wandb`` without wandb installed before anything is written or loaded."""
    if report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise UsageError("--report-to wandb needs the wandb package: pip install wandb (or use --report-to "
                         "tensorboard, which works offline).")
