import pytest
import torch

from rlhfkit.errors import ConfigError
from rlhfkit.interfaces import Backend, Engine
from rlhfkit.plugins.backends.single import SingleConfig, SingleDevice


def test_engine_clips_steps_and_zeroes_grads():
    backend = SingleDevice(SingleConfig(device="cpu"))
    assert isinstance(backend, Backend)
    model = torch.nn.Linear(3, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = backend.prepare(model, opt, None, max_grad_norm=1.0)
    assert isinstance(engine, Engine)
    loss = engine(torch.tensor([[3.0, 4.0, 0.0]])).sum()  # grad = (3, 4, 0), norm 5
    engine.backward(loss)
    norm = engine.step()
    assert norm == pytest.approx(5.0)
    torch.testing.assert_close(model.weight.data, torch.tensor([[-0.6, -0.8, 0.0]]))  # clipped to norm 1
    assert model.weight.grad is None
    state = engine.state_dict()
    engine.load_state_dict(state)


def test_frozen_models_have_no_grads():
    backend = SingleDevice(SingleConfig(device="cpu"))
    m = backend.prepare_frozen(torch.nn.Linear(2, 2))
    assert not m.training and not any(p.requires_grad for p in m.parameters())


def test_bf16_autocast():
    backend = SingleDevice(SingleConfig(device="cpu", precision="bf16"))
    with backend.autocast():
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16
    with SingleDevice(SingleConfig(device="cpu")).autocast():
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32


def test_bad_config():
    with pytest.raises(ConfigError, match="precision"):
        SingleDevice(SingleConfig(precision="fp8"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            SingleDevice(SingleConfig(device="cuda"))


def test_training_state_round_trip(tmp_path):
    backend = SingleDevice(SingleConfig(device="cpu"))
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    engine = backend.prepare(model, opt, sched)
    engine.backward(model(torch.ones(1, 2)).sum())
    engine.step()
    engine.save_state(str(tmp_path))
    fresh_opt = torch.optim.Adam(model.parameters(), lr=0.1)
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=1, gamma=0.5)
    fresh = backend.prepare(model, fresh_opt, fresh_sched)
    fresh.load_state(str(tmp_path))
    assert fresh_opt.state_dict()["state"][0]["step"].item() == 1
    assert fresh_sched.get_last_lr() == sched.get_last_lr() == [0.05]
