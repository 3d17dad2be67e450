"""Flag a graded function whose syntax tree matches alignlib's implementation of the same idea.

Calling alignlib's own version of a graded function scores zero (``forbid_reference_calls``); pasting its source
with the names changed does not call anything, so it is caught here instead, by comparing syntax trees:

1. parse the student's ``def`` (from the graded cell) and the reference's source (``inspect.getsource``);
2. normalise both: docstrings removed, type annotations dropped, the function's own name, its arguments and every
   other identifier renamed to placeholders in order of first appearance (``v0, v1, ...``), so renaming variables,
   re-wrapping lines, editing comments or importing ``torch`` under another name changes nothing;
3. compare the two ``ast.dump`` strings: equal is a copy; otherwise the similarity of their token sequences
   (``difflib.SequenceMatcher.ratio``, 1.0 for equal) at or above ``NEAR_COPY`` is a near copy.

A flag is a warning in the score table (``grade_command`` prints it under the table): it never changes a score,
since two people can write the same short function independently. Each check module lists, per graded function,
the implementations to compare with in ``ALIGNLIB_VERSIONS`` (``"module:qualified.name"``); parsing never runs the
student's code.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import textwrap
from dataclasses import dataclass

NEAR_COPY = 0.9   # token-sequence similarity of the normalised trees from which a function counts as a near copy


@dataclass(frozen=True)
class Flag:
    """A graded function that matches a reference implementation."""

    function: str      # the student's function
    reference: str     # "module:name" it matches
    similarity: float  # 1.0: the normalised trees are identical

    def message(self) -> str:
        kind = "a copy" if self.similarity >= 1.0 else f"a near copy ({int(self.similarity * 100)}% similar)"
        return (f"warning: `{self.function}` is {kind} of {self.reference} once names, docstrings and annotations "
                f"are normalised; write your own (this does not change the score).")


class _Normalise(ast.NodeTransformer):
    """Strip docstrings and annotations; rename identifiers and arguments to placeholders in order of appearance."""

    def __init__(self):
        self.names: dict[str, str] = {}

    def placeholder(self, name: str) -> str:
        return self.names.setdefault(name, f"v{len(self.names)}")

    def _strip_docstring(self, node):
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
        return node

    def visit_FunctionDef(self, node):
        node = self._strip_docstring(node)
        node.name = self.placeholder(node.name)
        node.returns = None
        node.decorator_list = []
        self.generic_visit(node)
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        node = self._strip_docstring(node)
        node.name = self.placeholder(node.name)
        self.generic_visit(node)
        return node

    def visit_arg(self, node):
        node.arg = self.placeholder(node.arg)
        node.annotation = None
        node.type_comment = None
        return node

    def visit_Name(self, node):
        node.id = self.placeholder(node.id)
        return node

    def visit_AnnAssign(self, node):
        if node.value is None:
            return None
        return self.visit(ast.Assign(targets=[node.target], value=node.value, lineno=0))

    def visit_Expr(self, node):   # a bare string in a body (a second docstring, a comment written as a string)
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return None
        self.generic_visit(node)
        return node

    def visit_alias(self, node):
        node.asname = self.placeholder(node.asname or node.name.split(".")[0])
        return node


def _function_node(source: str, name: str) -> ast.AST | None:
    """The last top-level ``def name`` (or nested one, if none at the top) in ``source``; None if absent."""
    try:
        tree = ast.parse(textwrap.dedent(source))
    except SyntaxError:
        return None
    found = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name]
    return found[-1] if found else None


def normalised(node: ast.AST) -> str:
    """``ast.dump`` of ``node`` after ``_Normalise`` (a copy: ``node`` is left unchanged)."""
    import copy

    return ast.dump(_Normalise().visit(copy.deepcopy(node)), annotate_fields=False)


def _tokens(dump: str) -> list[str]:
    return dump.replace("(", " ( ").replace(")", " ) ").replace(",", " , ").split()


def similarity(a: str, b: str) -> float:
    """Similarity in [0, 1] of two normalised dumps: 1.0 if equal, else the ratio of their token sequences."""
    if a == b:
        return 1.0
    return difflib.SequenceMatcher(None, _tokens(a), _tokens(b), autojunk=False).ratio()


def reference_dump(spec: str) -> str:
    """The normalised tree of ``"module:qualified.name"`` (an alignlib function or a check module's reference)."""
    module_name, _, qualname = spec.partition(":")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    node = _function_node(inspect.getsource(obj), qualname.split(".")[-1])
    if node is None:
        raise LookupError(f"no def of {qualname} in the source of {module_name}")
    return normalised(node)


def copied_functions(sources: dict[int, str], versions: dict[str, tuple[str, ...]],
                     threshold: float = NEAR_COPY) -> list[Flag]:
    """The graded functions of ``sources`` (cell index -> source) that match one of their ``versions``.

    ``versions`` maps a graded function's name to the references to compare it with. For each function, the last
    graded cell that defines it counts (as when the cells run in order); the closest reference is reported.
    """
    flags = []
    for function, specs in versions.items():
        node = None
        for source in sources.values():
            node = _function_node(source, function) or node
        if node is None:
            continue
        mine = normalised(node)
        best = max(((similarity(mine, reference_dump(spec)), spec) for spec in specs), default=(0.0, ""))
        if best[0] >= threshold:
            flags.append(Flag(function, best[1], round(best[0], 4)))
    return flags
