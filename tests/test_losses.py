"""DPO / IPO (OpenRLHF's DPOLoss) and TDPO1 / TDPO2 (ours) against hand-computed values."""
import math

import pytest
import torch
from openrlhf.models import DPOLoss

from csr_plugin.training.losses import sequence_kl, tdpo_loss

softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731  -log sigmoid(x) = softplus(-x)

# policy log p: chosen -1, rejected -3; reference: -2 and -2 -> pi ratio 2, ref ratio 0, logits = 2
POLICY = torch.tensor([-1.0]), torch.tensor([-3.0])
REFERENCE = torch.tensor([-2.0]), torch.tensor([-2.0])


def test_dpo_is_minus_log_sigmoid_of_beta_times_the_margin():
    loss, chosen_reward, rejected_reward = DPOLoss(beta=0.1)(*POLICY, *REFERENCE)
    assert loss.item() == pytest.approx(softplus(-0.2))           # -log sigmoid(0.1 * 2) = 0.598139
    assert loss.item() == pytest.approx(0.598139, abs=1e-6)
    assert (chosen_reward.item(), rejected_reward.item()) == pytest.approx((0.1, -0.1))


def test_ipo_and_label_smoothing():
    ipo, _, _ = DPOLoss(beta=0.1, ipo=True)(*POLICY, *REFERENCE)
    assert ipo.item() == pytest.approx((2 - 1 / (2 * 0.1)) ** 2)  # (2 - 5)^2 = 9
    smoothed, _, _ = DPOLoss(beta=0.1, label_smoothing=0.1)(*POLICY, *REFERENCE)
    assert smoothed.item() == pytest.approx(0.9 * softplus(-0.2) + 0.1 * softplus(0.2))  # 0.618139


def test_tdpo_hand_values():
    """margins: chosen -1 - (-2) = 1, rejected -3 - (-2) = -1, u = 2; SeqKL_w = 0.5, SeqKL_l = 1.5.

    TDPO1: z = 2 - (1.5 - 0.5) = 1.0          loss = softplus(-0.1) = 0.644397
    TDPO2: z = 2 - 0.5 * (1.5 - 0.5) = 1.5    loss = softplus(-0.15) = 0.620957
    """
    args = torch.tensor([1.0]), torch.tensor([-1.0]), torch.tensor([0.5]), torch.tensor([1.5])
    assert tdpo_loss(*args, beta=0.1, variant="tdpo1").item() == pytest.approx(0.644397, abs=1e-6)
    assert tdpo_loss(*args, beta=0.1, alpha=0.5, variant="tdpo2").item() == pytest.approx(0.620957, abs=1e-6)
    with pytest.raises(ValueError):
        tdpo_loss(*args, beta=0.1, variant="tdpo3")


def test_tdpo2_stops_the_gradient_of_the_chosen_kl_only():
    kl_w, kl_l = torch.tensor([0.5], requires_grad=True), torch.tensor([1.5], requires_grad=True)
    tdpo_loss(torch.tensor([1.0]), torch.tensor([-1.0]), kl_w, kl_l, beta=0.1, variant="tdpo2").sum().backward()
    assert kl_w.grad is None and kl_l.grad.item() > 0.0   # no gradient reaches SeqKL_w
    kl_w, kl_l = torch.tensor([0.5], requires_grad=True), torch.tensor([1.5], requires_grad=True)
    tdpo_loss(torch.tensor([1.0]), torch.tensor([-1.0]), kl_w, kl_l, beta=0.1, variant="tdpo1").sum().backward()
    assert kl_w.grad.item() < 0.0 and kl_l.grad.item() > 0.0   # TDPO1 pushes both


def _naive_kl(policy, ref, mask):
    ref_logp, policy_logp = ref.log_softmax(-1), policy.log_softmax(-1)
    return ((ref_logp.exp() * (ref_logp - policy_logp)).sum(-1) * mask).sum(-1)


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunked_sequence_kl_matches_autograd(chunk):
    torch.manual_seed(0)
    policy = torch.randn(3, 7, 11, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(3, 7, 11, dtype=torch.float64)
    mask = (torch.rand(3, 7) > 0.3).double()
    weights = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    ours = sequence_kl(policy, ref, mask, chunk)
    (ours * weights).sum().backward()
    grad_ours = policy.grad.clone()
    policy.grad = None
    naive = _naive_kl(policy, ref, mask)
    (naive * weights).sum().backward()
    torch.testing.assert_close(ours.double(), naive, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_ours, policy.grad, rtol=1e-6, atol=1e-8)


def test_sequence_kl_is_finite_where_softmax_log_is_not():
    ref = torch.tensor([[[0.0, -1e4, 0.0]]])      # exp underflows: softmax gives an exact 0
    policy = torch.tensor([[[0.0, 0.0, -1e4]]])
    mask = torch.ones(1, 1)
    assert torch.isfinite(sequence_kl(policy, ref, mask)).all()
    naive = (ref.softmax(-1) * (ref.softmax(-1).log() - policy.softmax(-1).log())).sum(-1)
    assert not torch.isfinite(naive).all()       # 0 * log 0 = nan: why log_softmax is used
