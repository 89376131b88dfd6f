"""Every formula of METHOD.md sections 2-4 pinned on small hand-computed tensors."""

import math

import pytest
import torch

from softalign import objectives as O


def grid(values):
    """(B, K) numbers -> (B, K, 1, 1, 1) predictions, so the mean over C, H, W is the number itself."""
    return torch.tensor(values, dtype=torch.float64)[:, :, None, None, None]


def test_eps_and_flow_noising_and_targets():
    x0, noise = torch.tensor([[2.0]]), torch.tensor([[1.0]])
    alphas = torch.linspace(0.99, 0.01, 1000)
    t = torch.tensor([500])
    a = alphas[500].item()
    assert O.add_noise(x0, noise, t, "epsilon", alphas).item() == pytest.approx(math.sqrt(a) * 2 + math.sqrt(1 - a))
    assert torch.equal(O.training_target(x0, noise, t, "epsilon", alphas), noise)
    v = O.training_target(x0, noise, t, "v_prediction", alphas).item()
    assert v == pytest.approx(math.sqrt(a) * 1 - math.sqrt(1 - a) * 2)
    t = torch.tensor([250])  # flow: s = 0.25
    assert O.add_noise(x0, noise, t, "flow").item() == pytest.approx(0.75 * 2 + 0.25 * 1)
    assert O.training_target(x0, noise, t, "flow").item() == pytest.approx(1 - 2)
    with pytest.raises(ValueError, match="prediction_type"):
        O.training_target(x0, noise, t, "sample")


def test_pair_errors_average_over_channels_and_pixels():
    prediction = torch.zeros(1, 2, 2, 1, 2)
    prediction[0, 1] = torch.tensor([[[1.0, 3.0]], [[0.0, 0.0]]])
    errors = O.pair_errors(prediction, torch.zeros(1, 1, 2, 1, 2))
    assert errors.tolist() == [[0.0, (1 + 9) / 4]]


def test_softrepa_loss_matches_hand_computation():
    errors = torch.tensor([[0.07, 0.14], [0.21, 0.07]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    # row 0: logits 4e^-1, 4e^-2, target 0; row 1: logits 4e^-3, 4e^-1, target 1
    l00, l01, l10, l11 = 4 * math.exp(-1), 4 * math.exp(-2), 4 * math.exp(-3), 4 * math.exp(-1)
    ce0 = -l00 + math.log(math.exp(l00) + math.exp(l01))
    ce1 = -l11 + math.log(math.exp(l10) + math.exp(l11))
    assert O.softrepa_loss(errors, labels).item() == pytest.approx((ce0 + ce1) / 2, rel=1e-12)
    with_diffusion = O.softrepa_loss(errors, labels, dweight=10.0).item()
    assert with_diffusion == pytest.approx((ce0 + ce1) / 2 + 10 * (0.07 + 0.07) / 2, rel=1e-12)


def test_agsm_loss_matches_hand_computation():
    # One image, two candidates (positive first), C = H = W = 1, target 0.
    ema = grid([[0.1, 0.3]])
    pred = grid([[0.2, -0.1]])
    target = torch.zeros(1, 1, 1, 1, 1, dtype=torch.float64)
    r0, r1 = -(0.1**2), -(0.3**2)  # rewards -err_EMA
    w0 = math.exp(r0 / 0.1) / (math.exp(r0 / 0.1) + math.exp(r1 / 0.1))
    w1 = 1 - w0
    mix = w0 * 0.1 + w1 * 0.3
    d0, d1 = 0.1 - mix, 0.3 - mix  # Delta_j = pred_EMA_j - sum_k w_k pred_EMA_k
    positive_target, negative_target = 0 + 1.0 * d0, 0 - 0.5 * d1
    expected = (0.2 - positive_target) ** 2 / 1 + (-0.1 - negative_target) ** 2 / 1
    loss = O.agsm_loss(pred, ema, target, torch.tensor([0]), gamma_pos=1.0, gamma_neg=0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    terms = O.agsm_rows(pred, ema, target, torch.tensor([0]), 1.0, 0.5)
    assert terms.weights[0].tolist() == pytest.approx([w0, w1], rel=1e-12)
    assert terms.rewards[0].tolist() == pytest.approx([r0, r1], rel=1e-12)


def test_agsm_with_gamma_neg_zero_keeps_only_the_positive_term():
    ema, pred = grid([[0.1, 0.3, 0.5]]), grid([[0.2, -0.1, 0.7]])
    target = torch.zeros(1, 1, 1, 1, 1, dtype=torch.float64)
    rewards = torch.tensor([-0.01, -0.09, -0.25], dtype=torch.float64)
    w = torch.softmax(rewards / 0.1, 0)
    d0 = 0.1 - (w * torch.tensor([0.1, 0.3, 0.5], dtype=torch.float64)).sum().item()
    loss = O.agsm_loss(pred, ema, target, torch.tensor([0]), gamma_pos=1.0, gamma_neg=0.0)
    assert loss.item() == pytest.approx((0.2 - d0) ** 2, rel=1e-12)


def test_agsm_push_vanishes_when_the_positive_wins_and_directions_sum_to_zero():
    torch.manual_seed(0)
    ema = torch.randn(3, 4, 2, 2, 2, dtype=torch.float64)
    target = torch.randn(3, 1, 2, 2, 2, dtype=torch.float64)
    labels = torch.tensor([2, 0, 1])
    terms = O.agsm_rows(ema, ema, target, labels, 1.0, 1.0, temperature=0.1)
    mixture = (terms.weights[:, :, None, None, None] * ema).sum(1, keepdim=True)
    assert torch.allclose(
        (terms.weights[:, :, None, None, None] * (ema - mixture)).sum(1), torch.zeros(3, 2, 2, 2, dtype=torch.float64)
    )
    # the positive's EMA prediction equals the target and the negatives are far: w_+ -> 1, Delta_+ -> 0
    winning = target.expand(3, 4, 2, 2, 2).clone() + 5.0
    winning[torch.arange(3), labels] = target[:, 0]
    won = O.agsm_rows(winning, winning, target, labels, 1.0, 1.0, temperature=0.1)
    assert won.positive.max().item() < 1e-20  # plain score matching, already satisfied
    assert O.preference_diagnostics(won.weights, won.rewards, labels).win_rate.item() == 1.0


def test_chunked_rows_add_up_to_the_full_loss_and_gradient():
    torch.manual_seed(0)
    pred = torch.randn(8, 4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    ema, target = torch.randn(8, 4, 3, 2, 2, dtype=torch.float64), torch.randn(8, 1, 3, 2, 2, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    full = O.agsm_loss(pred, ema, target, labels, 1.0, 0.1)
    (full_grad,) = torch.autograd.grad(full, pred)
    chunked, grads = 0.0, []
    for rows in (slice(0, 3), slice(3, 6), slice(6, 8)):
        terms = O.agsm_rows(pred[rows], ema[rows], target[rows], labels[rows], 1.0, 0.1)
        part = O.agsm_loss_from_rows(terms, n_images=8, n_negatives=8 * 3, gamma_neg=0.1)
        grads.append(torch.autograd.grad(part, pred)[0])
        chunked += part.item()
    assert chunked == pytest.approx(full.item(), rel=1e-12)
    assert torch.allclose(sum(grads), full_grad, rtol=1e-12, atol=0)
    errors = torch.rand(8, 4, dtype=torch.float64)
    rows = O.softrepa_rows(errors, labels, dweight=10.0)
    assert (rows[:5].sum() + rows[5:].sum()).item() / 8 == pytest.approx(
        O.softrepa_loss(errors, labels, dweight=10.0).item()
    )


def test_bradley_terry_variant_matches_the_pairwise_formula():
    ema = grid([[0.1, 0.3, 0.5]])
    target = torch.zeros(1, 1, 1, 1, 1, dtype=torch.float64)
    r = [-(0.1**2), -(0.3**2), -(0.5**2)]
    p1 = 1 / (1 + math.exp(-(r[1] - r[0]) / 0.1))  # P(candidate 1 beats the positive)
    p2 = 1 / (1 + math.exp(-(r[2] - r[0]) / 0.1))
    delta_pos = -(p1 * (0.3 - 0.1) + p2 * (0.5 - 0.1)) / 2
    delta_1, delta_2 = (1 - p1) * (0.3 - 0.1), (1 - p2) * (0.5 - 0.1)
    pred = grid([[0.0, 0.0, 0.0]])
    expected = (0 - delta_pos) ** 2 + ((0 + delta_1) ** 2 + (0 + delta_2) ** 2) / 2
    loss = O.agsm_loss(pred, ema, target, torch.tensor([0]), 1.0, 1.0, preference="bradley_terry")
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="preference"):
        O.agsm_loss(pred, ema, target, torch.tensor([0]), preference="elo")


def test_diagnostics_win_rate_and_margins():
    weights = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    rewards = torch.tensor([[-0.1, -0.2, -0.3], [-0.3, -0.1, -0.2]])
    d = O.preference_diagnostics(weights, rewards, torch.tensor([0, 0]))
    assert d.win_rate.item() == 0.5
    assert d.weight_margin.item() == pytest.approx(((0.6 - 0.3) + (0.2 - 0.5)) / 2)
    assert d.reward_margin.item() == pytest.approx(((-0.1 + 0.2) + (-0.3 + 0.1)) / 2)
