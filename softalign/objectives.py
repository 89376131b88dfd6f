"""The reward-free objectives as pure functions on tensors: no pipeline, no I/O.

Shapes: a pair grid of `B` images, each with `K` candidate captions (its own caption at column `labels[i]`, the other
`K - 1` are its negatives). Predictions are `(B, K, C, H, W)`; the target depends only on the image (one noise and
one t per iteration), so it is `(B, 1, C, H, W)` or broadcastable to the predictions.

- SoftREPA (arXiv 2503.08250): `logits = scale * exp(-err / tau)`, cross-entropy towards the matched caption, plus
  `dweight` times the matched pairs' error.
- AGSM (arXiv 2605.30038): Plackett-Luce weights of EMA rewards over each image's candidates tilt the score-matching
  target; positives move along `Delta`, negatives against it; the push vanishes once the positive wins.

Every loss here is a sum of per-image terms divided by a count fixed for the whole batch, so evaluating the grid in
row chunks and adding the chunk losses gives exactly the full-batch loss and gradient (see `*_rows` functions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .families import add_noise, training_target  # noqa: F401

SOFTREPA_TAU = 0.07
SOFTREPA_SCALE = 4.0
AGSM_TEMPERATURE = 0.1


# noising and targets are the family's (re-exported for the old import path)
def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Losses run in float32 even under fp16 autocast; float64 inputs (tests) keep their precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    values = values.reshape(-1)
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))


# -- per-pair errors -------------------------------------------------------------------------------------------------
def pair_errors(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`err(i, j) = mean over C, H, W of (prediction - target)^2`: `(B, K, C, H, W)` -> `(B, K)`."""
    return (_at_least_float32(prediction) - _at_least_float32(target)).square().flatten(2).mean(-1)


def positive_mask(labels: torch.Tensor, n_candidates: int) -> torch.Tensor:
    """One-hot `(B, K)` mask of each image's matched caption."""
    return F.one_hot(labels.long(), n_candidates).float()


# -- SoftREPA --------------------------------------------------------------------------------------------------------
def softrepa_rows(
    errors: torch.Tensor,
    labels: torch.Tensor,
    tau: float = SOFTREPA_TAU,
    scale: float = SOFTREPA_SCALE,
    dweight: float = 0.0,
) -> torch.Tensor:
    """Per-image SoftREPA terms `(B,)`: cross-entropy of `scale * exp(-err / tau)` plus `dweight * err(i, i)`."""
    logits = scale * torch.exp(-errors / tau)
    matched = errors.gather(1, labels.long()[:, None])[:, 0]
    return F.cross_entropy(logits, labels.long(), reduction="none") + dweight * matched


def softrepa_loss(
    errors: torch.Tensor,
    labels: torch.Tensor,
    tau: float = SOFTREPA_TAU,
    scale: float = SOFTREPA_SCALE,
    dweight: float = 0.0,
) -> torch.Tensor:
    """SoftREPA loss of a batch: the mean over images of [`softrepa_rows`]."""
    return softrepa_rows(errors, labels, tau, scale, dweight).mean()


# -- AGSM ------------------------------------------------------------------------------------------------------------
@dataclass
class AGSMTerms:
    """Per-image pieces of the AGSM loss (shapes `(B,)` unless noted) and its diagnostics."""

    positive: torch.Tensor  # error of the matched pair against its tilted target
    negative: torch.Tensor  # summed errors of the K - 1 negatives against theirs
    weights: torch.Tensor  # (B, K) Plackett-Luce (or Bradley-Terry) weights of the EMA rewards
    rewards: torch.Tensor  # (B, K) r_j = -err_EMA(i, j)
    labels: torch.Tensor


def plackett_luce_weights(rewards: torch.Tensor, temperature: float = AGSM_TEMPERATURE) -> torch.Tensor:
    """`w_j = softmax_j(r_j / T)` over each image's candidates."""
    return torch.softmax(rewards / temperature, dim=1)


def agsm_rows(
    prediction: torch.Tensor,
    ema_prediction: torch.Tensor,
    target: torch.Tensor,
    labels: torch.Tensor,
    gamma_pos: float = 1.0,
    gamma_neg: float = 1.0,
    temperature: float = AGSM_TEMPERATURE,
    preference: str = "plackett_luce",
) -> AGSMTerms:
    """Per-image AGSM terms.

    Args:
        prediction (`torch.Tensor` of shape `(B, K, C, H, W)`): online predictions (psi+ on the positive, psi- on the
            negatives); the only input that carries a gradient.
        ema_prediction (`torch.Tensor` of shape `(B, K, C, H, W)`): predictions with the EMA tokens (no gradient).
        target (`torch.Tensor` broadcastable to `(B, K, C, H, W)`): the plain score-matching target of each image.
        labels (`torch.LongTensor` of shape `(B,)`): column of each image's matched caption.
        gamma_pos, gamma_neg (`float`): tilt of the positive and negative targets; `gamma_neg = 0` drops the negatives.
        temperature (`float`, *optional*, defaults to 0.1): Plackett-Luce temperature T.
        preference (`str`, *optional*): `"plackett_luce"` (the paper) or `"bradley_terry"` (its ablation: each
            negative is weighed against the positive alone, see [`bradley_terry_directions`]).
    """
    ema_prediction = _at_least_float32(ema_prediction.detach())
    target = _at_least_float32(target.detach()).expand_as(ema_prediction)
    rewards = -(target - ema_prediction).square().flatten(2).mean(-1)  # (B, K)
    n_candidates = rewards.shape[1]
    mask = positive_mask(labels, n_candidates)
    if preference == "plackett_luce":
        weights = plackett_luce_weights(rewards, temperature)
        mixture = (weights[:, :, None, None, None] * ema_prediction).sum(dim=1, keepdim=True)
        delta = ema_prediction - mixture  # (B, K, C, H, W); sums to zero under the weights
    elif preference == "bradley_terry":
        weights, delta = bradley_terry_directions(ema_prediction, rewards, labels, temperature)
    else:
        raise ValueError(f"preference must be 'plackett_luce' or 'bradley_terry', got {preference!r}.")
    positive_target = target + gamma_pos * delta
    negative_target = target - gamma_neg * delta
    tilted = torch.where(mask[:, :, None, None, None].bool(), positive_target, negative_target)
    errors = pair_errors(prediction, tilted)  # (B, K)
    return AGSMTerms(
        positive=(errors * mask).sum(1),
        negative=(errors * (1 - mask)).sum(1),
        weights=weights,
        rewards=rewards,
        labels=labels,
    )


def bradley_terry_directions(ema_prediction, rewards, labels, temperature):
    """Bradley-Terry ablation: the positive is compared with each negative j in a two-candidate softmax.

    For the pair (+, j), `P(j beats +) = sigmoid((r_j - r_+) / T)`. The negative's direction is
    `Delta_j = P(+ beats j) (pred_j - pred_+)`; the positive's is the mean over its negatives of
    `P(j beats +) (pred_+ - pred_j)`. Both are what the two-candidate Plackett-Luce direction gives for that pair.
    Returned weights `(B, K)`: `P(j beats +)` for negatives, the mean `P(+ beats j)` in the positive's column.
    """
    batch = torch.arange(rewards.shape[0], device=rewards.device)
    mask = positive_mask(labels, rewards.shape[1]).bool()
    expand = (slice(None), slice(None), None, None, None)
    n_negatives = max(rewards.shape[1] - 1, 1)
    negative_wins = torch.sigmoid((rewards - rewards[batch, labels][:, None]) / temperature).masked_fill(mask, 0)
    positive_prediction = ema_prediction[batch, labels][:, None]  # (B, 1, C, H, W)
    difference = ema_prediction - positive_prediction  # pred_j - pred_+
    negative_delta = (1 - negative_wins)[expand] * difference
    positive_delta = -(negative_wins[expand] * difference).sum(1, keepdim=True) / n_negatives
    delta = torch.where(mask[expand], positive_delta.expand_as(difference), negative_delta)
    positive_wins = (1 - negative_wins).masked_fill(mask, 0).sum(1, keepdim=True) / n_negatives
    weights = torch.where(mask, positive_wins.expand_as(negative_wins), negative_wins)
    return weights, delta


def agsm_loss_from_rows(terms: AGSMTerms, n_images: int, n_negatives: int, gamma_neg: float) -> torch.Tensor:
    """`sum(positive) / n_images + sum(negative) / n_negatives` (the negative term only when `gamma_neg > 0`).

    `n_images` and `n_negatives` are the counts of the whole batch, so chunk losses add up to the batch loss.
    """
    loss = terms.positive.sum() / n_images
    if gamma_neg > 0:
        loss = loss + terms.negative.sum() / max(n_negatives, 1)
    return loss


def agsm_loss(
    prediction,
    ema_prediction,
    target,
    labels,
    gamma_pos=1.0,
    gamma_neg=1.0,
    temperature=AGSM_TEMPERATURE,
    preference="plackett_luce",
) -> torch.Tensor:
    """The AGSM loss of a full pair grid (see [`agsm_rows`] for the arguments)."""
    terms = agsm_rows(prediction, ema_prediction, target, labels, gamma_pos, gamma_neg, temperature, preference)
    n_images, n_candidates = terms.rewards.shape
    return agsm_loss_from_rows(terms, n_images, n_images * (n_candidates - 1), gamma_neg)


@dataclass
class Diagnostics:
    """Per-batch diagnostics of a preference over candidates: win rate and margins."""

    win_rate: torch.Tensor  # share of images whose positive outweighs every negative
    weight_margin: torch.Tensor  # mean of w_+ - max_j w_j (the official `score_margin`)
    reward_margin: torch.Tensor  # mean of r_+ - max_j r_j


def preference_diagnostics(weights: torch.Tensor, rewards: torch.Tensor, labels: torch.Tensor) -> Diagnostics:
    """Win rate and margins of the positive over its strongest negative, from weights and rewards `(B, K)`."""
    mask = positive_mask(labels, weights.shape[1]).bool()
    batch = torch.arange(weights.shape[0], device=weights.device)
    w_pos, r_pos = weights[batch, labels], rewards[batch, labels]
    w_neg = weights.masked_fill(mask, float("-inf")).max(1).values
    r_neg = rewards.masked_fill(mask, float("-inf")).max(1).values
    return Diagnostics(
        win_rate=(r_pos > r_neg).float().mean(),  # softmax is monotone: the same as w_+ > max w_j under PL
        weight_margin=(w_pos - w_neg).mean(),
        reward_margin=(r_pos - r_neg).mean(),
    )


# -- Diffusion-DPO ---------------------------------------------------------------------------------------------------
@dataclass
class DPOTerms:
    """The Diffusion-DPO loss with its implicit accuracy (the share of pairs whose preferred image wins)."""

    loss: torch.Tensor  # scalar
    implicit_accuracy: torch.Tensor  # share of pairs where the model prefers the winner more than the reference
    inside: torch.Tensor  # (B,) -beta/2 * (model_diff - ref_diff)


def diffusion_dpo_loss(
    model_errors_win: torch.Tensor,
    model_errors_lose: torch.Tensor,
    ref_errors_win: torch.Tensor,
    ref_errors_lose: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
) -> DPOTerms:
    """Diffusion-DPO (arXiv 2311.12908) from per-pair denoising errors `(B,)` under shared noise and t.

    `model_diff = err(win) - err(lose)`, `ref_diff` the same for the reference, `h = -beta / 2 * (model_diff -
    ref_diff)` (the implicit reward margin). `sigmoid`: `-log sigmoid(h)` (ln 2 where the model equals the
    reference); `ipo`: IPO's squared loss on the same margin, `(h - 1/2)^2` (IPO with tau = 1 on the beta-scaled
    margin; the diffusers example's `ipo` branch reads an undefined `args.beta`).
    """
    model_diff = model_errors_win - model_errors_lose
    ref_diff = (ref_errors_win - ref_errors_lose).detach()
    inside = -0.5 * beta * (model_diff - ref_diff)
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(inside).mean()
    elif loss_type == "ipo":
        loss = ((inside - 0.5) ** 2).mean()
    else:
        raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}.")
    return DPOTerms(loss=loss, implicit_accuracy=(inside > 0).float().mean(), inside=inside)
