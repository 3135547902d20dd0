import math

import pytest
import torch

from cwpo_ray.losses import bt_loss, confidence, preference_loss


def logsig(x):
    return -math.log1p(math.exp(-x))


def batch(dtype=torch.float64):
    t = lambda *v: torch.tensor(v, dtype=dtype)  # noqa: E731
    # pair 0: chosen log-ratio +0.5, rejected -0.5; pair 1: the reverse
    return t(-1.0, -2.0), t(-2.0, -1.0), t(-1.5, -1.5), t(-1.5, -1.5)


def test_bt_loss_hand_value():
    assert bt_loss(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-6)
    assert bt_loss(torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.0])).item() == pytest.approx(math.log(2))


def test_confidence_hand_values_and_range():
    c = confidence(torch.tensor([2.0, 0.0, -3.0]), torch.tensor([0.0, 0.0, 1.0]))
    expected = [2 * (1 / (1 + math.exp(-2)) - 0.5), 0.0, 2 * (1 / (1 + math.exp(-4)) - 0.5)]
    assert c.tolist() == pytest.approx(expected, rel=1e-6)
    # symmetric in its arguments
    assert confidence(torch.tensor([0.0]), torch.tensor([2.0])).item() == pytest.approx(expected[0])
    big = confidence(torch.tensor([1e4]), torch.tensor([-1e4]))
    assert 0 <= big.item() <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dpo_hand_value(dtype):
    loss, per = preference_loss(*batch(dtype), loss_type="dpo", beta=0.5)
    # delta = 0.5 * (0.5 - (-0.5)) = 0.5 for pair 0, -0.5 for pair 1
    assert per.tolist() == pytest.approx([-logsig(0.5), -logsig(-0.5)], rel=1e-6)
    assert loss.item() == pytest.approx((-logsig(0.5) - logsig(-0.5)) / 2, rel=1e-6)
    assert per.dtype == dtype


def test_ipo_hand_value_uses_mean_logratios():
    lengths_c, lengths_r = torch.tensor([2.0, 1.0], dtype=torch.float64), torch.tensor([4.0, 1.0], dtype=torch.float64)
    _, per = preference_loss(*batch(), loss_type="ipo", beta=0.5, chosen_lengths=lengths_c, rejected_lengths=lengths_r)
    # pair 0: h = 0.5/2 - (-0.5)/4 = 0.375, target 1/(2*0.5) = 1
    # pair 1: h = -0.5/1 - 0.5/1 = -1.0
    assert per.tolist() == pytest.approx([(0.375 - 1) ** 2, (-1.0 - 1) ** 2], rel=1e-9)


def test_rdpo_hand_value():
    eps = 0.1
    _, per = preference_loss(*batch(), loss_type="rdpo", beta=0.5, epsilon=eps)
    expect0 = (-(1 - eps) * logsig(0.5) + eps * logsig(-0.5)) / (1 - 2 * eps)
    expect1 = (-(1 - eps) * logsig(-0.5) + eps * logsig(0.5)) / (1 - 2 * eps)
    assert per.tolist() == pytest.approx([expect0, expect1], rel=1e-9)
    # epsilon 0 is plain DPO
    _, dpo = preference_loss(*batch(), loss_type="dpo")
    _, rd0 = preference_loss(*batch(), loss_type="rdpo", epsilon=0.0)
    assert torch.allclose(dpo, rd0)


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "rdpo"])
def test_unit_weights_reproduce_unweighted_loss(loss_type):
    kw = dict(chosen_lengths=torch.tensor([3.0, 5.0], dtype=torch.float64),
              rejected_lengths=torch.tensor([2.0, 7.0], dtype=torch.float64))
    plain, _ = preference_loss(*batch(), loss_type=loss_type, **kw)
    ones, _ = preference_loss(*batch(), loss_type=loss_type, weights=torch.ones(2, dtype=torch.float64), **kw)
    assert ones.item() == plain.item()


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "rdpo"])
def test_weighted_loss_is_plain_mean_of_weighted_terms(loss_type):
    kw = dict(chosen_lengths=torch.tensor([3.0, 5.0], dtype=torch.float64),
              rejected_lengths=torch.tensor([2.0, 7.0], dtype=torch.float64))
    w = torch.tensor([0.25, 0.9], dtype=torch.float64)
    loss, per = preference_loss(*batch(), loss_type=loss_type, weights=w, **kw)
    # a plain mean: not normalized by the sum of weights (docs/METHOD.md)
    assert loss.item() == pytest.approx(((w * per).sum() / 2).item(), rel=1e-12)


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "rdpo"])
def test_zero_weight_pair_gets_exactly_zero_gradient(loss_type):
    pc = torch.tensor([-1.0, -3.0], requires_grad=True)
    pr = torch.tensor([-2.0, -0.5], requires_grad=True)
    loss, _ = preference_loss(pc, pr, torch.tensor([-1.2, -2.0]), torch.tensor([-1.9, -1.0]), loss_type=loss_type,
                              weights=torch.tensor([1.0, 0.0]), chosen_lengths=torch.tensor([2.0, 3.0]),
                              rejected_lengths=torch.tensor([4.0, 1.0]))
    loss.backward()
    assert pc.grad[1].item() == 0.0 and pr.grad[1].item() == 0.0
    assert pc.grad[0].item() != 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "rdpo"])
def test_extreme_gaps_stay_finite(loss_type, dtype):
    big = torch.tensor([1e4, -1e4], dtype=dtype, requires_grad=True)
    zero = torch.zeros(2, dtype=dtype)
    loss, per = preference_loss(big, -big, zero, zero, loss_type=loss_type, chosen_lengths=torch.ones(2, dtype=dtype),
                                rejected_lengths=torch.ones(2, dtype=dtype))
    loss.backward()
    assert torch.isfinite(per).all() and torch.isfinite(loss) and torch.isfinite(big.grad).all()
    assert torch.isfinite(bt_loss(big.detach(), -big.detach()))


def test_errors_name_the_problem():
    a = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss(a, a, a, a, loss_type="kto")
    with pytest.raises(ValueError, match="shape"):
        preference_loss(a, torch.zeros(3), a, a, loss_type="dpo")
    with pytest.raises(ValueError, match="1-D"):
        preference_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2), loss_type="dpo")
    with pytest.raises(ValueError, match="non-negative"):
        preference_loss(a, a, a, a, loss_type="dpo", weights=torch.tensor([1.0, -0.1]))
    with pytest.raises(ValueError, match="weights contains NaN"):
        preference_loss(a, a, a, a, loss_type="dpo", weights=torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="weights has shape"):
        preference_loss(a, a, a, a, loss_type="dpo", weights=torch.ones(3))
    with pytest.raises(ValueError, match="epsilon"):
        preference_loss(a, a, a, a, loss_type="rdpo", epsilon=0.5)
    with pytest.raises(ValueError, match="epsilon"):
        preference_loss(a, a, a, a, loss_type="rdpo", epsilon=-0.1)
    with pytest.raises(ValueError, match="lengths"):
        preference_loss(a, a, a, a, loss_type="ipo")
    with pytest.raises(ValueError, match="policy_chosen_logps contains NaN"):
        preference_loss(torch.tensor([float("inf"), 0.0]), a, a, a, loss_type="dpo")
