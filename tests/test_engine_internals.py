"""The private DeepSpeed names ds_pld's engine relies on (issue 14): a DeepSpeed without one is refused at
`ds_pld.initialize`, naming it and the version, instead of training on with the feature silently off."""
from __future__ import annotations

import pytest
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.engine import DeepSpeedEngine
from test_pld import engine_config, tiny_model

import ds_pld
from ds_pld.config_errors import ConfigError


def test_the_pinned_deepspeed_has_them(single_rank_world):
    engine, *_ = ds_pld.initialize(model=tiny_model(), config=engine_config())
    assert engine.load_universal_checkpoint() is False  # read through the private config field we switch
    engine.destroy()


def test_a_deepspeed_without_the_zero0_gradient_norm_hook_is_refused(single_rank_world, monkeypatch):
    monkeypatch.delattr(DeepSpeedEngine, "clip_fp32_gradients")
    with pytest.raises(ConfigError, match=r"clip_fp32_gradients.*divergence check"):
        ds_pld.initialize(model=tiny_model(), config=engine_config())


def test_a_deepspeed_without_the_universal_load_switch_is_refused(single_rank_world, monkeypatch):
    real_init = DeepSpeedConfig.__init__

    def init_without_switch(self, *args, **kwargs) -> None:
        real_init(self, *args, **kwargs)
        del self.load_universal_checkpoint

    monkeypatch.setattr(DeepSpeedConfig, "__init__", init_without_switch)
    with pytest.raises(ConfigError, match=r"load_universal_checkpoint.*another world size"):
        ds_pld.initialize(model=tiny_model(), config=engine_config())
