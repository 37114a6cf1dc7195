"""The DeepSpeed versions ds_pld accepts (ds_pld.compat), and the release differences it refuses or works around,
checked on the installed DeepSpeed (launch/check_deepspeed_versions.sh runs this file on 0.17, 0.18 and 0.19)."""
from __future__ import annotations

import deepspeed
import pytest
import torch

import ds_pld
from ds_pld.compat import (
    CHECKED_DEEPSPEED,
    SUPPORTED_DEEPSPEED,
    _alias_tensors,
    check_deepspeed_version,
    check_installed_deepspeed,
    cpu_multi_rank_problem,
    zero_accumulation_problem,
)
from ds_pld.config_errors import ConfigError
from ds_pld.models import build_model


@pytest.mark.parametrize("version", [*CHECKED_DEEPSPEED, "0.18.0", "0.19.8+cu128", "0.19.9.dev0"])
def test_supported_versions_are_accepted(version):
    check_deepspeed_version(version)


@pytest.mark.parametrize(("version", "why"), [("0.16.9", "0.17.6 and later"), ("0.17.5", "0.17.6 and later"),
                                              ("0.20.0", "private DeepSpeed internals"),
                                              ("0.20.0rc1", "private DeepSpeed internals")])
def test_other_versions_are_refused_naming_both(version, why):
    with pytest.raises(ImportError) as error:
        check_deepspeed_version(version)
    message = str(error.value)
    assert f"DeepSpeed {version} is installed" in message and SUPPORTED_DEEPSPEED in message and why in message


def test_an_unreadable_version_is_refused():
    with pytest.raises(ImportError, match="cannot read"):
        check_deepspeed_version("not-a-version")


def test_the_installed_deepspeed_is_supported():
    check_installed_deepspeed()


def test_zero2_accumulation_is_refused_up_to_0_18_2():
    assert "last micro-batch" in zero_accumulation_problem("0.17.6", 2, 2)
    assert zero_accumulation_problem("0.17.6", 2, 1) is None
    assert zero_accumulation_problem("0.17.6", 1, 4) is None
    assert "last micro-batch" in zero_accumulation_problem("0.18.2", 2, 2)
    assert zero_accumulation_problem("0.18.3", 2, 2) is None


def test_zero3_and_bf16_optimizer_on_several_cpu_ranks_are_refused_before_0_19():
    assert "nondeterministically" in cpu_multi_rank_problem("0.18.9", 3, "DeepSpeedZeroOptimizer_Stage3")
    assert "BF16_Optimizer" in cpu_multi_rank_problem("0.17.6", 1, "BF16_Optimizer")
    assert cpu_multi_rank_problem("0.18.9", 2, "DeepSpeedZeroOptimizer") is None
    assert cpu_multi_rank_problem("0.19.8", 3, "DeepSpeedZeroOptimizer_Stage3") is None


def test_outputs_are_aliased_in_their_containers():
    model = build_model("bert-tiny", vocab_size=64, num_layers=1)
    ids = torch.randint(5, 64, (2, 8))
    out = model(ids, labels=ids)
    kind, loss = type(out), out.loss
    aliased = _alias_tensors(out)
    assert type(aliased) is kind and aliased.loss is not loss and torch.equal(aliased.loss, loss)
    assert aliased["logits"] is aliased.logits  # a ModelOutput keeps its keys and attributes in step
    pair = _alias_tensors((loss, [loss], 3))
    assert isinstance(pair, tuple) and isinstance(pair[1], list) and pair[2] == 3 and pair[0] is not loss


def _train(stage: int | None, steps: int = 2, accumulation: int = 2) -> list[float]:
    """Losses of `steps` optimizer steps of `accumulation` micro-batches each, with torch's AdamW: through
    ds_pld.initialize at ZeRO `stage`, or by hand (stage None). The model returns the loss with the logits it is
    computed from, as Hugging Face style models do."""
    torch.manual_seed(0)
    model = build_model("bert-tiny", vocab_size=64, num_layers=2, hidden_dropout=0.0, attention_dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = None
    if stage is not None:
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": accumulation,
                  "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                  "steps_per_print": 10 ** 9}
        engine, *_ = ds_pld.initialize(model=model, optimizer=optimizer, config=config)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        for _ in range(accumulation):
            ids = torch.randint(5, 64, (2, 16), generator=generator)
            out = (engine or model)(ids, labels=ids)
            losses.append(out.loss.item())
            if engine is None:
                (out.loss / accumulation).backward()
            else:
                engine.backward(out.loss)
                engine.step()
        if engine is None:
            optimizer.step()
            optimizer.zero_grad()
    if engine is not None:
        engine.destroy()
    return losses


def test_every_zero_stage_accumulates_gradients_like_plain_pytorch(single_rank_world):
    """DeepSpeed 0.18 divided the logits' gradient by the accumulation steps twice at ZeRO-0/1/2 (ds_pld aliases the
    outputs), and ZeRO-2 up to 0.18.2 keeps only the last micro-batch's gradient (refused). Every stage matches
    PyTorch."""
    reference = _train(None)
    for stage in (0, 1, 2, 3):
        if zero_accumulation_problem(deepspeed.__version__, stage, 2):
            with pytest.raises(ConfigError, match="last micro-batch"):
                _train(stage)
            continue
        assert _train(stage) == pytest.approx(reference, rel=1e-5), f"ZeRO-{stage}"


def test_zero1_bf16_with_fp32_accumulation_gets_zero_or_is_refused(single_rank_world):
    """DeepSpeed 0.17 to 0.18.4 give this config a non-ZeRO optimizer; ds_pld refuses that, later ones build their
    BF16_Optimizer."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
              "data_types": {"grad_accum_dtype": "fp32"}, "zero_optimization": {"stage": 1},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "steps_per_print": 10 ** 9}
    model = build_model("bert-tiny", vocab_size=64, num_layers=1)
    try:
        engine, *_ = ds_pld.initialize(model=model, config=config)
    except ConfigError as error:
        assert "without ZeRO" in str(error) and deepspeed.__version__ in str(error)
        return
    assert isinstance(engine.optimizer, ZeROOptimizer)
    engine.destroy()


def test_zero0_bf16_with_an_unfused_optimizer_trains_or_is_refused(single_rank_world):
    """DeepSpeed before 0.18.6 loss-scales bf16 as fp16 in FP16_UnfusedOptimizer (refused); later ones match fp32
    up to bf16 rounding."""
    def train(bf16: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        start = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
                  "steps_per_print": 10 ** 9, **({"bf16": {"enabled": True}} if bf16 else {})}
        engine, *_ = ds_pld.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                       config=config)
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(4, 16, generator=generator), torch.randn(4, 1, generator=generator)
            out = engine(x.to(torch.bfloat16 if bf16 else torch.float32)).float()
            engine.backward(torch.nn.functional.mse_loss(out, y))
            engine.step()
        end = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
        engine.destroy()
        return end - start

    update = train(bf16=False)
    try:
        bf16_update = train(bf16=True)
    except ConfigError as error:
        assert "FP16_UnfusedOptimizer" in str(error) and deepspeed.__version__ in str(error)
        return
    assert (bf16_update - update).norm() < 0.05 * update.norm()


def test_unset_gradient_clipping_is_named_with_this_releases_default(single_rank_world):
    """0.19.8 clips at 1.0 when the key is absent, earlier releases not at all: the same config would train
    differently, so attach says which value this engine applies."""
    config = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    with pytest.warns(UserWarning, match=rf"'gradient_clipping' is not set: DeepSpeed {deepspeed.__version__} "
                                         r"clips at \d"):
        ds_pld.initialize(model=build_model("bert-tiny", num_layers=2, vocab_size=32), config=config)
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="'gradient_clipping' is not set")
        ds_pld.initialize(model=build_model("bert-tiny", num_layers=2, vocab_size=32),
                          config={**config, "gradient_clipping": 0.5})
