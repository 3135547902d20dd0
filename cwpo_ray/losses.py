"""Preference math: Bradley-Terry, confidence, and (weighted) DPO / IPO / rDPO.

Pure torch: no Ray, no I/O. Formulas and departures from the paper: docs/METHOD.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("dpo", "ipo", "rdpo")


def _check_same_shape(**tensors: torch.Tensor) -> None:
    names = list(tensors)
    first = tensors[names[0]]
    if first.dim() != 1:
        raise ValueError(f"{names[0]} must be 1-D (one value per pair), got shape {tuple(first.shape)}")
    for name in names[1:]:
        if tensors[name].shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensors[name].shape)}, expected {tuple(first.shape)} like {names[0]}"
            )


def _check_finite(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or infinite values")


def bt_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss: mean of -log sigma(r_chosen - r_rejected)."""
    _check_same_shape(reward_chosen=reward_chosen, reward_rejected=reward_rejected)
    return -F.logsigmoid(reward_chosen - reward_rejected).mean()


def confidence(reward_a: torch.Tensor, reward_b: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """C = 2 * (sigma(|r_a - r_b| / T) - 0.5): 0 for a coin flip, towards 1 for a sure call.

    T = 1 is the paper's confidence; a calibrated annotator has its own T (fit on held-out margins),
    which rescales every confidence the same way and never changes the call. Written as
    tanh(|d| / 2T), the same function without the cancellation of 2*sigma - 1.
    """
    _check_same_shape(reward_a=reward_a, reward_b=reward_b)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.tanh((reward_a - reward_b).abs() / (2 * temperature))


def implicit_rewards(policy_logps, ref_logps, beta: float) -> torch.Tensor:
    """DPO's implicit reward beta * (log pi_theta - log pi_ref), detached for logging."""
    return (beta * (policy_logps - ref_logps)).detach()


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    loss_type: str,
    beta: float = 0.5,
    weights: torch.Tensor | None = None,
    epsilon: float = 0.1,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair PO loss and its weighted batch mean, ``mean(weights * per_pair)``.

    Log-probs are summed over each response's completion tokens. IPO averages each
    log-ratio over its completion tokens first (needs the lengths); rDPO assumes a
    label-noise rate ``epsilon``. Returns ``(loss, per_pair_loss)``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    logps = dict(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    _check_same_shape(**logps)
    _check_finite(**logps)
    if weights is None:
        weights = torch.ones_like(policy_chosen_logps)
    else:
        _check_same_shape(policy_chosen_logps=policy_chosen_logps, weights=weights)
        _check_finite(weights=weights)
        if (weights < 0).any():
            raise ValueError("weights must be non-negative")

    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps

    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type 'ipo' needs chosen_lengths and rejected_lengths")
        _check_same_shape(policy_chosen_logps=policy_chosen_logps, chosen_lengths=chosen_lengths,
                          rejected_lengths=rejected_lengths)
        if (chosen_lengths <= 0).any() or (rejected_lengths <= 0).any():
            raise ValueError("chosen_lengths and rejected_lengths must be positive token counts")
        h = chosen_logratio / chosen_lengths - rejected_logratio / rejected_lengths
        per_pair = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        delta = beta * (chosen_logratio - rejected_logratio)
        if loss_type == "dpo":
            per_pair = -F.logsigmoid(delta)
        else:
            if not 0.0 <= epsilon < 0.5:
                raise ValueError(f"epsilon must be in [0, 0.5), got {epsilon}")
            per_pair = (-(1 - epsilon) * F.logsigmoid(delta) + epsilon * F.logsigmoid(-delta)) / (1 - 2 * epsilon)

    weights = weights.to(per_pair.dtype)
    # A weight-0 pair contributes exactly 0, even if its loss overflowed (0 * inf is NaN).
    loss = torch.where(weights > 0, weights * per_pair, torch.zeros_like(per_pair)).mean()
    return loss, per_pair
