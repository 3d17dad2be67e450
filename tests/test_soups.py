"""Rewarded soups: weight arithmetic, Pareto fronts, hypervolume, the selection phase, and the pipeline."""
import json

import pytest
import torch

from alignlib.models import load_model
from alignlib.soups import (SoupModel, SoupsConfig, adapter_state, check_simplex, hypervolume, interpolate,
                            lmc_gaps, lora_soup, make_reward, pareto_mask, run, select, simplex_grid)


def adapters(rank=2, shared_a=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    a0 = torch.randn(rank, 5, generator=g)
    out = []
    for _ in range(2):
        a = a0.clone() if shared_a else torch.randn(rank, 5, generator=g)
        out.append({"m.lora_A.weight": a, "m.lora_B.weight": torch.randn(3, rank, generator=g)})
    return out


@pytest.mark.unit
def test_a_vertex_is_the_expert_exactly():
    sds = [{"w": torch.randn(3, 3), "b": torch.randn(3)} for _ in range(3)]
    for i in range(3):
        vertex = [1.0 if j == i else 0.0 for j in range(3)]
        assert all(torch.equal(interpolate(sds, vertex)[k], sds[i][k]) for k in sds[i])
    ads = adapters()
    for mode in ("product", "factors"):
        delta = lora_soup(ads, [0.0, 1.0], mode, scaling=2.0)
        assert torch.equal(delta["m"], 2.0 * (ads[1]["m.lora_B.weight"] @ ads[1]["m.lora_A.weight"]))


@pytest.mark.unit
def test_product_is_the_soup_of_full_weights_and_factors_add_cross_terms():
    ads = adapters()
    w = [0.3, 0.7]
    product = lora_soup(ads, w, "product")["m"]
    full = interpolate([{"W": a["m.lora_B.weight"] @ a["m.lora_A.weight"]} for a in ads], w)["W"]
    torch.testing.assert_close(product, full)
    (A1, B1), (A2, B2) = ((a["m.lora_A.weight"], a["m.lora_B.weight"]) for a in ads)
    cross = 0.3 * 0.7 * (B1 @ A2 + B2 @ A1)
    own = 0.09 * B1 @ A1 + 0.49 * B2 @ A2
    torch.testing.assert_close(lora_soup(ads, w, "factors")["m"], own + cross)
    assert not torch.allclose(lora_soup(ads, w, "factors")["m"], product, atol=1e-3)
    shared = adapters(shared_a=True)          # one shared A: the two modes agree
    torch.testing.assert_close(lora_soup(shared, w, "factors")["m"], lora_soup(shared, w, "product")["m"])


@pytest.mark.unit
def test_soup_model_at_a_vertex_gives_the_experts_logits(fresh_tiny):
    torch.manual_seed(0)
    expert, tok = fresh_tiny(lora=True)
    with torch.no_grad():                     # a trained-looking adapter: B away from its zero initialisation
        for name, p in expert.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ad, s = adapter_state(expert)
    other = {k: torch.randn_like(v) * 0.05 for k, v in ad.items()}
    soup = SoupModel("tiny-random")
    soup.set(lora_soup([ad, other], [1.0, 0.0], "product", s))
    ids = tok(["a movie about a cat"], return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = expert(ids).logits, soup.model(ids).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(soup.initial(ids).logits, want, atol=1e-3)   # the adapter mattered
        soup.set({})                          # back to W_0 exactly
        assert torch.equal(soup.model(ids).logits, soup.initial(ids).logits)
    with pytest.raises(ValueError, match="different base model"):
        soup.set({"base_model.model.model.nowhere.q_proj": torch.zeros(2, 2)})


@pytest.mark.unit
def test_full_weight_soups_set_and_restore():
    soup = SoupModel("tiny-random")
    a, _ = load_model("tiny-random", seed=1)   # two other weight seeds than the session's tiny model
    b, _ = load_model("tiny-random", seed=2)
    sds = [{k: v for k, v in m.state_dict().items() if k.endswith("q_proj.weight")} for m in (a, b)]
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        soup.set_full(interpolate(sds, [0.0, 1.0]))
        name = next(iter(sds[1]))
        assert torch.equal(dict(soup.model.named_parameters())[name], sds[1][name])
        soup.set({})                          # W_0 again
        assert torch.equal(soup.model(ids).logits, soup.initial(ids).logits)
    with pytest.raises(ValueError, match="different base model"):
        soup.set_full({"nowhere.weight": torch.zeros(1)})


@pytest.mark.unit
@pytest.mark.parametrize("weights, message", [([0.5, 0.6], "not on the simplex"), ([1.2, -0.2], "not on the simplex"),
                                              ([1.0], "one weight per expert"),
                                              ([float("nan"), 1.0], "not on the simplex")])
def test_weights_off_the_simplex_are_refused(weights, message):
    with pytest.raises(ValueError, match=message):
        lora_soup(adapters(), weights)


@pytest.mark.unit
def test_experts_that_do_not_match_are_refused():
    with pytest.raises(ValueError, match="different parameters"):
        interpolate([{"a": torch.zeros(2)}, {"b": torch.zeros(2)}], [0.5, 0.5])
    with pytest.raises(ValueError, match="shape"):
        interpolate([{"a": torch.zeros(2)}, {"a": torch.zeros(3)}], [0.5, 0.5])
    with pytest.raises(ValueError, match="different ranks"):
        lora_soup([adapters(rank=2)[0], adapters(rank=4)[0]], [0.5, 0.5])
    with pytest.raises(ValueError, match="adapts different modules"):
        lora_soup([adapters()[0], {"n.lora_A.weight": torch.zeros(2, 5), "n.lora_B.weight": torch.zeros(3, 2)}],
                  [0.5, 0.5])
    with pytest.raises(ValueError, match="not a LoRA state dict"):
        lora_soup([{"w": torch.zeros(2)}], [1.0])


@pytest.mark.unit
def test_pareto_mask_with_ties_and_duplicates():
    pts = [[1, 0], [0, 1], [0.5, 0.5], [0.4, 0.4], [0.4, 0.4], [1, 0], [0.5, 0.2], [1, -1]]
    #       front   front   front       dominated   duplicate  dup of front  dominated  dominated (tie in R1)
    assert pareto_mask(pts).tolist() == [True, True, True, False, False, True, False, False]
    assert pareto_mask([[0.0, 0.0]]).tolist() == [True]
    with pytest.raises(ValueError, match="P >= 1"):
        pareto_mask(torch.zeros(0, 2))


@pytest.mark.unit
def test_hypervolume_by_hand():
    ref = [0.0, 0.0]
    assert hypervolume([[1, 1]], ref) == pytest.approx(1.0)
    assert hypervolume([[2, 1], [1, 2]], ref) == pytest.approx(3.0)               # two rectangles minus overlap
    assert hypervolume([[2, 1], [1, 2], [1, 1], [2, 1]], ref) == pytest.approx(3.0)  # dominated and duplicates add 0
    assert hypervolume([[2, 1], [-1, 5]], ref) == pytest.approx(2.0)              # below the reference: nothing
    assert hypervolume([[1, 1, 1]], [0, 0, 0]) == pytest.approx(1.0)
    # 3 boxes: 6 - 3 overlaps + 1 = 4
    assert hypervolume([[2, 1, 1], [1, 2, 1], [1, 1, 2]], [0, 0, 0]) == pytest.approx(4.0)
    assert hypervolume([[1, 2]], [0.5, 1.0]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="reference"):
        hypervolume([[1, 2]], [0, 0, 0])


@pytest.mark.unit
def test_selection_picks_the_best_soup_for_a_linear_user():
    val = torch.tensor([[1.0, 0.0], [0.8, 0.5], [0.0, 1.0]])
    assert select([1.0, 0.0], val) == 0
    assert select([0.5, 0.5], val) == 1
    assert select([0.0, 1.0], val) == 2
    assert select([0.5, 0.5], torch.tensor([[1.0, 1.0], [1.0, 1.0]])) == 0       # a tie goes to the first
    with pytest.raises(ValueError, match="simplex"):
        select([0.7, 0.7], val)


@pytest.mark.unit
def test_lmc_gaps_and_the_grid():
    ends = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    soups = torch.tensor([[1.0, 0.0], [0.6, 0.6], [0.0, 1.0]])
    gaps = lmc_gaps(soups, ends, [0.0, 0.5, 1.0])
    torch.testing.assert_close(gaps, torch.tensor([[0.0, 0.0], [0.1, 0.1], [0.0, 0.0]], dtype=torch.float64))
    assert len(simplex_grid(2, 10)) == 11 and len(simplex_grid(3, 4)) == 15
    assert all(abs(sum(p) - 1) < 1e-12 for p in simplex_grid(3, 4))
    assert check_simplex([0.25, 0.75], 2) == [0.25, 0.75]


@pytest.mark.pipeline
def test_the_pipeline_on_the_tiny_model(tmp_path):
    """Experts, MORL and every soup evaluated; the summary's pieces are consistent and JSON-ready."""
    def letters(p, r): return torch.tensor([float(sum(c.isalpha() for c in x)) for x in r])
    def lower(p, r): return torch.tensor([float(sum(c.islower() for c in x)) for x in r])
    def other(p, r): return torch.tensor([float(sum(not c.isalnum() for c in x)) for x in r])

    cfg = SoupsConfig(model="tiny-random", rewards=(letters, lower, other), steps=1, lambdas=3, simplex_steps=2,
                      morl_mus=(0.5,), eval_prompts=8, samples=2, max_new_tokens=8)
    result = run(cfg, out=tmp_path, progress=False)
    json.dumps(result)
    s = result["summary"]
    assert s["n2"]["trainings_rs"] == 2 and s["n2"]["trainings_morl"] == 3
    assert s["n2"]["hv_rs"] >= 0 and len(s["lmc"]["letters"]) == 3
    assert [row["gap"] for row in s["lmc"]["lower"]][0] == pytest.approx(0.0)      # lambda = 0 is expert 1
    assert s["n3"]["trainings_rs"] == 3 and s["n3"]["trainings_morl"] == 5
    assert set(s["users"]) == {"enthusiast", "matter-of-fact"}
    assert len(list(tmp_path.glob("stages/*/adapter.safetensors"))) == 5            # 3 experts, 2 MORL runs


@pytest.mark.unit
def test_presets_and_bad_configs():
    lab = SoupsConfig.preset("lab-gpu")
    assert lab.rewards[0].startswith("rm:") and lab.trainer_preset == "lab-gpu" and len(lab.morl_mus) == 9
    for bad, message in ((dict(rewards=("positive",)), "at least 2"), (dict(trainer="dpo"), "trainer"),
                         (dict(eval_prompts=41), "even eval_prompts"), (dict(morl_mus=(0.0, 0.5)), "strictly"),
                         (dict(morl_simplex=((0.5, 0.6, 0.0),)), "simplex")):
        with pytest.raises(ValueError, match=message):
            SoupsConfig(**bad)
    with pytest.raises(ValueError, match="unknown reward"):
        make_reward("funny")


@pytest.mark.unit
def test_non_finite_experts_and_mixed_lora_scalings_are_refused():
    ads = adapters()
    ads[1]["m.lora_B.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="adapter 1's m.lora_B.weight holds non-finite values"):
        lora_soup(ads, [0.5, 0.5])
    with pytest.raises(ValueError, match="adapter 1's m.lora_B.weight holds non-finite values"):
        lora_soup(ads, [1.0, 0.0])                 # even at weight 0: 0 * NaN is NaN
    with pytest.raises(ValueError, match="expert 1's w holds non-finite values"):
        interpolate([{"w": torch.zeros(2)}, {"w": torch.tensor([1.0, float("inf")])}], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"scalings lora_alpha / r differ \(\[2.0, 4.0\]\)"):
        lora_soup(adapters(), [0.5, 0.5], scaling=[2.0, 4.0])
    same = lora_soup(adapters(), [0.3, 0.7], scaling=[2.0, 2.0])["m"]
    assert torch.equal(same, lora_soup(adapters(), [0.3, 0.7], scaling=2.0)["m"])


@pytest.mark.unit
def test_a_soup_that_fails_at_a_later_module_leaves_the_weights_bit_identical(fresh_tiny):
    torch.manual_seed(0)
    expert, _ = fresh_tiny(lora=True)
    ad, s = adapter_state(expert)
    ad = {k: torch.randn_like(v) * 0.05 for k, v in ad.items()}
    soup = SoupModel("tiny-random")
    soup.set(lora_soup([ad, ad], [0.5, 0.5], "product", s))           # a soup in place
    before = {k: v.clone() for k, v in soup.model.state_dict().items()}
    good = lora_soup([ad, ad], [0.2, 0.8], "product", s)
    last = list(good)[-1]
    for bad, message in (({**good, last: good[last][:, :-1]}, "has shape"),
                         ({**good, last: torch.full_like(good[last], float("nan"))}, "non-finite"),
                         ({**good, "base_model.model.model.nowhere": torch.zeros(2, 2)}, "different base model")):
        with pytest.raises(ValueError, match=message):
            soup.set(bad)
        assert all(torch.equal(v, before[k]) for k, v in soup.model.state_dict().items())
    first, *_, last = (n for n, _ in soup.model.named_parameters())
    with pytest.raises(ValueError, match=f"the soup's {last} holds non-finite values"):
        soup.set_full({first: torch.zeros_like(before[first]), last: before[last] * float("nan")})
    assert all(torch.equal(v, before[k]) for k, v in soup.model.state_dict().items())
