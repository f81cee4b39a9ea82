import pytest
import torch

from rlhfkit.rlhf.logprobs import logprobs_from_logits


def test_logprobs_use_temperature():
    logits = torch.tensor([[[2.0, 0.0]]])
    tok = torch.tensor([[0]])
    lp1 = logprobs_from_logits(logits, tok, 1.0)
    lp2 = logprobs_from_logits(logits, tok, 2.0)
    assert lp1.item() == pytest.approx(torch.log_softmax(torch.tensor([2.0, 0.0]), 0)[0].item())
    assert lp2.item() == pytest.approx(torch.log_softmax(torch.tensor([1.0, 0.0]), 0)[0].item())
