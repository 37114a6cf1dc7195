"""Every private DeepSpeed / torch name ds_pld still uses (the table in docs/architecture.md), one test each: present
in the installed version, and, where ds_pld reads it, refused with a clear message when a release removes it."""
from __future__ import annotations

import inspect
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.engine import DeepSpeedEngine
from test_pld import engine_config, tiny_model

import ds_pld
from ds_pld import universal_checkpoint
from ds_pld.config_errors import ConfigError
from ds_pld.optim.zero_lamb import BF16_FIELDS, ZERO3_FIELDS, ZERO12_FIELDS, _require
from ds_pld.plugin_state import continue_progress

ROOT = Path(__file__).resolve().parents[1]


def test_the_engine_keeps_deepspeeds_class_and_methods(single_rank_world):
    """Issue 19: no class swap, no overridden method: PLD, the gradient norm and checkpoints ride on public hooks."""
    engine, *_ = ds_pld.initialize(model=tiny_model(), config=engine_config())
    assert type(engine) is DeepSpeedEngine
    for name in ("forward", "step", "save_checkpoint", "load_checkpoint", "clip_fp32_gradients"):
        assert name not in vars(engine), f"{name} is patched on the instance"
    engine.destroy()


def test_no_class_assignment_and_no_source_scraping_in_the_package():
    sources = {path: path.read_text() for path in (ROOT / "ds_pld").rglob("*.py")}
    assert not [p for p, text in sources.items() if "__class__ =" in text]
    assert not [p for p, text in sources.items() if "getsource" in text]


def test_universal_load_switch(single_rank_world, monkeypatch):
    """`DeepSpeedEngine._config.load_universal_checkpoint`, switched on for one re-sharding load."""
    engine, *_ = ds_pld.initialize(model=tiny_model(), config=engine_config())
    assert engine.load_universal_checkpoint() is False
    with universal_checkpoint.loading_universal(engine):
        assert engine.load_universal_checkpoint() is True
    assert engine.load_universal_checkpoint() is False
    monkeypatch.delattr(type(engine._config), "load_universal_checkpoint", raising=False)
    monkeypatch.delattr(engine._config, "load_universal_checkpoint")
    with pytest.raises(ConfigError, match=r"load_universal_checkpoint.*resume on the world size that wrote it"):
        with universal_checkpoint.loading_universal(engine):
            pass
    engine.destroy()


def test_step_counters_written_when_earlybert_rebuilds_the_engine(single_rank_world):
    """`DeepSpeedEngine.global_steps / global_samples`, continued on the engine EarlyBERT's draw builds."""
    engine, *_ = ds_pld.initialize(model=tiny_model(), config=engine_config())
    continue_progress(engine, 7, 56)
    assert (engine.global_steps, engine.global_samples) == (7, 56)
    assert ds_pld.plugin_of(engine).pld_theta() == pytest.approx(ds_pld.plugin_of(engine).pld.driver.theta_at(7))
    engine.destroy()

    class Renamed:
        global_steps = 0

    with pytest.raises(ConfigError, match="no integer `global_samples` counter"):
        continue_progress(Renamed(), 1, 1)


def test_torch_default_group_timeouts_exist():
    """`torch.distributed.distributed_c10d.default_pg_timeout` (and `default_pg_nccl_timeout` in builds with NCCL):
    ds_pld sets them so the groups DeepSpeed creates without a timeout get the job's; without them a hung peer is
    waited on for torch's default."""
    import torch.distributed.distributed_c10d as c10d

    assert isinstance(getattr(c10d, "default_pg_timeout", None), timedelta), (
        f"torch {torch.__version__} has no c10d.default_pg_timeout: ds_pld.training.distributed._default_group_timeout "
        "no longer bounds DeepSpeed's groups")
    if torch.distributed.is_nccl_available():
        assert isinstance(getattr(c10d, "default_pg_nccl_timeout", None), timedelta)


def test_deepspeed_shm_backend_is_where_release_shm_names_looks(single_rank_world):
    """`deepspeed.comm.comm.cdb` (its `shm_comm_op`): release_shm_names unlinks the segment it made. The segment's
    name format is checked by every launcher test (tests/conftest.py fails a run that leaves one behind)."""
    import deepspeed.comm.comm as ds_comm

    assert getattr(ds_comm, "cdb", None) is not None, "deepspeed.comm.comm.cdb is gone: update release_shm_names"
    source = inspect.getsource(type(ds_comm.cdb))
    assert "shm_comm_op" in source, "DeepSpeed's TorchBackend no longer has shm_comm_op: update release_shm_names"


def test_lamb_bridge_names_a_missing_zero_field():
    """The LAMB-under-ZeRO bridge's private reads, asked by name before use: a renamed one is one clear error."""
    class Wrapper:
        pass

    wrapper = Wrapper()
    for name in ZERO12_FIELDS[1:]:
        setattr(wrapper, name, None)
    with pytest.raises(ConfigError, match=r"Wrapper\.\{single_partition_of_fp32_groups\}.*DeepSpeed 0\.17-0\.19"):
        _require(wrapper, ZERO12_FIELDS)
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for cls, fields in ((DeepSpeedZeroOptimizer, ZERO12_FIELDS), (BF16_Optimizer, BF16_FIELDS),
                        (DeepSpeedZeroOptimizer_Stage3, ZERO3_FIELDS)):
        init = inspect.getsource(cls)
        assert all(f"self.{name}" in init for name in fields), f"{cls.__name__} lost a field the bridge reads"
