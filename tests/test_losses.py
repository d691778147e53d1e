"""Tests of prefixshare.losses against the papers' formulas written out per pair with the math module."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from prefixshare.logps import TokenIndex
from prefixshare.losses import (
    LOSSES,
    REFERENCE_FREE,
    TRL_LOSS_TYPES,
    aot_loss,
    aot_unpaired_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    bradley_terry_loss,
    discopop_loss,
    dpo_loss,
    exo_pair_loss,
    f_divergence_scores,
    hinge_loss,
    ipo_loss,
    length_desensitized_logps,
    nca_pair_loss,
    nll_loss,
    orpo_loss,
    preference_loss,
    robust_dpo_loss,
    rpo_loss,
    sft_loss,
    sigmoid_norm_loss,
    simpo_loss,
    sppo_hard_loss,
    wpo_weights,
)

N = 7
BATCH_COUPLED = {"aot", "aot_unpaired"}  # losses of the sorted batch, not of each pair
METRIC_NAMES = {
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
}


# ----------------------------------------------------------------------------------------------------------------
# Inputs and the per-pair reference formulas (plain Python floats, no torch)
# ----------------------------------------------------------------------------------------------------------------


def make_inputs(seed: int, n: int = N, dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    chosen_num_tokens = torch.randint(1, 40, (n,), generator=g)
    rejected_num_tokens = torch.randint(1, 40, (n,), generator=g)

    def logps(num_tokens):
        # Summed log-probs of plausible size: each token between about -3 and 0.
        return -(torch.rand(n, generator=g, dtype=torch.float64) * 3.0 + 0.01) * num_tokens

    return {
        "policy_chosen_logps": logps(chosen_num_tokens).to(dtype),
        "policy_rejected_logps": logps(rejected_num_tokens).to(dtype),
        "reference_chosen_logps": logps(chosen_num_tokens).to(dtype),
        "reference_rejected_logps": logps(rejected_num_tokens).to(dtype),
        "chosen_num_tokens": chosen_num_tokens,
        "rejected_num_tokens": rejected_num_tokens,
    }


def rows(inputs):
    """Per-pair Python floats: (pi_c, pi_r, ref_c, ref_r, n_c, n_r)."""
    names = (
        "policy_chosen_logps",
        "policy_rejected_logps",
        "reference_chosen_logps",
        "reference_rejected_logps",
        "chosen_num_tokens",
        "rejected_num_tokens",
    )
    return list(zip(*(inputs[k].tolist() for k in names)))


def logsigmoid(x: float) -> float:
    # log(1 / (1 + e^-x)), written so that neither branch overflows.
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def expected_dpo(inputs, beta, eps):
    out = []
    for pc, pr, rc, rr, _, _ in rows(inputs):
        h = (pc - rc) - (pr - rr)
        out.append(-(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h))
    return out


def expected_robust(inputs, beta, eps):
    out = []
    for pc, pr, rc, rr, _, _ in rows(inputs):
        h = (pc - rc) - (pr - rr)
        out.append((-(1 - eps) * logsigmoid(beta * h) + eps * logsigmoid(-beta * h)) / (1 - 2 * eps))
    return out


def expected_hinge(inputs, beta):
    return [max(0.0, 1 - beta * ((pc - rc) - (pr - rr))) for pc, pr, rc, rr, _, _ in rows(inputs)]


def expected_ipo(inputs, beta, length_normalize):
    out = []
    for pc, pr, rc, rr, nc, nr in rows(inputs):
        h = (pc - rc) / nc - (pr - rr) / nr if length_normalize else (pc - rc) - (pr - rr)
        out.append((h - 1 / (2 * beta)) ** 2)
    return out


def expected_simpo(inputs, beta, gamma, eps):
    out = []
    for pc, pr, _, _, nc, nr in rows(inputs):
        z = beta * (pc / nc - pr / nr) - gamma
        out.append(-(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z))
    return out


def expected_orpo(inputs, beta):
    out = []
    for pc, pr, _, _, nc, nr in rows(inputs):
        ac, ar = pc / nc, pr / nr
        # Straight from the paper: odds(p) = p / (1 - p) with p = exp(avg).
        odds_c, odds_r = math.exp(ac) / (1 - math.exp(ac)), math.exp(ar) / (1 - math.exp(ar))
        out.append(-ac - beta * logsigmoid(math.log(odds_c / odds_r)))
    return out


def expected_rpo(inputs, beta, alpha, eps):
    dpo = expected_dpo(inputs, beta, eps)
    return [d + alpha * (-pc / nc) for d, (pc, _, _, _, nc, _) in zip(dpo, rows(inputs))]


def expected_nll(inputs, length_normalize):
    return [-pc / nc if length_normalize else -pc for pc, _, _, _, nc, _ in rows(inputs)]


def check_reductions(call, expected_per_pair):
    """call(reduction) -> (loss, metrics); compare mean, sum and none to the expected per-pair losses."""
    expected = torch.tensor(expected_per_pair, dtype=torch.float64)
    loss_mean, metrics_mean = call("mean")
    loss_sum, metrics_sum = call("sum")
    loss_none, _ = call("none")
    assert loss_mean.dim() == 0 and loss_sum.dim() == 0
    assert loss_none.shape == expected.shape
    torch.testing.assert_close(loss_none, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss_mean, expected.mean(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss_sum, expected.sum(), rtol=1e-10, atol=1e-10)
    # Metrics are means over pairs whatever the reduction.
    assert metrics_mean.keys() == metrics_sum.keys()
    for key in metrics_mean:
        torch.testing.assert_close(metrics_mean[key], metrics_sum[key])


REF_ARGS = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")


def ref_args(inputs):
    return [inputs[k] for k in REF_ARGS]


# ----------------------------------------------------------------------------------------------------------------
# Formulas
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_dpo_formula(seed, beta, eps):
    inputs = make_inputs(seed)
    check_reductions(
        lambda r: dpo_loss(*ref_args(inputs), beta=beta, label_smoothing=eps, reduction=r),
        expected_dpo(inputs, beta, eps),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.4])
def test_robust_formula(seed, eps):
    inputs = make_inputs(seed)
    check_reductions(
        lambda r: robust_dpo_loss(*ref_args(inputs), beta=0.2, label_smoothing=eps, reduction=r),
        expected_robust(inputs, 0.2, eps),
    )


def test_robust_without_smoothing_is_dpo():
    inputs = make_inputs(5)
    torch.testing.assert_close(robust_dpo_loss(*ref_args(inputs))[0], dpo_loss(*ref_args(inputs))[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_hinge_formula(seed, beta):
    inputs = make_inputs(seed)
    check_reductions(
        lambda r: hinge_loss(*ref_args(inputs), beta=beta, reduction=r), expected_hinge(inputs, beta)
    )


def test_hinge_is_zero_beyond_margin():
    z = torch.zeros(3, dtype=torch.float64)
    loss, _ = hinge_loss(torch.tensor([30.0, 10.0, 9.0], dtype=torch.float64), z, z, z, beta=0.1)
    # beta * h = 3, 1, 0.9: only the last pair is inside the margin.
    torch.testing.assert_close(loss, torch.tensor(0.1 / 3, dtype=torch.float64))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("length_normalize", [True, False])
def test_ipo_formula(seed, length_normalize):
    inputs = make_inputs(seed)
    check_reductions(
        lambda r: ipo_loss(
            *ref_args(inputs),
            inputs["chosen_num_tokens"],
            inputs["rejected_num_tokens"],
            beta=0.3,
            length_normalize=length_normalize,
            reduction=r,
        ),
        expected_ipo(inputs, 0.3, length_normalize),
    )


def test_ipo_defaults_to_length_normalized():
    inputs = make_inputs(3)
    counts = (inputs["chosen_num_tokens"], inputs["rejected_num_tokens"])
    default, _ = ipo_loss(*ref_args(inputs), *counts, beta=0.3)
    normalized, _ = ipo_loss(*ref_args(inputs), *counts, beta=0.3, length_normalize=True)
    summed, _ = ipo_loss(*ref_args(inputs), beta=0.3, length_normalize=False)  # needs no counts
    torch.testing.assert_close(default, normalized)
    assert not torch.allclose(default, summed)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("beta", "gamma", "eps"), [(2.0, 0.0, 0.0), (2.5, 1.25, 0.0), (0.1, 0.5, 0.2)])
def test_simpo_formula(seed, beta, gamma, eps):
    inputs = make_inputs(seed)
    check_reductions(
        lambda r: simpo_loss(
            inputs["policy_chosen_logps"],
            inputs["policy_rejected_logps"],
            inputs["chosen_num_tokens"],
            inputs["rejected_num_tokens"],
            beta=beta,
            gamma=gamma,
            label_smoothing=eps,
            reduction=r,
        ),
        expected_simpo(inputs, beta, gamma, eps),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_formula(seed, beta):
    inputs = make_inputs(seed)
    check_reductions(
        lambda r: orpo_loss(
            inputs["policy_chosen_logps"],
            inputs["policy_rejected_logps"],
            inputs["chosen_num_tokens"],
            inputs["rejected_num_tokens"],
            beta=beta,
            reduction=r,
        ),
        expected_orpo(inputs, beta),
    )


def test_orpo_stable_near_probability_one_and_zero():
    # Averages near 0 (p -> 1) and very negative (p -> 0) are where naive log(1 - exp(x)) breaks down.
    chosen = torch.tensor([-1e-9, 0.0, -200.0, -1e-30], dtype=torch.float32, requires_grad=True)
    rejected = torch.tensor([-5.0, -1e-7, -300.0, 0.0], dtype=torch.float32, requires_grad=True)
    ones = torch.ones(4, dtype=torch.long)
    loss, metrics = orpo_loss(chosen, rejected, ones, ones)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in metrics.values())
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    # Where math is still accurate, agree with it.
    x = -1e-9
    expected = -x - 0.1 * logsigmoid(x + 5.0 - (math.log(-math.expm1(x)) - math.log1p(-math.exp(-5.0))))
    loss_none, _ = orpo_loss(chosen.detach().double(), rejected.detach().double(), ones, ones, reduction="none")
    assert loss_none[0].item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("alpha", "eps"), [(1.0, 0.0), (0.5, 0.1), (0.0, 0.0)])
def test_rpo_formula(seed, alpha, eps):
    inputs = make_inputs(seed)
    check_reductions(
        lambda r: rpo_loss(
            *ref_args(inputs), inputs["chosen_num_tokens"], beta=0.1, alpha=alpha, label_smoothing=eps, reduction=r
        ),
        expected_rpo(inputs, 0.1, alpha, eps),
    )


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("length_normalize", [True, False])
def test_nll_formula(seed, length_normalize):
    inputs = make_inputs(seed)
    check_reductions(
        lambda r: nll_loss(
            inputs["policy_chosen_logps"],
            inputs["chosen_num_tokens"] if length_normalize else None,
            length_normalize=length_normalize,
            reduction=r,
        ),
        expected_nll(inputs, length_normalize),
    )


# ----------------------------------------------------------------------------------------------------------------
# TRL 1.16's other loss types, written out per pair from TRL's DPOTrainer._compute_loss (read, not imported)
# ----------------------------------------------------------------------------------------------------------------


def sigmoid(x: float) -> float:
    return math.exp(logsigmoid(x))


def ratios(inputs):
    """Per pair: (log-ratio chosen, log-ratio rejected, n_c, n_r, policy margin, reference margin)."""
    return [(pc - rc, pr - rr, nc, nr, pc - pr, rc - rr) for pc, pr, rc, rr, nc, nr in rows(inputs)]


def per_pair_formula(name, inputs, beta, **o):
    out = []
    for c, r, nc, nr, _, _ in ratios(inputs):
        h = c - r
        if name == "exo_pair":
            e, z = o["label_smoothing"], beta * h
            out.append(sigmoid(z) * (logsigmoid(z) - math.log1p(-e)) + sigmoid(-z) * (logsigmoid(-z) - math.log(e)))
        elif name == "nca_pair":
            out.append(-logsigmoid(beta * c) - 0.5 * logsigmoid(-beta * c) - 0.5 * logsigmoid(-beta * r))
        elif name == "bco_pair":
            d = o.get("reward_shift", 0.0)
            out.append(-logsigmoid(beta * c - d) - logsigmoid(-(beta * r - d)))
        elif name == "sppo_hard":
            out.append((c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2)
        elif name == "apo_zero":
            out.append(1 - sigmoid(beta * c) + sigmoid(beta * r))
        elif name == "apo_down":
            out.append(sigmoid(beta * c) + 1 - sigmoid(beta * (c - r)))
        elif name == "discopop":
            z, tau = beta * h, o.get("tau", 0.05)
            m = sigmoid(z / tau)
            out.append(-logsigmoid(z) * (1 - m) + math.exp(-z) * m)
        elif name == "sigmoid_norm":
            out.append(-logsigmoid(beta * (c / nc - r / nr)))
    return out


def sorted_formula(name, inputs, beta, eps):
    if name == "aot":
        a = sorted(m for *_, m, _ in ratios(inputs))
        b = sorted(ref for *_, ref in ratios(inputs))
    else:
        a = sorted(c for c, *_ in ratios(inputs))
        b = sorted(r for _, r, *_ in ratios(inputs))
    return [-(1 - eps) * logsigmoid(beta * (x - y)) - eps * logsigmoid(-beta * (x - y)) for x, y in zip(a, b)]


NEW_PER_PAIR = [
    ("exo_pair", exo_pair_loss, {"label_smoothing": 1e-3}),
    ("exo_pair", exo_pair_loss, {"label_smoothing": 0.2}),
    ("nca_pair", nca_pair_loss, {}),
    ("bco_pair", bco_pair_loss, {}),
    ("bco_pair", bco_pair_loss, {"reward_shift": 0.3}),
    ("sppo_hard", sppo_hard_loss, {}),
    ("apo_zero", apo_zero_loss, {}),
    ("apo_down", apo_down_loss, {}),
    ("discopop", discopop_loss, {}),
    ("discopop", discopop_loss, {"tau": 0.5}),
    ("sigmoid_norm", sigmoid_norm_loss, {}),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("name", "fn", "options"), NEW_PER_PAIR, ids=[f"{n}{o}" for n, _, o in NEW_PER_PAIR])
def test_trl_loss_formulas(seed, name, fn, options):
    inputs = make_inputs(seed)
    counts = (inputs["chosen_num_tokens"], inputs["rejected_num_tokens"]) if name == "sigmoid_norm" else ()
    check_reductions(
        lambda r: fn(*ref_args(inputs), *counts, beta=0.07, reduction=r, **options),
        per_pair_formula(name, inputs, 0.07, **options),
    )
    # the dispatcher takes the same options under TRL's name
    loss, _ = preference_loss(name, beta=0.07, **inputs, **options)
    torch.testing.assert_close(loss, torch.tensor(per_pair_formula(name, inputs, 0.07, **options), dtype=torch.float64).mean())


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.7])
def test_aot_formulas_sort_the_batch(name, eps):
    inputs = make_inputs(3)
    fn = aot_loss if name == "aot" else aot_unpaired_loss
    check_reductions(
        lambda r: fn(*ref_args(inputs), beta=0.2, label_smoothing=eps, reduction=r),
        sorted_formula(name, inputs, 0.2, eps),
    )


def test_sft_is_one_token_mean_over_the_batch():
    """TRL's sft term: -(all chosen token log-probs) / (all chosen tokens), not a mean of per-pair means."""
    inputs = make_inputs(6)
    pc, nc = inputs["policy_chosen_logps"], inputs["chosen_num_tokens"]
    check_reductions(lambda r: sft_loss(pc, nc, reduction=r), (-pc * N / nc.sum()).tolist())
    loss, metrics = sft_loss(pc, nc, policy_rejected_logps=inputs["policy_rejected_logps"])
    assert loss.item() == pytest.approx(-pc.sum().item() / nc.sum().item(), rel=1e-12)
    assert set(metrics) == {"logps/chosen", "logps/rejected", "nll_loss"}
    assert loss.item() != pytest.approx(nll_loss(pc, nc)[0].item(), rel=1e-3)  # unequal lengths: not nll's mean


# ---------------------------------------------------------------------------------------------------------------- f-DPO


def f_prime(kind, lr, alpha=0.5):
    if kind == "reverse_kl":
        return lr
    if kind == "forward_kl":
        return 1 - math.exp(-lr)
    if kind == "js_divergence":
        return math.log(2) + logsigmoid(lr)
    return (math.exp((alpha - 1) * lr) - 1) / (alpha - 1)


F_CASES = [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5), ("alpha_divergence", 0.3)]
F_LOSSES = ["dpo", "robust", "hinge", "ipo", "exo_pair", "discopop", "sigmoid_norm"]


@pytest.mark.parametrize(("kind", "alpha"), F_CASES)
@pytest.mark.parametrize("name", F_LOSSES)
def test_f_divergences_replace_log_ratios_by_f_prime(name, kind, alpha):
    """Under an f-divergence a loss on the margin is that loss on f'(ratio) differences (TRL's f-DPO); the rewards
    stay beta * log-ratios."""
    inputs = {k: (v / 20 if v.is_floating_point() else v) for k, v in make_inputs(7).items()}  # |log-ratio| < 3
    options = {"exo_pair": {"label_smoothing": 1e-2}, "robust": {"label_smoothing": 0.1}}.get(name, {})
    got, metrics = preference_loss(
        name, beta=0.5, reduction="none", f_divergence=kind, f_alpha_divergence_coef=alpha, **options, **inputs
    )
    # the same loss on reverse-KL inputs whose log-ratios ARE f'(ratio): reference 0, policy = f'(ratio)
    scores = {side: torch.tensor([f_prime(kind, x, alpha) for x in (inputs[f"policy_{side}_logps"]
              - inputs[f"reference_{side}_logps"]).tolist()], dtype=torch.float64) for side in ("chosen", "rejected")}
    zero = torch.zeros(N, dtype=torch.float64)
    want, _ = preference_loss(
        name, beta=0.5, reduction="none", policy_chosen_logps=scores["chosen"], policy_rejected_logps=scores["rejected"],
        reference_chosen_logps=zero, reference_rejected_logps=zero, chosen_num_tokens=inputs["chosen_num_tokens"],
        rejected_num_tokens=inputs["rejected_num_tokens"], **options,
    )
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    _, plain = preference_loss(name, beta=0.5, **options, **inputs)
    assert metrics == plain


def test_alpha_divergence_near_one_is_reverse_kl_and_clamps():
    lr = torch.tensor([-3.0, 0.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(f_divergence_scores(lr, "alpha_divergence", 1.0 + 1e-8), lr)
    big = f_divergence_scores(torch.tensor([1000.0]), "alpha_divergence", 2.0)
    assert torch.isfinite(big).all() and big.item() == pytest.approx(math.exp(80.0) - 1, rel=1e-6)


@pytest.mark.parametrize("name", ["nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "aot", "aot_unpaired"])
def test_losses_without_f_generalization_refuse_f_divergence(name):
    with pytest.raises(ValueError, match=rf"{name} loss does not take option\(s\) \['f_divergence'\]"):
        preference_loss(name, f_divergence="forward_kl", **make_inputs(0))


def test_bad_f_divergence_and_exo_smoothing():
    with pytest.raises(ValueError, match=r"dpo loss: unknown f_divergence 'kl'; choose from \['reverse_kl'"):
        dpo_loss(*ref_args(make_inputs(0)), f_divergence="kl")
    for eps in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"exo_pair loss needs label_smoothing in \(0, 1\), got .*1e-3"):
            exo_pair_loss(*ref_args(make_inputs(0)), label_smoothing=eps)
    with pytest.raises(ValueError, match=r"discopop loss needs tau > 0"):
        discopop_loss(*ref_args(make_inputs(0)), tau=0.0)
    with pytest.raises(ValueError, match=r"aot loss needs label_smoothing in \[0, 1\]"):
        aot_loss(*ref_args(make_inputs(0)), label_smoothing=1.5)


# ---------------------------------------------------------------------------------------------------------------- WPO, LD-DPO


def per_token_pairs(seed=0):
    """Per-token values of n=3 pairs in the engine's form: token_logps [T], TokenIndex, num_tokens [3, 2]."""
    g = torch.Generator().manual_seed(seed)
    num_tokens = torch.tensor([[3, 5], [4, 2], [1, 1]])
    example, response, position = [], [], []
    for i in range(3):
        for k in range(2):
            for j in range(int(num_tokens[i, k])):
                example.append(i), response.append(k), position.append(j)
    index = TokenIndex(*(torch.tensor(v) for v in (example, response, position)))
    T = len(example)
    token_logps = -torch.rand(T, generator=g, dtype=torch.float64) * 3
    lssp = -torch.rand(T, generator=g, dtype=torch.float64) * 2
    return token_logps, lssp, index, num_tokens


def test_wpo_weights_are_products_of_length_normalized_aligned_probabilities():
    token_logps, lssp, index, num_tokens = per_token_pairs()
    weights = wpo_weights(token_logps.requires_grad_(), lssp, index, num_tokens)
    want = []
    for i in range(3):
        w = 1.0
        for k in range(2):
            sel = (index.example == i) & (index.response == k)
            w *= math.exp(float((token_logps.detach()[sel] - lssp[sel]).sum()) / int(num_tokens[i, k]))
        want.append(w)
    torch.testing.assert_close(weights, torch.tensor(want, dtype=torch.float64))
    assert not weights.requires_grad
    # as weights= of a loss: each per-pair loss multiplied, the gradient not through the weights
    inputs = make_inputs(0, n=3)
    plain, _ = dpo_loss(*ref_args(inputs), reduction="none")
    weighted, _ = dpo_loss(*ref_args(inputs), reduction="none", weights=weights)
    torch.testing.assert_close(weighted, plain * weights)
    with pytest.raises(ValueError, match=r"dpo loss: weights must be a tensor of shape \[3\]"):
        dpo_loss(*ref_args(inputs), weights=weights[:2])


def test_length_desensitized_logps_damp_the_longer_tail():
    token_logps, _, index, num_tokens = per_token_pairs(1)
    token_logps.requires_grad_()
    got = length_desensitized_logps(token_logps, index, num_tokens, alpha=0.25)
    want = torch.zeros(3, 2, dtype=torch.float64)
    for t in range(len(token_logps)):
        i, k, j = int(index.example[t]), int(index.response[t]), int(index.position[t])
        shared = int(num_tokens[i].min())
        want[i, k] += token_logps[t].item() * (1.0 if j < shared else 0.25)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert sorted(set(token_logps.grad.tolist())) == [0.25, 1.0]
    # alpha = 1: the plain sums
    plain = length_desensitized_logps(token_logps.detach(), index, num_tokens, alpha=1.0)
    torch.testing.assert_close(plain.sum(), token_logps.detach().sum())


# ---------------------------------------------------------------------------------------------------------------- reward models


@pytest.mark.parametrize("coef", [None, 0.01])
@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_formula_and_metrics(coef, with_margin):
    g = torch.Generator().manual_seed(2)
    chosen, rejected = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    margin = torch.rand(N, generator=g, dtype=torch.float64) if with_margin else None
    expected = [
        -logsigmoid(c - r - (m if with_margin else 0.0)) + (coef or 0.0) * (c + r) ** 2
        for c, r, m in zip(chosen.tolist(), rejected.tolist(), (margin if with_margin else chosen).tolist())
    ]
    check_reductions(
        lambda red: bradley_terry_loss(chosen, rejected, margin=margin, center_rewards_coefficient=coef, reduction=red),
        expected,
    )
    _, metrics = bradley_terry_loss(chosen, rejected, margin=margin)
    both = chosen.tolist() + rejected.tolist()
    assert metrics["accuracy"].item() == pytest.approx(mean([float(c > r) for c, r in zip(chosen, rejected)]))
    assert metrics["margin"].item() == pytest.approx(mean((chosen - rejected).tolist()))
    assert (metrics["min_reward"].item(), metrics["max_reward"].item()) == (min(both), max(both))
    assert metrics["mean_reward"].item() == pytest.approx(mean(both))


def test_low_precision_inputs_are_computed_in_float32():
    inputs = make_inputs(0, dtype=torch.bfloat16)
    loss, metrics = dpo_loss(*ref_args(inputs))
    assert loss.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in metrics.values())
    exact = torch.tensor(expected_dpo({k: v.double() for k, v in inputs.items()}, 0.1, 0.0)).mean()
    assert loss.item() == pytest.approx(exact.item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


def mean(values):
    return sum(values) / len(values)


def expected_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps):
    return {
        "rewards/chosen": mean(chosen_rewards),
        "rewards/rejected": mean(rejected_rewards),
        "rewards/accuracies": mean([float(c > r) for c, r in zip(chosen_rewards, rejected_rewards)]),
        "rewards/margins": mean([c - r for c, r in zip(chosen_rewards, rejected_rewards)]),
        "logps/chosen": mean(chosen_logps),
        "logps/rejected": mean(rejected_logps),
    }


def assert_metrics(metrics, expected):
    assert set(metrics) == set(expected)
    for key, value in metrics.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0, key
        assert not value.requires_grad, key
        assert value.item() == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key


def requires_grad(inputs):
    return {k: (v.clone().requires_grad_() if v.is_floating_point() else v) for k, v in inputs.items()}


@pytest.mark.parametrize("name", ["dpo", "sigmoid", "robust", "hinge", "ipo", "rpo"])
def test_reference_loss_metrics(name):
    inputs = requires_grad(make_inputs(11))
    beta = 0.2
    _, metrics = preference_loss(name, beta=beta, **inputs)
    r = rows(inputs)
    expected = expected_metrics(
        [beta * (pc - rc) for pc, _, rc, _, _, _ in r],
        [beta * (pr - rr) for _, pr, _, rr, _, _ in r],
        [pc for pc, *_ in r],
        [pr for _, pr, *_ in r],
    )
    if name == "rpo":
        expected["nll_loss"] = mean([-pc / nc for pc, _, _, _, nc, _ in r])
    assert_metrics(metrics, expected)


@pytest.mark.parametrize("name", ["simpo", "orpo", "nll"])
def test_reference_free_loss_metrics(name):
    inputs = requires_grad(make_inputs(12))
    beta = 0.3
    _, metrics = preference_loss(name, beta=beta, **inputs)
    r = rows(inputs)
    avg_c = [pc / nc for pc, _, _, _, nc, _ in r]
    avg_r = [pr / nr for _, pr, _, _, _, nr in r]
    expected = expected_metrics([beta * a for a in avg_c], [beta * a for a in avg_r], avg_c, avg_r)
    if name in ("orpo", "nll"):
        expected["nll_loss"] = mean([-a for a in avg_c])
    if name == "orpo":
        log_odds = [
            (ac - ar) - (math.log1p(-math.exp(ac)) - math.log1p(-math.exp(ar))) for ac, ar in zip(avg_c, avg_r)
        ]
        expected["log_odds_chosen"] = mean(log_odds)
        expected["log_odds_ratio"] = mean([logsigmoid(x) for x in log_odds])
    assert_metrics(metrics, expected)


def test_nll_without_rejected_reports_chosen_only():
    inputs = make_inputs(4)
    _, metrics = nll_loss(inputs["policy_chosen_logps"], inputs["chosen_num_tokens"])
    assert set(metrics) == {"logps/chosen", "nll_loss"}


def test_accuracy_counts_ties_as_losses():
    z = torch.zeros(4, dtype=torch.float64)
    chosen = torch.tensor([1.0, 0.0, -1.0, 2.0], dtype=torch.float64)
    _, metrics = dpo_loss(chosen, z, z, z)
    assert metrics["rewards/accuracies"].item() == 0.5


# ----------------------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradients_reach_policy_logps_only(name, reduction):
    inputs = requires_grad(make_inputs(21))
    loss, _ = preference_loss(name, reduction=reduction, **inputs)
    loss.backward()
    chosen_grad = inputs["policy_chosen_logps"].grad
    assert chosen_grad is not None and torch.isfinite(chosen_grad).all() and chosen_grad.abs().sum() > 0
    if name not in ("nll", "sft"):  # the NLL of the chosen responses alone
        rejected_grad = inputs["policy_rejected_logps"].grad
        assert rejected_grad is not None and torch.isfinite(rejected_grad).all() and rejected_grad.abs().sum() > 0
    # The reference is a constant of every objective.
    assert inputs["reference_chosen_logps"].grad is None
    assert inputs["reference_rejected_logps"].grad is None


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_gradient_matches_derivative(eps):
    inputs = requires_grad(make_inputs(8))
    beta = 0.5
    loss, _ = dpo_loss(*ref_args(inputs), beta=beta, label_smoothing=eps)
    loss.backward()
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # d/dh of -(1-eps) logsig(beta h) - eps logsig(-beta h) = -beta ((1-eps) sig(-beta h) - eps sig(beta h)).
    expected = []
    for pc, pr, rc, rr, _, _ in rows(inputs):
        h = (pc - rc) - (pr - rr)
        expected.append(-beta * ((1 - eps) * sigmoid(-beta * h) - eps * sigmoid(beta * h)) / N)
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(inputs["policy_chosen_logps"].grad, expected)
    torch.testing.assert_close(inputs["policy_rejected_logps"].grad, -expected)


# ----------------------------------------------------------------------------------------------------------------
# Dispatcher and registry
# ----------------------------------------------------------------------------------------------------------------


def test_registry():
    assert set(LOSSES) == {"dpo", "simpo", "orpo", "rpo", "nll"} | set(TRL_LOSS_TYPES)
    assert LOSSES["sigmoid"] is LOSSES["dpo"] is dpo_loss
    assert REFERENCE_FREE == {"simpo", "orpo", "nll", "sft"}
    assert REFERENCE_FREE <= set(LOSSES)


@pytest.mark.parametrize(
    ("name", "direct"),
    [
        ("dpo", lambda i: dpo_loss(*ref_args(i), beta=0.2, label_smoothing=0.1, reduction="sum")),
        ("robust", lambda i: robust_dpo_loss(*ref_args(i), beta=0.2, label_smoothing=0.1, reduction="sum")),
        ("hinge", lambda i: hinge_loss(*ref_args(i), beta=0.2, reduction="sum")),
        (
            "ipo",
            lambda i: ipo_loss(
                *ref_args(i), i["chosen_num_tokens"], i["rejected_num_tokens"], beta=0.2, reduction="sum"
            ),
        ),
        (
            "simpo",
            lambda i: simpo_loss(
                i["policy_chosen_logps"],
                i["policy_rejected_logps"],
                i["chosen_num_tokens"],
                i["rejected_num_tokens"],
                beta=0.2,
                gamma=0.3,
                reduction="sum",
            ),
        ),
        (
            "orpo",
            lambda i: orpo_loss(
                i["policy_chosen_logps"],
                i["policy_rejected_logps"],
                i["chosen_num_tokens"],
                i["rejected_num_tokens"],
                beta=0.2,
                reduction="sum",
            ),
        ),
        ("rpo", lambda i: rpo_loss(*ref_args(i), i["chosen_num_tokens"], beta=0.2, alpha=0.5, reduction="sum")),
        (
            "nll",
            lambda i: nll_loss(
                i["policy_chosen_logps"],
                i["chosen_num_tokens"],
                policy_rejected_logps=i["policy_rejected_logps"],
                rejected_num_tokens=i["rejected_num_tokens"],
                beta=0.2,
                reduction="sum",
            ),
        ),
    ],
)
def test_preference_loss_dispatches(name, direct):
    inputs = make_inputs(30)
    options = {
        "dpo": {"label_smoothing": 0.1},
        "robust": {"label_smoothing": 0.1},
        "simpo": {"gamma": 0.3},
        "rpo": {"alpha": 0.5},
    }.get(name, {})
    loss, metrics = preference_loss(name, beta=0.2, reduction="sum", **options, **inputs)
    want_loss, want_metrics = direct(inputs)
    torch.testing.assert_close(loss, want_loss)
    assert metrics.keys() == want_metrics.keys()
    for key in metrics:
        torch.testing.assert_close(metrics[key], want_metrics[key])


@pytest.mark.parametrize("name", sorted(REFERENCE_FREE))
def test_reference_free_losses_need_no_reference(name):
    inputs = make_inputs(31)
    del inputs["reference_chosen_logps"], inputs["reference_rejected_logps"]
    loss, _ = preference_loss(name, **inputs)
    assert torch.isfinite(loss)


def test_default_beta_is_point_one():
    inputs = make_inputs(32)
    torch.testing.assert_close(preference_loss("dpo", **inputs)[0], preference_loss("dpo", beta=0.1, **inputs)[0])
    torch.testing.assert_close(preference_loss("dpo", **inputs)[0], dpo_loss(*ref_args(inputs))[0])


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------


def test_unknown_loss_name_lists_known_ones():
    inputs = make_inputs(0)
    known = ", ".join(sorted(LOSSES))
    with pytest.raises(ValueError, match=rf"unknown loss 'kto'; known losses: {known}"):
        preference_loss("kto", **inputs)


def test_unknown_option_is_rejected():
    inputs = make_inputs(0)
    with pytest.raises(ValueError, match=r"hinge loss does not take option\(s\) \['label_smoothing'\]"):
        preference_loss("hinge", label_smoothing=0.1, **inputs)


@pytest.mark.parametrize("name", sorted(set(LOSSES) - REFERENCE_FREE))
@pytest.mark.parametrize("missing", ["reference_chosen_logps", "reference_rejected_logps"])
def test_missing_reference(name, missing):
    inputs = make_inputs(0)
    del inputs[missing]
    loss_name = "dpo" if name == "sigmoid" else name
    message = rf"{loss_name} loss needs {missing}, got None: pass {missing}=.*or use a reference-free loss"
    with pytest.raises(ValueError, match=message):
        preference_loss(name, **inputs)


@pytest.mark.parametrize(
    ("name", "missing"),
    [
        ("ipo", "chosen_num_tokens"),
        ("ipo", "rejected_num_tokens"),
        ("simpo", "chosen_num_tokens"),
        ("simpo", "rejected_num_tokens"),
        ("orpo", "chosen_num_tokens"),
        ("orpo", "rejected_num_tokens"),
        ("rpo", "chosen_num_tokens"),
        ("nll", "chosen_num_tokens"),
        ("nll", "rejected_num_tokens"),
    ],
)
def test_missing_token_counts(name, missing):
    inputs = make_inputs(0)
    del inputs[missing]
    with pytest.raises(ValueError, match=rf"{name} loss needs {missing}, got None: pass {missing}="):
        preference_loss(name, **inputs)


def test_token_counts_not_needed_without_length_normalization():
    inputs = make_inputs(0)
    del inputs["chosen_num_tokens"], inputs["rejected_num_tokens"]
    preference_loss("ipo", length_normalize=False, **inputs)
    preference_loss("nll", length_normalize=False, **inputs)
    preference_loss("dpo", **inputs)


@pytest.mark.parametrize("name", ["ipo", "simpo", "orpo", "rpo", "nll"])
@pytest.mark.parametrize("bad", [0, -3])
def test_non_positive_token_counts(name, bad):
    inputs = make_inputs(0)
    inputs["chosen_num_tokens"] = inputs["chosen_num_tokens"].clone()
    inputs["chosen_num_tokens"][2] = bad
    with pytest.raises(ValueError, match=rf"{name} loss: chosen_num_tokens must be positive.*1 entry <= 0 out of {N}"):
        preference_loss(name, **inputs)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_shape_mismatch_names_both_shapes(name):
    inputs = make_inputs(0)
    inputs["policy_rejected_logps"] = inputs["policy_rejected_logps"][:-1]
    with pytest.raises(
        ValueError,
        match=rf"shape mismatch, policy_chosen_logps has shape \[{N}\] but policy_rejected_logps has shape \[{N - 1}\]",
    ):
        preference_loss(name, **inputs)


def test_shape_mismatch_in_reference_and_counts():
    inputs = make_inputs(0)
    inputs["reference_rejected_logps"] = torch.zeros(N + 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"reference_rejected_logps has shape \[{N + 2}\]"):
        preference_loss("dpo", **inputs)
    inputs = make_inputs(0)
    inputs["rejected_num_tokens"] = torch.ones(3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"rejected_num_tokens has shape \[3\]"):
        preference_loss("simpo", **inputs)


def test_two_dimensional_input_is_rejected():
    inputs = make_inputs(0)
    inputs = {k: v.view(1, N) for k, v in inputs.items()}
    with pytest.raises(ValueError, match=r"policy_chosen_logps must have shape \[n\] .*got shape \[1, 7\]"):
        preference_loss("dpo", **inputs)


def test_empty_batch_is_rejected():
    empty = torch.zeros(0)
    with pytest.raises(ValueError, match="got no pairs"):
        dpo_loss(empty, empty, empty, empty)


def test_integer_logps_are_rejected():
    inputs = make_inputs(0)
    inputs["policy_chosen_logps"] = inputs["policy_chosen_logps"].long()
    with pytest.raises(ValueError, match="policy_chosen_logps must be a floating-point tensor"):
        preference_loss("dpo", **inputs)


def test_non_tensor_is_rejected():
    inputs = make_inputs(0)
    inputs["policy_chosen_logps"] = inputs["policy_chosen_logps"].tolist()
    with pytest.raises(ValueError, match="policy_chosen_logps must be a torch.Tensor"):
        preference_loss("dpo", **inputs)


@pytest.mark.parametrize(
    ("name", "arg"),
    [
        (name, arg)
        for name in sorted(LOSSES)
        for arg in ("policy_chosen_logps", "policy_rejected_logps", "reference_rejected_logps")
        # Reference-free losses never read the reference, so they cannot complain about it.
        if not (arg.startswith("reference") and name in REFERENCE_FREE)
    ],
)
def test_non_finite_logps(name, arg):
    inputs = make_inputs(0)
    inputs[arg] = inputs[arg].clone()
    inputs[arg][0] = float("nan")
    inputs[arg][3] = float("-inf")
    loss_name = "dpo" if name == "sigmoid" else name
    message = rf"{loss_name} loss: {arg} has 2 non-finite entries \(nan or inf\) out of {N}"
    with pytest.raises(ValueError, match=message):
        preference_loss(name, **inputs)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("arg", ["policy_chosen_logps", "policy_rejected_logps"])
def test_check_finite_false_lets_non_finite_logps_through(name, arg):
    """check_finite=False (what PrefixShareDPOTrainer passes): no raise, nan reaches the loss or the metrics, the
    other pairs are untouched. Fails on main before check_finite existed (unknown option -> ValueError)."""
    clean = make_inputs(0)
    inputs = {**clean, arg: clean[arg].clone()}
    inputs[arg][0] = float("nan")
    inputs[arg][3] = float("-inf")
    per_pair, metrics = preference_loss(name, **inputs, reduction="none", check_finite=False)
    if name in BATCH_COUPLED:  # aot sorts the batch: a nan moves every term, and shows in the loss
        assert bool(torch.isnan(per_pair).any())
        return
    want, _ = preference_loss(name, **clean, reduction="none")
    others = [i for i in range(N) if i not in (0, 3)]
    assert torch.equal(per_pair[others], want[others])
    assert any(bool(torch.isnan(v)) for v in (per_pair[0], *metrics.values()))


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan"), float("inf")])
def test_bad_beta(name, beta):
    inputs = make_inputs(0)
    with pytest.raises(ValueError, match=r"beta"):
        preference_loss(name, beta=beta, **inputs)


def test_bad_beta_message():
    with pytest.raises(ValueError, match=r"ipo loss needs beta > 0, got 0"):
        preference_loss("ipo", beta=0, **make_inputs(0))


@pytest.mark.parametrize("name", ["dpo", "robust", "simpo", "rpo"])
@pytest.mark.parametrize("eps", [-0.1, 0.5, 0.9])
def test_bad_label_smoothing(name, eps):
    inputs = make_inputs(0)
    with pytest.raises(ValueError, match=rf"{name} loss needs label_smoothing in \[0, 0.5\), got {eps}"):
        preference_loss(name, label_smoothing=eps, **inputs)


def test_bad_reduction():
    with pytest.raises(ValueError, match=r"reduction must be one of \['mean', 'sum', 'none'\], got 'avg'"):
        preference_loss("dpo", reduction="avg", **make_inputs(0))


def test_bad_rpo_alpha_and_simpo_gamma():
    inputs = make_inputs(0)
    with pytest.raises(ValueError, match=r"rpo loss needs alpha >= 0"):
        preference_loss("rpo", alpha=-1.0, **inputs)
    with pytest.raises(ValueError, match=r"simpo loss: gamma must be a finite real number"):
        preference_loss("simpo", gamma=float("nan"), **inputs)


def test_orpo_rejects_positive_logps():
    inputs = make_inputs(0)
    inputs["policy_rejected_logps"] = inputs["policy_rejected_logps"].abs()
    with pytest.raises(ValueError, match=rf"orpo loss: policy_rejected_logps has {N} positive entries"):
        preference_loss("orpo", **inputs)


# ----------------------------------------------------------------------------------------------------------------
# Cross-check with TRL's own loss functions, where they are standalone enough to call (importing trl.experimental
# takes ~10 s, hence slow).
# ----------------------------------------------------------------------------------------------------------------


def _import_trl(monkeypatch, module):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    return pytest.importorskip(module)


@pytest.mark.slow
@pytest.mark.parametrize(("beta", "gamma", "eps"), [(2.0, 1.0, 0.0), (0.1, 0.5, 0.2)])
def test_simpo_matches_trl_cpo(monkeypatch, beta, gamma, eps):
    cpo = _import_trl(monkeypatch, "trl.experimental.cpo.cpo_trainer")
    inputs = make_inputs(40)
    avg_c = inputs["policy_chosen_logps"] / inputs["chosen_num_tokens"]
    avg_r = inputs["policy_rejected_logps"] / inputs["rejected_num_tokens"]
    trainer = SimpleNamespace(
        alpha=0.0,
        beta=beta,
        simpo_gamma=gamma,  # TRL's simpo_gamma is the margin in reward units, our gamma
        label_smoothing=eps,
        loss_type="simpo",
        accelerator=SimpleNamespace(device="cpu"),
    )
    trl_losses, trl_chosen_rewards, trl_rejected_rewards = cpo.CPOTrainer.cpo_loss(trainer, avg_c, avg_r)
    ours, metrics = simpo_loss(
        inputs["policy_chosen_logps"],
        inputs["policy_rejected_logps"],
        inputs["chosen_num_tokens"],
        inputs["rejected_num_tokens"],
        beta=beta,
        gamma=gamma,
        label_smoothing=eps,
        reduction="none",
    )
    torch.testing.assert_close(ours, trl_losses)
    torch.testing.assert_close(metrics["rewards/chosen"], trl_chosen_rewards.mean())
    torch.testing.assert_close(metrics["rewards/rejected"], trl_rejected_rewards.mean())


@pytest.mark.slow
def test_orpo_matches_trl(monkeypatch):
    orpo = _import_trl(monkeypatch, "trl.experimental.orpo.orpo_trainer")
    inputs = make_inputs(41, dtype=torch.float32)
    avg_c = inputs["policy_chosen_logps"] / inputs["chosen_num_tokens"]
    avg_r = inputs["policy_rejected_logps"] / inputs["rejected_num_tokens"]
    trainer = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    trl_losses, trl_chosen_rewards, _, trl_log_odds_ratio, trl_log_odds_chosen = orpo.ORPOTrainer.odds_ratio_loss(
        trainer, avg_c, avg_r
    )
    ours, metrics = orpo_loss(
        inputs["policy_chosen_logps"],
        inputs["policy_rejected_logps"],
        inputs["chosen_num_tokens"],
        inputs["rejected_num_tokens"],
        beta=0.25,
        reduction="none",
    )
    # TRL: loss = nll - mean(beta * logsigmoid(log_odds)); its per-pair term is beta * logsigmoid(log_odds).
    torch.testing.assert_close(ours, -avg_c - trl_losses)
    torch.testing.assert_close(metrics["rewards/chosen"], trl_chosen_rewards.mean())
    torch.testing.assert_close(metrics["log_odds_ratio"], trl_log_odds_ratio)
    torch.testing.assert_close(metrics["log_odds_chosen"], trl_log_odds_chosen)
