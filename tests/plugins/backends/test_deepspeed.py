import pytest

from rlhfkit.errors import ConfigError
from rlhfkit.plugins.backends.deepspeed import DeepSpeedBackend, DeepSpeedConfig, _default_ds_config, fill_auto

from ...helpers import compose


def test_auto_values_come_from_the_run():
    cfg = fill_auto(_default_ds_config(), batch_size=32, world_size=4, max_grad_norm=0.5)
    assert cfg["train_micro_batch_size_per_gpu"] == 8
    assert cfg["train_batch_size"] == 32 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["gradient_clipping"] == 0.5
    explicit = fill_auto({**_default_ds_config(), "gradient_clipping": 2.0}, 32, 4, 0.5)
    assert explicit["gradient_clipping"] == 2.0  # a value the user set is kept
    assert _default_ds_config()["train_batch_size"] == "auto"  # the input is not modified


def test_every_key_is_overridable_from_the_command_line():
    cfg = compose(["backend=zero3", "backend.ds_config.zero_optimization.overlap_comm=true",
                   "backend.ds_config.bf16.enabled=true", "backend.ds_config.gradient_clipping=0.3",
                   "+backend.ds_config.zero_optimization.stage3_max_live_parameters=1000"])
    ds = cfg.backend.ds_config
    assert ds.zero_optimization.stage == 3 and ds.zero_optimization.overlap_comm is True
    assert ds.bf16.enabled is True and ds.gradient_clipping == 0.3
    assert ds.zero_optimization.stage3_max_live_parameters == 1000


@pytest.mark.parametrize("preset,stage,opt,param", [
    ("zero1", 1, "none", "none"), ("zero2", 2, "none", "none"), ("zero3", 3, "none", "none"),
    ("zero2_offload", 2, "cpu", "none"), ("zero3_offload", 3, "cpu", "cpu"),
])
def test_presets(preset, stage, opt, param):
    z = compose([f"backend={preset}"]).backend.ds_config.zero_optimization
    assert (z.stage, z.offload_optimizer.device, z.offload_param.device) == (stage, opt, param)


def test_inconsistent_configs_are_clear_errors():
    bad_offload = _default_ds_config()
    bad_offload["zero_optimization"]["offload_param"] = {"device": "cpu"}  # stage 2
    with pytest.raises(ConfigError, match="needs ZeRO stage 3"):
        DeepSpeedBackend(DeepSpeedConfig(ds_config=bad_offload))
    with pytest.raises(ConfigError, match="frozen_models=shard needs ZeRO stage 3"):
        DeepSpeedBackend(DeepSpeedConfig(frozen_models="shard"))
    with pytest.raises(ConfigError, match="replicate or shard"):
        DeepSpeedBackend(DeepSpeedConfig(frozen_models="everywhere"))
