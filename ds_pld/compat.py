"""The DeepSpeed releases ds_pld supports, and what it does about the differences between them.

ds_pld reads private DeepSpeed internals: the ZeRO-1/2 flat-partition layout (`round_robin_bit16_*`,
`single_partition_of_fp32_groups`), BF16_Optimizer's and ZeRO-3's flat fp32 partitions, the engine's
`_config.load_universal_checkpoint`. These change between minor releases, so only the series checked by
`launch/check_deepspeed_versions.sh` (the latest patch of 0.17, 0.18 and 0.19) are accepted.

What differs between them, and what ds_pld does (`check_engine` and `apply_workarounds`, both run by `attach`):
- Up to 0.18.2 (0.17.6 and 0.18.0 measured with torch 2.13 on the CPU; 0.18.3 correct): ZeRO-2 with
  gradient_accumulation_steps > 1 steps on the last micro-batch's gradient only (with offload_optimizer it is right
  on one rank but still off on two). Refused.
- Before 0.18.6, bf16 at ZeRO-0 with a non-fused optimizer (ds_pld's Lamb, torch's optimizers) goes through
  FP16_UnfusedOptimizer, which then treats bf16 as fp16 (dynamic loss scaling from 2**16) and trains wrongly
  (0.17.6 measured). Refused.
- Before 0.19, with more than one rank on the CPU (gloo, torch 2.13): ZeRO-3 updates the weights
  nondeterministically, sometimes differently on each rank (0.17.6 and 0.18.9, plain DeepSpeed), and 0.18.9's
  BF16_Optimizer trains wrongly. Refused.
- 0.17.x to 0.18.4 give bf16 + data_types.grad_accum_dtype fp32 at ZeRO-1 a non-ZeRO optimizer (their DDP_BFLOAT16
  constant equals BFLOAT16, so the BF16_Optimizer branch is never taken). Refused: it would train without ZeRO.
- 0.18.3 to 0.19.x (0.18.9 measured; 0.19.8 correct) divide the gradient by the accumulation steps in a hook on
  every tensor the forward returns, so the gradient of a loss computed from returned logits is divided twice on the
  logits path at ZeRO-0/1/2. Worked around: the returned tensors are aliases, which nothing inside the forward
  depends on.
- 0.18 builds ZeRO-1/2's flat bit16 buffer from the parameters themselves, autograd-tracked; torch 2.13 then refuses
  the all-gather into it ("Output 0 of Split is a view and is being modified inplace") with more than one rank
  (0.19 detaches it). Worked around: the buffer and its partitions become detached views of the same memory.
- Only 0.19.8 (not 0.19.0) records `round_robin_bit16_offsets` (it pads each parameter); before, parameters are
  packed back to back (ds_pld.optim.zero_lamb reads either).
- 0.19.8 (not 0.19.0) clips gradients at norm 1.0 when the config sets no `gradient_clipping`; earlier releases do
  not clip. `check_engine` warns, naming the value this engine applies, when the config leaves it unset.
"""
from __future__ import annotations

from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from ds_pld.config_errors import ConfigError

SUPPORTED_DEEPSPEED = ">=0.17.6,<0.20"
# The releases launch/check_deepspeed_versions.sh runs the core tests against.
CHECKED_DEEPSPEED = ("0.17.6", "0.18.9", "0.19.8")

_TOO_OLD = ("ds_pld is checked against DeepSpeed 0.17.6 and later only: the ZeRO-1/2 partition layout, gradient "
            "accumulation and bf16 optimizer selection that ds_pld's LAMB and PLD rely on differ between releases, "
            "and older ones have not been checked")
_TOO_NEW = ("ds_pld reads private DeepSpeed internals (the ZeRO-1/2 partition layout `round_robin_bit16_*`, "
            "BF16_Optimizer's and ZeRO-3's flat fp32 partitions, the engine's `_config.load_universal_checkpoint`) "
            "that change between minor releases, and 0.20 has not been checked")


def _release(version: str) -> Version:
    """The release a version string names: 0.19.8+cu121, 0.19.8.post1 and 0.19.9.dev0 are 0.19.8 / 0.19.9."""
    try:
        return Version(Version(version).base_version)
    except InvalidVersion as err:
        raise ImportError(f"ds_pld cannot read the installed DeepSpeed version {version!r}; ds_pld supports "
                          f"DeepSpeed {SUPPORTED_DEEPSPEED}") from err


def check_deepspeed_version(version: str) -> None:
    """Raise ImportError naming `version`, the supported range and the reason when DeepSpeed `version` is outside
    SUPPORTED_DEEPSPEED; return None when it is inside."""
    release = _release(version)
    spec = SpecifierSet(SUPPORTED_DEEPSPEED)
    if release in spec:
        return
    lowest = min(Version(s.version) for s in spec if s.operator == ">=")
    why = _TOO_OLD if release < lowest else _TOO_NEW
    raise ImportError(f"ds_pld supports DeepSpeed {SUPPORTED_DEEPSPEED}, but DeepSpeed {version} is installed: "
                      f"{why}. Install a supported release: pip install 'deepspeed{SUPPORTED_DEEPSPEED}'")


def check_installed_deepspeed() -> None:
    """check_deepspeed_version for the installed DeepSpeed, read from its package metadata (no import)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        version = installed_version("deepspeed")
    except PackageNotFoundError as err:
        raise ImportError(f"ds_pld needs DeepSpeed {SUPPORTED_DEEPSPEED}, which is not installed") from err
    check_deepspeed_version(version)


def zero_accumulation_problem(version: str, zero_stage: int, gradient_accumulation_steps: int) -> str | None:
    """Why DeepSpeed `version` trains this ZeRO stage with gradient accumulation wrongly, or None. DeepSpeed up to
    0.18.2 (0.17.6 and 0.18.0 checked with torch 2.13 on the CPU, plain DeepSpeed as with ds_pld; 0.18.3 is right):
    ZeRO-2 keeps only the last micro-batch's gradient; ZeRO-0, 1 and 3 are right."""
    if zero_stage == 2 and gradient_accumulation_steps > 1 and _release(version) < Version("0.18.3"):
        return (f"DeepSpeed {version} ZeRO-2 with gradient_accumulation_steps {gradient_accumulation_steps} "
                "updates on the last micro-batch's gradient only; use ZeRO-1, gradient_accumulation_steps 1, or "
                "DeepSpeed >= 0.18.3")
    return None


def cpu_multi_rank_problem(version: str, zero_stage: int, optimizer_name: str) -> str | None:
    """Why DeepSpeed `version` trains wrongly with more than one data-parallel rank on the CPU, or None (0.17.6 and
    0.18.9 checked with torch 2.13 and gloo, plain DeepSpeed as with ds_pld; 0.19.8 is right)."""
    if _release(version) >= Version("0.19"):
        return None
    if zero_stage == 3:
        return (f"DeepSpeed {version} ZeRO-3 with more than one rank on the CPU updates the weights "
                "nondeterministically (the ranks can even disagree); use ZeRO-1 or ZeRO-2, or DeepSpeed >= 0.19.8")
    if optimizer_name == "BF16_Optimizer":
        return (f"DeepSpeed {version} BF16_Optimizer (bf16 with 'data_types.grad_accum_dtype' fp32) with more than "
                "one rank on the CPU trains wrongly; drop 'data_types.grad_accum_dtype', or use DeepSpeed >= 0.19.8")
    return None


def check_engine(engine: Any, deepspeed_config: dict[str, Any] | None = None) -> None:
    """Refuse an engine this DeepSpeed release would train wrongly, or without the ZeRO stage its config asks for;
    warn when `deepspeed_config` leaves `gradient_clipping` to a default that differs between releases."""
    import warnings

    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.base_optimizer import ZeROOptimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if deepspeed_config is not None and "gradient_clipping" not in deepspeed_config:
        warnings.warn(f"'gradient_clipping' is not set: DeepSpeed {deepspeed.__version__} clips at "
                      f"{engine.gradient_clipping()} (0.19.8 defaults to 1.0, earlier releases to 0, no clipping); "
                      "set it in the config to get the same training on every release", stacklevel=3)
    stage = engine.zero_optimization_stage()
    problem = zero_accumulation_problem(deepspeed.__version__, stage, engine.gradient_accumulation_steps())
    if problem:
        raise ConfigError(problem)
    if stage > 0 and not isinstance(engine.optimizer, ZeROOptimizer):
        raise ConfigError(f"DeepSpeed {deepspeed.__version__} runs this config without ZeRO "
                          f"('zero_optimization.stage' {stage}): it built {type(engine.optimizer).__name__}, which "
                          "partitions nothing (DeepSpeed 0.17 to 0.18.4 do so for bf16 with "
                          "'data_types.grad_accum_dtype' fp32 at ZeRO-1); drop 'data_types.grad_accum_dtype', or use "
                          "a later DeepSpeed")
    if engine.dp_world_size > 1 and get_accelerator().device_name() == "cpu":
        problem = cpu_multi_rank_problem(deepspeed.__version__, stage, type(engine.optimizer).__name__)
        if problem:
            raise ConfigError(problem)
    if (engine.bfloat16_enabled() and isinstance(engine.optimizer, FP16_UnfusedOptimizer)
            and _release(deepspeed.__version__) < Version("0.18.6")):
        raise ConfigError(f"DeepSpeed {deepspeed.__version__} steps bf16 at ZeRO-0 with a non-fused optimizer "
                          f"({type(engine.basic_optimizer).__name__}) through FP16_UnfusedOptimizer, which treats bf16 "
                          "as fp16 (dynamic loss scaling) before 0.18.6 and trains wrongly; use ZeRO stage 1-3, "
                          "fp32, or DeepSpeed >= 0.18.6")


def _alias_tensors(value: Any) -> Any:
    """`value` with every tensor in it replaced by an alias (same memory, a new autograd node), in place for dicts
    (a transformers ModelOutput included) and rebuilt for tuples and lists."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.view_as(value)
    if isinstance(value, dict):
        for key in list(value.keys()):
            value[key] = _alias_tensors(value[key])
        return value
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(_alias_tensors(item) for item in value)
    return value


def _alias_outputs(module: Any, args: Any, output: Any) -> Any:
    """Forward hook: DeepSpeed 0.18.3 to 0.19.x divide the gradient by the accumulation steps at every tensor the module
    returned; with aliases, no returned tensor lies on another one's path to the loss, so the division happens once
    whichever tensors the loss is computed from. Harmless where DeepSpeed scales the loss itself."""
    return _alias_tensors(output)


def _detach_zero12_flat_buffers(optimizer: Any) -> None:
    """DeepSpeed 0.18 flattens ZeRO-1/2's bit16 parameters into a buffer that autograd tracks, and its partitions are
    views of it; torch 2.13's all-gather into such a buffer fails at the first step with more than one rank. The
    detached tensors are views of the same memory, so the parameters stay linked to the buffer."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer):
        return
    flats = getattr(optimizer, "bit16_groups_flat", None) or []
    if not any(flat.requires_grad for flat in flats):
        return
    partitions = optimizer.parallel_partitioned_bit16_groups
    for i, flat in enumerate(flats):
        flats[i] = flat.detach()
        partitions[i] = [part.detach() for part in partitions[i]]


def apply_workarounds(engine: Any) -> list[Any]:
    """Apply the workarounds a release needs to a freshly built engine (before its first forward), none on 0.19.8;
    returns the hook handles to remove when ds_pld is detached."""
    import deepspeed

    release = _release(deepspeed.__version__)
    if release < Version("0.19"):
        _detach_zero12_flat_buffers(engine.optimizer)
    if Version("0.18.3") <= release < Version("0.19.8"):
        return [engine.module.register_forward_hook(_alias_outputs)]
    return []
