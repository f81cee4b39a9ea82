import pytest
import torch

from rlhfkit.rlhf.masked import masked_mean, masked_whiten


def test_whiten_and_masked_mean():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    w = masked_whiten(x, m)
    assert masked_mean(w, m).item() == pytest.approx(0.0, abs=1e-6)
    assert w[0, 3].item() == 0.0
    assert w[0, 2].item() == pytest.approx(1.0, rel=1e-4)  # unbiased std of 1,2,3 is 1
