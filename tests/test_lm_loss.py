"""The chunked next-token cross-entropy against F.cross_entropy: values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from llama2.losses import IGNORE, lm_loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_lm_loss_matches_cross_entropy(dtype, reduction):
    g = torch.Generator().manual_seed(0)
    V = 4096  # 128 rows per 2 MB chunk: the 3 x 100 rows below span three chunks
    logits = (3 * torch.randn(3, 100, V, generator=g)).to(dtype).requires_grad_(True)
    targets = torch.randint(0, V, (3, 100), generator=g)
    targets[0, :17] = IGNORE  # e.g. prompt tokens in SFT
    targets[2, -1] = IGNORE
    ours = lm_loss(logits, targets, reduction)
    (gours,) = torch.autograd.grad(ours, logits)
    ref = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction=reduction)
    (gref,) = torch.autograd.grad(ref, logits)
    assert gours.dtype == dtype
    assert abs(ours.item() - ref.item()) <= 1e-5 * abs(ref.item())
    tol = 1e-7 if dtype == torch.float32 else 1e-3 * gref.abs().max().item()
    assert (gours.float() - gref.float()).abs().max().item() <= tol
    assert gours.flatten(0, 1)[targets.flatten() == IGNORE].abs().max().item() == 0.0


def test_lm_loss_by_hand_and_bad_reduction():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
    loss = lm_loss(logits, torch.tensor([[1, IGNORE]]))
    assert loss.item() == pytest.approx(-torch.log(torch.tensor(0.25)).item())
    with pytest.raises(ValueError, match="reduction"):
        lm_loss(logits, torch.tensor([[1, 2]]), "none")
