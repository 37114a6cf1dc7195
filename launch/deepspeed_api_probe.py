"""Probe the DeepSpeed names ds_pld relies on, in whatever DeepSpeed this Python imports; prints one JSON object.

Run by launch/check_deepspeed_versions.sh with each version's Python (`python launch/deepspeed_api_probe.py`).
Each check is `ok` (present, with the shape ds_pld reads) or a string saying what differs. One rank, gloo, CPU.
"""
from __future__ import annotations

import inspect
import json
import os
import socket
import sys
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny() -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))


def engine_for(stage: int, precision: str = "fp32") -> Any:
    import deepspeed
    import torch

    cfg: dict[str, Any] = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                           "steps_per_print": 10 ** 9, "gradient_clipping": 1.0,
                           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                           "zero_optimization": {"stage": stage}}
    if precision != "fp32":
        cfg["bf16"] = {"enabled": True}
    if precision == "bf16-fp32-accum":
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    engine, *_ = deepspeed.initialize(model=tiny(), config=cfg)
    dtype = torch.bfloat16 if precision != "fp32" else torch.float32
    x = torch.randn(2, 8, dtype=dtype)
    loss = engine(x).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    return engine


def attrs(obj: Any, spec: dict[str, str]) -> dict[str, str]:
    """spec: name -> what ds_pld expects ('list[Tensor]', 'list[group]', 'list[int]', 'list[list]', 'group',
    'Tensor'); per name 'ok' or what is there instead."""
    import torch

    out = {}
    for name, kind in spec.items():
        if not hasattr(obj, name):
            out[name] = "MISSING"
            continue
        value = getattr(obj, name)
        if kind == "Tensor":
            good = isinstance(value, torch.Tensor)
        elif kind == "group":
            good = value is not None and not isinstance(value, (list, tuple, torch.Tensor))
        elif kind.startswith("list"):
            inner = kind[5:-1]
            good = isinstance(value, (list, tuple)) and len(value) > 0
            if good and inner == "Tensor":
                good = all(isinstance(v, torch.Tensor) for v in value)
            elif good and inner == "int":
                good = all(isinstance(int(v), int) for v in value)
            elif good and inner == "list":
                good = all(isinstance(v, (list, tuple)) for v in value)
            elif good and inner == "group":
                good = all(v is not None and not isinstance(v, (list, tuple, torch.Tensor)) for v in value)
        else:
            good = True
        out[name] = "ok" if good else f"unexpected {type(value).__name__}: {str(value)[:80]}"
    return out


def main() -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    import deepspeed
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    report: dict[str, Any] = {"deepspeed": deepspeed.__version__, "torch": torch.__version__,
                              "python": sys.version.split()[0], "deepspeed_file": deepspeed.__file__}

    # Engine: ZeRO-0 gradient norm (ds_pld overrides clip_fp32_gradients and sets _global_grad_norm).
    source = inspect.getsource(DeepSpeedEngine.get_global_grad_norm)
    report["DeepSpeedEngine.get_global_grad_norm"] = "ok" if "_global_grad_norm" in source else source.strip()
    clip = getattr(DeepSpeedEngine, "clip_fp32_gradients", None)
    report["DeepSpeedEngine.clip_fp32_gradients"] = "ok" if callable(clip) else "MISSING"
    if callable(clip):
        step_src = inspect.getsource(DeepSpeedEngine._take_model_step)
        report["DeepSpeedEngine._take_model_step calls clip_fp32_gradients"] = (
            "ok" if "self.clip_fp32_gradients()" in step_src else "NOT CALLED")
    from deepspeed.runtime.utils import clip_grad_norm_
    params = list(inspect.signature(clip_grad_norm_).parameters)
    report["deepspeed.runtime.utils.clip_grad_norm_(parameters, max_norm, mpu)"] = (
        "ok" if params[:2] == ["parameters", "max_norm"] and "mpu" in params else str(params))

    # deepspeed.utils helpers.
    import deepspeed.utils as dsu
    for name in ("safe_get_full_fp32_param", "set_z3_leaf_module", "z3_leaf_module"):
        fn = getattr(dsu, name, None)
        report[f"deepspeed.utils.{name}"] = "ok " + str(inspect.signature(fn)) if callable(fn) else "MISSING"
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: F401
        report["deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint"] = "ok"
    except ImportError as err:
        report["deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint"] = f"MISSING ({err})"
    try:
        import deepspeed.checkpoint.ds_to_universal as universal
        src = inspect.getsource(universal)
        flags = ["--input_folder", "--output_folder", "--num_extract_workers", "--num_merge_workers",
                 "--inject_missing_state"]
        absent = [f for f in flags if f not in src]
        report["deepspeed.checkpoint.ds_to_universal"] = "ok" if not absent else f"flags missing: {absent}"
    except ImportError as err:
        report["deepspeed.checkpoint.ds_to_universal"] = f"MISSING ({err})"

    # ZeRO-0 engine: the config switch, the PLD block DeepSpeed itself may still read.
    engine = engine_for(0)
    report["engine._config.load_universal_checkpoint"] = (
        f"ok (={engine._config.load_universal_checkpoint})" if hasattr(engine._config, "load_universal_checkpoint")
        else "MISSING")
    report["engine.load_universal_checkpoint()"] = (
        "ok" if engine.load_universal_checkpoint() is engine._config.load_universal_checkpoint else "differs")
    report["engine.get_global_grad_norm() after a ZeRO-0 step"] = repr(engine.get_global_grad_norm())
    from deepspeed.runtime.config import DeepSpeedConfig
    src = inspect.getsource(DeepSpeedConfig)
    report["DeepSpeedConfig reads progressive_layer_drop"] = "yes" if "progressive_layer_drop" in src else "no"
    engine.destroy()

    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    for stage in (1, 2):
        engine = engine_for(stage)
        opt = engine.optimizer
        report[f"ZeRO-{stage} optimizer"] = type(opt).__name__
        report[f"ZeRO-{stage} attributes"] = attrs(opt, {
            "single_partition_of_fp32_groups": "list[Tensor]", "real_dp_process_group": "list[group]",
            "partition_size": "list[int]", "round_robin_bit16_meta": "list[list]",
            "round_robin_bit16_offsets": "list[list]", "round_robin_bit16_groups": "list[list]"})
        assert isinstance(opt, DeepSpeedZeroOptimizer)
        flat = opt.single_partition_of_fp32_groups[0]
        report[f"ZeRO-{stage} partition_size[0] == numel(single_partition_of_fp32_groups[0])"] = (
            int(opt.partition_size[0]) == flat.numel())
        report[f"ZeRO-{stage} base optimizer steps single_partition_of_fp32_groups"] = any(
            p is flat for g in opt.optimizer.param_groups for p in g["params"])
        hp = getattr(opt.round_robin_bit16_groups[0][0], "_hp_mapping", "MISSING")
        report[f"ZeRO-{stage} param._hp_mapping.hp_fragment_address"] = (
            "ok" if hasattr(hp, "hp_fragment_address") else repr(hp))
        engine.destroy()

    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    engine = engine_for(1, "bf16-fp32-accum")
    opt = engine.optimizer
    report["ZeRO-1 bf16 + fp32 grad accum optimizer"] = type(opt).__name__
    if isinstance(opt, BF16_Optimizer):
        report["BF16_Optimizer attributes"] = attrs(opt, {
            "fp32_groups_flat_partition": "list[Tensor]", "bf16_groups_flat": "list[Tensor]",
            "bf16_groups": "list[list]", "real_dp_process_group": "list[group]"})
        report["BF16_Optimizer base optimizer steps fp32_groups_flat_partition"] = any(
            p is opt.fp32_groups_flat_partition[0] for g in opt.optimizer.param_groups for p in g["params"])
    engine.destroy()

    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    engine = engine_for(3)
    opt = engine.optimizer
    report["ZeRO-3 optimizer"] = type(opt).__name__
    report["ZeRO-3 attributes"] = attrs(opt, {
        "fp32_partitioned_groups_flat": "list[Tensor]", "fp16_groups": "list[list]",
        "sub_group_process_groups": "list[group]", "dp_process_group": "group",
        "grad_partitions_flat_buffer": "Tensor"})
    report["ZeRO-3 _setup_for_real_optimizer"] = (
        "ok" if callable(getattr(DeepSpeedZeroOptimizer_Stage3, "_setup_for_real_optimizer", None)) else "MISSING")
    step_src = inspect.getsource(DeepSpeedZeroOptimizer_Stage3._optimizer_step)
    report["ZeRO-3 _optimizer_step steps fp32_partitioned_groups_flat[sub_group]"] = (
        "fp32_partitioned_groups_flat[sub_group_id]" in step_src and "['params'] = [fp32_param]" in step_src)
    p0 = opt.fp16_groups[0][0]
    report["ZeRO-3 param.ds_tensor.ds_numel, param.ds_numel"] = (
        "ok" if hasattr(p0, "ds_numel") and hasattr(getattr(p0, "ds_tensor", None), "ds_numel") else "MISSING")
    from deepspeed.runtime.zero import partitioned_param_coordinator as ppc
    report["ZeRO-3 logs 'Invalidate trace cache'"] = "Invalidate trace cache" in inspect.getsource(ppc)
    try:
        fp32 = dsu.safe_get_full_fp32_param(p0)
        report["safe_get_full_fp32_param(zero3 param)"] = (
            "ok" if isinstance(fp32, torch.Tensor) and fp32.numel() == p0.ds_numel else repr(fp32))
    except Exception as err:  # noqa: BLE001 - a probe reports what it sees
        report["safe_get_full_fp32_param(zero3 param)"] = f"raises {type(err).__name__}: {err}"
    engine.destroy()
    print("DS_PLD_PROBE " + json.dumps(report, sort_keys=False))


if __name__ == "__main__":
    main()
