"""Checks of exercise 04 (rewarded soups: weight interpolation, LoRA soups, Pareto fronts, 2-D hypervolume, and a
soup chosen by experiment), 17 points.

Each check compares the student's function with ``alignlib.soups`` on seeded random inputs, or tests a property
the reference has too: the soup at a vertex is that expert, both LoRA modes (the product B_i A_i, and A and B
averaged separately), weights off the simplex refused, duplicates and ties in Pareto filtering, dominated points
and points under the reference adding no hypervolume. Inputs are cloned before each call.

Each function is asked in a form that ``alignlib.soups`` does not have, so pasting its code does not pass (one check
each): integer buffers are carried over, not averaged; the product mode takes experts of different ranks, which the
factor mode refuses; some rewards may be costs to minimise; a batch of fronts gives one hypervolume each.
``ALIGNLIB_VERSIONS`` lists the implementations the grader compares the student's syntax trees with
(``checks.similarity``).
"""
from __future__ import annotations

import torch

from alignlib import soups as ref
from alignlib import tiny_lab

from . import as_number, assert_close, check, generator, get_function, run_experiment

ALIGNLIB_VERSIONS = {"interpolate_state_dicts": ("alignlib.soups:interpolate",),
                     "lora_delta": ("alignlib.soups:lora_soup",),
                     "pareto_mask": ("alignlib.soups:pareto_mask",),
                     "hypervolume_2d": ("alignlib.soups:hypervolume",)}


def random_state_dicts(n: int, gen: torch.Generator) -> list[dict]:
    shapes = {"layer.weight": (3, 4), "layer.bias": (3,), "head.weight": (2, 3)}
    return [{k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()} for _ in range(n)]


def random_weights(n: int, gen: torch.Generator) -> list[float]:
    w = torch.rand(n, generator=gen, dtype=torch.float64) + 0.05
    return (w / w.sum()).tolist()


def clone(x):
    if isinstance(x, dict):
        return {k: v.clone() for k, v in x.items()}
    if isinstance(x, list):
        return [clone(v) for v in x]
    return x.clone() if isinstance(x, torch.Tensor) else x


# ---------------------------------------------------------------- interpolate_state_dicts (2 points)

@check(points=1, function="interpolate_state_dicts")
def interpolate_matches_reference(ns):
    """sum_i lambda_i theta_i key by key, for N = 2 and 3 experts, and a vertex gives that expert"""
    student = get_function(ns, "interpolate_state_dicts")
    gen = generator(400)
    for n in (2, 3):
        sds, w = random_state_dicts(n, gen), random_weights(n, gen)
        got = student(clone(sds), list(w))
        assert isinstance(got, dict) and set(got) == set(sds[0]), \
            f"interpolate_state_dicts should return a dict with the keys {sorted(sds[0])}, got {type(got).__name__}"
        for k, expected in ref.interpolate(sds, w).items():
            assert_close(got[k], expected, f"interpolate_state_dicts(..., {[round(x, 3) for x in w]})[{k!r}]")
        vertex = [1.0 if i == n - 1 else 0.0 for i in range(n)]
        got = student(clone(sds), vertex)
        for k in sds[0]:
            assert_close(got[k], sds[-1][k],
                         f"the soup at the vertex {vertex}, key {k!r} (it should be expert {n - 1})",
                         atol=1e-12, rtol=0)


@check(points=1, function="interpolate_state_dicts")
def interpolate_refuses_bad_weights(ns):
    """raises ValueError for weights off the simplex (negative, not summing to 1) or one weight per expert missing"""
    student = get_function(ns, "interpolate_state_dicts")
    sds = random_state_dicts(2, generator(410))
    for bad in ([0.7, 0.7], [1.5, -0.5], [1.0], [0.2, 0.3, 0.5]):
        try:
            student(clone(sds), bad)
        except ValueError:
            continue
        raise AssertionError(f"interpolate_state_dicts with 2 experts and weights {bad} should raise ValueError "
                             "(weights must be >= 0, sum to 1, one per expert)")


@check(points=1, function="interpolate_state_dicts")
def interpolate_carries_integer_buffers(ns):
    """integer tensors (step counters) are not averaged: equal across experts they are returned as they are"""
    student = get_function(ns, "interpolate_state_dicts")
    sds = random_state_dicts(3, generator(415))
    for sd in sds:
        sd["bn.num_batches_tracked"] = torch.tensor(120, dtype=torch.long)
        sd["step"] = torch.tensor([7, 3], dtype=torch.int32)
    w = random_weights(3, generator(416))
    got = student(clone(sds), list(w))
    for k in ("bn.num_batches_tracked", "step"):
        assert isinstance(got.get(k), torch.Tensor) and got[k].dtype == sds[0][k].dtype \
            and torch.equal(got[k], sds[0][k]), \
            f"interpolate_state_dicts: the integer buffer {k!r} (equal in every expert, {sds[0][k].tolist()}) should " \
            f"be returned unchanged with its dtype {sds[0][k].dtype}, got {got.get(k)!r}"
    assert_close(got["layer.weight"], ref.interpolate([{"w": sd["layer.weight"]} for sd in sds], w)["w"],
                 "interpolate_state_dicts: the float tensors beside integer buffers")
    sds[1]["step"] = torch.tensor([8, 3], dtype=torch.int32)
    try:
        got = student(clone(sds), list(w))
    except ValueError:
        return
    raise AssertionError("interpolate_state_dicts with an integer buffer 'step' that differs between experts should "
                         f"raise ValueError (integers cannot be averaged), got {got.get('step')!r}")


# ---------------------------------------------------------------- lora_delta (4 points)

def random_lora(n: int, gen: torch.Generator, r: int = 3, d_in: int = 5, d_out: int = 4):
    As = [torch.randn(r, d_in, generator=gen, dtype=torch.float64) for _ in range(n)]
    Bs = [torch.randn(d_out, r, generator=gen, dtype=torch.float64) for _ in range(n)]
    return As, Bs


def reference_delta(As, Bs, w, mode):
    adapters = [{"m.lora_A.weight": a, "m.lora_B.weight": b} for a, b in zip(As, Bs)]
    return ref.lora_soup(adapters, w, mode)["m"]


def lora_matches_reference(ns, mode: str, seed: int) -> None:
    student = get_function(ns, "lora_delta")
    gen = generator(seed)
    for n in (2, 3):
        As, Bs = random_lora(n, gen)
        w = random_weights(n, gen)
        assert_close(student(clone(As), clone(Bs), list(w), mode), reference_delta(As, Bs, w, mode),
                     f"lora_delta(..., {[round(x, 3) for x in w]}, {mode!r})")


@check(points=1, function="lora_delta")
def lora_product_matches_reference(ns):
    """mode 'product': sum_i lambda_i B_i A_i (the soup of the full weights)"""
    lora_matches_reference(ns, "product", 420)


@check(points=1, function="lora_delta")
def lora_factors_matches_reference(ns):
    """mode 'factors': (sum_i lambda_i B_i)(sum_i lambda_i A_i), A and B averaged separately"""
    lora_matches_reference(ns, "factors", 430)


@check(points=1, function="lora_delta")
def lora_vertex_is_the_expert(ns):
    """at a vertex both modes give that expert's B_i A_i"""
    student = get_function(ns, "lora_delta")
    As, Bs = random_lora(3, generator(440))
    for i in range(3):
        vertex = [1.0 if j == i else 0.0 for j in range(3)]
        for mode in ("product", "factors"):
            assert_close(student(clone(As), clone(Bs), vertex, mode), Bs[i] @ As[i],
                         f"lora_delta at the vertex {vertex}, mode {mode!r} (expert {i}'s B A)", atol=1e-10, rtol=0)


@check(points=1, function="lora_delta")
def lora_ranks_may_differ_in_product_mode(ns):
    """experts of different ranks: 'product' still gives sum_i lambda_i B_i A_i, 'factors' raises ValueError"""
    student = get_function(ns, "lora_delta")
    gen = generator(445)
    As = [torch.randn(r, 5, generator=gen, dtype=torch.float64) for r in (2, 4)]
    Bs = [torch.randn(3, r, generator=gen, dtype=torch.float64) for r in (2, 4)]
    w = [0.3, 0.7]
    assert_close(student(clone(As), clone(Bs), list(w), "product"), 0.3 * Bs[0] @ As[0] + 0.7 * Bs[1] @ As[1],
                 "lora_delta(..., 'product') with experts of ranks 2 and 4")
    try:
        got = student(clone(As), clone(Bs), list(w), "factors")
    except ValueError:
        return
    raise AssertionError("lora_delta(..., 'factors') with experts of ranks 2 and 4 should raise ValueError (factors "
                         f"of different shapes cannot be averaged), got {type(got).__name__}")


# ---------------------------------------------------------------- pareto_mask (4 points)

def as_mask(out, n: int) -> list[bool]:
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bool and out.shape == (n,), \
        (f"pareto_mask should return a bool tensor of shape ({n},), got "
         f"{type(out).__name__} {getattr(out, 'dtype', '')} {tuple(getattr(out, 'shape', ()))}")
    return out.tolist()


@check(points=1, function="pareto_mask")
def pareto_matches_reference(ns):
    """matches the reference on random points, 2 and 3 rewards"""
    student = get_function(ns, "pareto_mask")
    gen = generator(450)
    for shape in ((12, 2), (20, 3), (1, 2), (6, 2)):
        pts = torch.randn(shape, generator=gen)
        got = as_mask(student(pts.clone()), shape[0])
        expected = ref.pareto_mask(pts).tolist()
        assert got == expected, f"pareto_mask on {pts.tolist()} returned {got}, expected {expected}"


@check(points=1, function="pareto_mask")
def pareto_keeps_front_duplicates(ns):
    """identical points do not dominate each other: duplicates of a front point stay, of a dominated one go"""
    student = get_function(ns, "pareto_mask")
    pts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.4, 0.4], [0.4, 0.4], [0.6, 0.6]])
    expected = [True, True, True, False, False, True]
    got = as_mask(student(pts.clone()), 6)
    assert got == expected, f"pareto_mask on {pts.tolist()} returned {got}, expected {expected}"


@check(points=1, function="pareto_mask")
def pareto_weak_dominance(ns):
    """a point tied in one reward and worse in another is dominated"""
    student = get_function(ns, "pareto_mask")
    pts = torch.tensor([[1.0, 0.0], [1.0, -1.0], [0.0, 2.0], [-0.5, 2.0], [0.5, 0.5]])
    expected = [True, False, True, False, True]
    got = as_mask(student(pts.clone()), 5)
    assert got == expected, f"pareto_mask on {pts.tolist()} returned {got}, expected {expected}"


@check(points=1, function="pareto_mask")
def pareto_minimises_costs(ns):
    """rewards listed in minimize are costs: lower is better there (the same front as negating them)"""
    student = get_function(ns, "pareto_mask")
    gen = generator(455)
    for shape, minimize in (((15, 2), (1,)), ((20, 3), (0, 2)), ((8, 2), ())):
        pts = torch.randn(shape, generator=gen)
        flipped = pts.clone()
        flipped[:, list(minimize)] *= -1
        got = as_mask(student(pts.clone(), minimize=minimize), shape[0])
        expected = ref.pareto_mask(flipped).tolist()
        assert got == expected, f"pareto_mask({pts.tolist()}, minimize={minimize}) returned {got}, expected {expected}"


# ---------------------------------------------------------------- hypervolume_2d (4 points)

def hv(student, pts, reference) -> float:
    return as_number(student(pts.clone(), reference.clone()), "hypervolume_2d")


@check(points=1, function="hypervolume_2d")
def hypervolume_matches_reference(ns):
    """matches the reference on random fronts above the reference point"""
    student = get_function(ns, "hypervolume_2d")
    gen = generator(460)
    reference = torch.tensor([-1.0, -1.0])
    for n in (1, 3, 8):
        t = torch.rand(n, generator=gen).sort().values * 1.5                       # a front: x up, y down
        pts = torch.stack([t, 1.5 - t + 0.1 * torch.rand(n, generator=gen)], -1)
        got, expected = hv(student, pts, reference), ref.hypervolume(pts, reference)
        assert abs(got - expected) <= 1e-5 * max(1.0, abs(expected)), \
            f"hypervolume_2d({pts.tolist()}, {reference.tolist()}) = {got}, expected {expected:.6f}"


@check(points=1, function="hypervolume_2d")
def hypervolume_ignores_dominated(ns):
    """dominated points and duplicates add nothing"""
    student = get_function(ns, "hypervolume_2d")
    reference = torch.tensor([0.0, 0.0])
    front = torch.tensor([[3.0, 1.0], [1.0, 3.0], [2.0, 2.0]])
    extra = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 1.0], [0.5, 2.5]])
    expected = ref.hypervolume(front, reference)                                  # 3 + 2 + 1 = 6
    got = hv(student, torch.cat([front, extra]), reference)
    assert abs(got - expected) < 1e-6, \
        f"hypervolume_2d of the front {front.tolist()} plus dominated or repeated points {extra.tolist()} = {got}, " \
        f"expected {expected} (the front's alone)"


@check(points=1, function="hypervolume_2d")
def hypervolume_ignores_points_under_the_reference(ns):
    """points not above the reference in both rewards add nothing (and alone give 0.0)"""
    student = get_function(ns, "hypervolume_2d")
    reference = torch.tensor([0.0, 0.0])
    pts = torch.tensor([[2.0, 1.0], [-1.0, 5.0], [3.0, -0.5], [0.0, 4.0]])
    got = hv(student, pts, reference)
    assert abs(got - 2.0) < 1e-6, f"hypervolume_2d({pts.tolist()}, {reference.tolist()}) = {got}, expected 2.0 " \
                                  "(only [2, 1] lies above the reference in both rewards)"
    got = hv(student, pts[1:], reference)
    assert abs(got) < 1e-9, f"hypervolume_2d({pts[1:].tolist()}, {reference.tolist()}) = {got}, expected 0.0"


@check(points=1, function="hypervolume_2d")
def hypervolume_of_a_batch_of_fronts(ns):
    """points (S, P, 2) give a (S,) float64 tensor, one hypervolume per front"""
    student = get_function(ns, "hypervolume_2d")
    pts = torch.randn(4, 6, 2, generator=generator(465))
    reference = torch.tensor([-1.5, -1.5])
    got = student(pts.clone(), reference.clone())
    expected = torch.tensor([ref.hypervolume(p, reference) for p in pts], dtype=torch.float64)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64, \
        f"hypervolume_2d of a batch (4, 6, 2) should return a float64 tensor, got {type(got).__name__} " \
        f"{getattr(got, 'dtype', '')}"
    assert_close(got, expected, "hypervolume_2d of a batch of 4 fronts")


# ---------------------------------------------------------------- the graded experiment (2 points)

MU = 0.5                 # the user's weight on R_2
TOLERANCE = 0.005        # utility within this of the best soup's


@check(points=2, function="choose_lambda")
def lambda_for_the_user(ns):
    """the chosen lambda gives user mu = 0.5 a utility within 0.005 of the best soup's (experts' Hessians differ)"""
    lam = as_number(run_experiment(ns, "choose_lambda"), "choose_lambda()")
    assert 0 <= lam <= 1, f"lambda must be in [0, 1], got {lam}"
    grid = torch.linspace(0, 1, 2001)
    best = max(tiny_lab.soup_utility(float(x), MU) for x in grid)
    got = tiny_lab.soup_utility(lam, MU)
    assert got >= best - TOLERANCE, \
        f"lambda = {lam:.3f} gives the user utility {got:.4f}; the best soup reaches {best:.4f}"
