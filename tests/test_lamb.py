"""ds_pld.optim.Lamb: FusedLamb's update on CPU, per-parameter trust ratios under ZeRO, config, checkpoints."""
from __future__ import annotations

import copy
import json
import math
import threading
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SCRIPTS, run_deepspeed

import ds_pld
from ds_pld.config_errors import ConfigError
from ds_pld.models import build_model
from ds_pld.optim import Lamb, LambConfig, ShardLayout, bind_lamb_to_engine, build_lamb, find_lamb

HYPER = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True, max_coeff=10.0,
             min_coeff=0.01)


# ------------------------------------------------------------------------------------------------ reference
def naive_lamb(weights: list[torch.Tensor], grad_steps: list[list[torch.Tensor]], lr: float,
               betas: tuple[float, float], eps: float, weight_decay: float, bias_correction: bool, max_coeff: float,
               min_coeff: float, trust: list[bool] | None = None, eps_inside_sqrt: bool = False,
               ) -> tuple[list[torch.Tensor], list[list[float]]]:
    """One tensor at a time, in float64, written from DeepSpeed's fused_lamb_cuda_kernel.cu. Returns the final
    weights and each step's trust ratios (None for tensors with trust ratio off)."""
    b1, b2 = betas
    ws = [w.double().clone() for w in weights]
    ms = [torch.zeros_like(w) for w in ws]
    vs = [torch.zeros_like(w) for w in ws]
    trust = trust or [True] * len(ws)
    history = []
    for t, grads in enumerate(grad_steps, start=1):
        step_size = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) if bias_correction else lr
        ratios = []
        for i, (w, g) in enumerate(zip(ws, grads)):
            g = g.double()
            ms[i] = b1 * ms[i] + (1 - b1) * g
            vs[i] = b2 * vs[i] + (1 - b2) * g * g
            denom = torch.sqrt(vs[i] + eps) if eps_inside_sqrt else torch.sqrt(vs[i]) + eps
            update = ms[i] / denom + weight_decay * w
            ratio = 1.0
            if trust[i]:
                w_norm, u_norm = w.norm().item(), update.norm().item()
                if w_norm != 0 and u_norm != 0:
                    ratio = w_norm / u_norm
                    ratio = max_coeff if ratio > max_coeff else ratio
                    ratio = min_coeff if ratio < min_coeff else ratio
            ratios.append(ratio if trust[i] else None)
            ws[i] = w - step_size * ratio * update
        history.append(ratios)
    return ws, history


def make_tensors(seed: int = 0) -> list[torch.Tensor]:
    """Different scales give trust ratios from ~0.1 to ~3, so a clamp can bite some tensors and not others; the
    zero tensor (a fresh bias) exercises the 'ratio 1 when ||w|| = 0' rule."""
    g = torch.Generator().manual_seed(seed)
    return [0.1 * torch.randn(24, 16, generator=g), torch.randn(40, generator=g), 3.0 * torch.randn(8, 8, generator=g),
            torch.zeros(12)]


def make_grads(steps: int, tensors: list[torch.Tensor], seed: int = 1) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(t.shape, generator=g) * (1 + 0.5 * i) for i, t in enumerate(tensors)] for _ in range(steps)]


def run_lamb(tensors: list[torch.Tensor], grad_steps: list[list[torch.Tensor]], trust: list[bool] | None = None,
             **hyper) -> tuple[list[torch.Tensor], Lamb]:
    params = [torch.nn.Parameter(t.clone()) for t in tensors]
    trust = trust or [True] * len(params)
    groups = [dict(params=[p for p, on in zip(params, trust) if on], trust_ratio=True),
              dict(params=[p for p, on in zip(params, trust) if not on], trust_ratio=False)]
    opt = Lamb([g for g in groups if g["params"]], **hyper)
    for grads in grad_steps:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params], opt


def assert_close_to(ours: list[torch.Tensor], ref: list[torch.Tensor], rtol: float = 1e-5) -> None:
    for i, (a, b) in enumerate(zip(ours, ref)):
        err = ((a.double() - b).abs().max() / b.abs().max()).item()
        assert err < rtol, f"tensor {i}: max abs error {err:.2e} of its scale"


# ------------------------------------------------------------------------------------------------ the update
@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_one_step_matches_naive_reference(bias_correction, weight_decay):
    tensors = make_tensors()
    grads = make_grads(1, tensors)
    hyper = dict(HYPER, bias_correction=bias_correction, weight_decay=weight_decay)
    ours, _ = run_lamb(tensors, grads, **hyper)
    ref, _ = naive_lamb(tensors, grads, **hyper)
    assert_close_to(ours, ref)
    assert not torch.equal(ours[0], tensors[0])


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("clamp", ["inside", "max_bites", "min_bites"])
def test_many_steps_match_naive_reference(bias_correction, weight_decay, clamp):
    coeffs = {"inside": (10.0, 0.01), "max_bites": (0.5, 0.01), "min_bites": (10.0, 0.5)}[clamp]
    tensors = make_tensors()
    grads = make_grads(30, tensors)
    hyper = dict(HYPER, bias_correction=bias_correction, weight_decay=weight_decay, max_coeff=coeffs[0],
                 min_coeff=coeffs[1])
    ours, opt = run_lamb(tensors, grads, **hyper)
    ref, history = naive_lamb(tensors, grads, **hyper)
    assert_close_to(ours, ref)
    last = history[-1][:3]   # the 4th tensor starts at zero and stays small: it sits at min_coeff
    if clamp == "max_bites":
        assert coeffs[0] in last and any(r < coeffs[0] for r in last)
    elif clamp == "min_bites":
        assert coeffs[1] in last and any(r > coeffs[1] for r in last)
    else:
        assert all(coeffs[1] < r < coeffs[0] for r in last)
    assert history[0][3] == 1.0  # zero weights: ratio 1 on the first step
    assert opt.state[next(iter(opt.state))]["step"] == 30


def test_trust_ratio_off_group_and_eps_inside_sqrt():
    tensors = make_tensors()
    grads = make_grads(10, tensors)
    trust = [True, False, True, False]
    hyper = dict(HYPER, max_coeff=0.5, eps=1e-3, eps_inside_sqrt=True)
    ours, _ = run_lamb(tensors, grads, trust=trust, **hyper)
    ref, _ = naive_lamb(tensors, grads, trust=trust, **hyper)
    assert_close_to(ours, ref)
    ref_outside, _ = naive_lamb(tensors, grads, trust=trust, **dict(hyper, eps_inside_sqrt=False))
    assert (ours[0].double() - ref_outside[0]).abs().max() > 1e-4  # eps placement matters at this eps


def test_trust_ratio_stats_cover_trust_params_only():
    tensors = make_tensors()
    grads = make_grads(3, tensors)
    trust = [True, True, True, False]
    params = [torch.nn.Parameter(t.clone()) for t in tensors]
    opt = Lamb([dict(params=params[:3]), dict(params=params[3:], trust_ratio=False)], **HYPER)
    assert opt.trust_ratio_stats == {}
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    _, history = naive_lamb(tensors, grads, trust=trust, **HYPER)
    last = sorted(r for r in history[-1] if r is not None)
    stats = opt.trust_ratio_stats
    assert stats["min"] == pytest.approx(last[0], rel=1e-5)
    assert stats["median"] == pytest.approx(last[1], rel=1e-5)
    assert stats["max"] == pytest.approx(last[2], rel=1e-5)


# ------------------------------------------------------------------------------------------- flat partitions
def flat_layout_pieces(numels: list[int], world: int) -> tuple[int, list[tuple[list[int], list[int], list[int]]]]:
    """ZeRO-1/2 style: concatenate, pad to a multiple of `world`, cut into equal slices; per rank the pieces."""
    total = sum(numels)
    size = -(-total // world)
    offsets = [sum(numels[:i]) for i in range(len(numels))]
    per_rank = []
    for rank in range(world):
        lo, hi = rank * size, (rank + 1) * size
        starts, sizes, slots = [], [], []
        for slot, (off, n) in enumerate(zip(offsets, numels)):
            left, right = max(off, lo), min(off + n, hi)
            if left < right:
                starts.append(left - lo)
                sizes.append(right - left)
                slots.append(slot)
        per_rank.append((starts, sizes, slots))
    return size, per_rank


class ThreadSum:
    """Sum over `world` threads, each standing in for a rank (a real all-reduce runs in the launcher test)."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=60)   # a rank that skips the all-reduce breaks it
        self.parts: list[torch.Tensor | None] = [None] * world

    def for_rank(self, rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.parts[rank] = t.clone()
            self.barrier.wait()
            total = torch.stack(self.parts).sum(0)
            self.barrier.wait()
            return total
        return reduce


def run_partitioned(tensors: list[torch.Tensor], grad_steps: list[list[torch.Tensor]], world: int,
                    reduce: bool = True, **hyper) -> list[torch.Tensor]:
    """Each 'rank' (a thread) steps its flat slice with a layout, as Lamb does under ZeRO-1/2."""
    numels = [t.numel() for t in tensors]
    size, per_rank = flat_layout_pieces(numels, world)
    flat = torch.zeros(size * world)
    flat[:sum(numels)] = torch.cat([t.reshape(-1) for t in tensors])
    summer = ThreadSum(world)
    slices = []
    optimizers = []
    for rank, (starts, sizes, slots) in enumerate(per_rank):
        part = torch.nn.Parameter(flat[rank * size:(rank + 1) * size].clone())
        opt = Lamb([part], **hyper)
        layout = ShardLayout(len(tensors), tuple(starts), tuple(sizes), tuple(slots),
                             summer.for_rank(rank) if reduce else None)
        opt.set_shard_layouts({part: layout})
        slices.append(part)
        optimizers.append(opt)

    errors: list[BaseException] = []

    def rank_loop(rank: int) -> None:
        try:
            for grads in grad_steps:
                flat_grad = torch.zeros(size * world)
                flat_grad[:sum(numels)] = torch.cat([g.reshape(-1) for g in grads])
                slices[rank].grad = flat_grad[rank * size:(rank + 1) * size].clone()
                optimizers[rank].step()
        except BaseException as err:  # re-raised below: a thread's exception would otherwise be lost
            errors.append(err)
            summer.barrier.abort()

    threads = [threading.Thread(target=rank_loop, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    full = torch.cat([s.detach() for s in slices])
    out, offset = [], 0
    for t in tensors:
        out.append(full[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()
    stats = [opt.trust_ratio_stats for opt in optimizers]
    assert not reduce or all(s == stats[0] for s in stats)  # the same all-reduced ratios on every rank
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_flat_partitions_with_layout_match_per_tensor_reference(world):
    tensors = make_tensors()
    grads = make_grads(15, tensors)
    hyper = dict(HYPER, max_coeff=2.0)
    ref, _ = naive_lamb(tensors, grads, **hyper)
    assert_close_to(run_partitioned(tensors, grads, world, **hyper), ref)


def test_rank_holding_only_padding_still_joins_the_all_reduce():
    """5 elements over 4 ranks (slices of 2): the last rank holds padding only, yet must take part (else hang)."""
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(2, generator=g), torch.randn(3, generator=g)]
    grads = make_grads(5, tensors)
    ref, _ = naive_lamb(tensors, grads, **HYPER)
    assert_close_to(run_partitioned(tensors, grads, 4, **HYPER), ref)


def test_flat_partitions_without_all_reduce_are_wrong():
    """The check above is sensitive: per-piece norms (no all-reduce) give visibly different weights."""
    tensors = make_tensors()
    grads = make_grads(15, tensors)
    hyper = dict(HYPER, max_coeff=2.0)
    ref, _ = naive_lamb(tensors, grads, **hyper)
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close_to(run_partitioned(tensors, grads, 2, reduce=False, **hyper), ref)


def test_flat_partition_without_layout_is_refused():
    """A ZeRO wrapper swaps in flat partitions; unbound, Lamb must not silently compute per-partition ratios."""
    model = torch.nn.Linear(4, 3)
    opt = Lamb(model.parameters(), **HYPER)
    flat = torch.nn.Parameter(torch.randn(15))
    opt.param_groups[0]["params"] = [flat]
    flat.grad = torch.zeros(15)
    before = flat.detach().clone()
    opt.step()  # DeepSpeed's state-initialization call (all-zero grads): state, no update
    assert torch.equal(flat.detach(), before) and opt.state[flat]["step"] == 0
    flat.grad = torch.randn(15)
    with pytest.raises(RuntimeError, match="bind_lamb_to_engine"):
        opt.step()


def test_state_dict_roundtrip_continues_identically():
    tensors = make_tensors()
    grads = make_grads(10, tensors)
    straight, _ = run_lamb(tensors, grads, **HYPER)

    params = [torch.nn.Parameter(t.clone()) for t in tensors]
    opt = Lamb(params, **HYPER)
    for step_grads in grads[:5]:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(saved["state"][0])
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = Lamb(params2, **HYPER)
    opt2.load_state_dict(saved)
    for step_grads in grads[5:]:
        for p, g in zip(params2, step_grads):
            p.grad = g.clone()
        opt2.step()
    for a, b in zip(params2, straight):
        assert torch.equal(a.detach(), b)


def test_load_state_dict_keeps_the_binding():
    """torch's load_state_dict goes through __setstate__; a resumed ZeRO run must keep its layouts (it once lost
    them and silently fell back to per-slice ratios)."""
    flat = torch.nn.Parameter(torch.randn(10))
    opt = Lamb([flat], **HYPER)
    layout = ShardLayout(2, (0, 4), (4, 6), (0, 1))
    opt.set_shard_layouts({flat: layout})
    flat.grad = torch.randn(10)
    opt.step()
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt.is_bound and opt.shard_layouts == {flat: layout}
    clone = copy.deepcopy(opt)   # a copy starts unbound, like a fresh optimizer
    assert not clone.is_bound and clone.shard_layouts == {}


# ---------------------------------------------------------------------------------------------------- config
def test_optimizer_block_selects_lamb_case_insensitively():
    assert LambConfig.from_optimizer_block(None) is None
    assert LambConfig.from_optimizer_block({"type": "AdamW", "params": {"lr": 1}}) is None
    cfg = LambConfig.from_optimizer_block({"type": "LAMB"})
    assert cfg == LambConfig()   # FusedLamb's defaults
    assert (cfg.lr, cfg.eps, cfg.max_coeff, cfg.min_coeff, cfg.bias_correction) == (1e-3, 1e-8, 10.0, 0.01, True)
    cfg = LambConfig.from_optimizer_block({"type": "lamb", "params": {"exclude_from_weight_decay": ["bias"]}})
    assert cfg.exclude_from_trust_ratio == ("bias",)
    cfg = LambConfig.from_optimizer_block({"type": "Lamb", "params": {"exclude_from_weight_decay": ["bias"],
                                                                       "exclude_from_trust_ratio": []}})
    assert cfg.exclude_from_trust_ratio == ()


@pytest.mark.parametrize("params, match", [
    ({"lr": -1.0}, "optimizer.params.lr"),
    ({"lr": "big"}, "optimizer.params.lr"),
    ({"betas": [0.9]}, "optimizer.params.betas"),
    ({"betas": [0.9, 1.0]}, "optimizer.params.betas"),
    ({"eps": -1e-8}, "optimizer.params.eps"),
    ({"weight_decay": -0.1}, "optimizer.params.weight_decay"),
    ({"max_coeff": 0.0}, "optimizer.params.max_coeff"),
    ({"min_coeff": 1.0, "max_coeff": 0.5}, "optimizer.params.min_coeff"),
    ({"bias_correction": "no"}, "optimizer.params.bias_correction"),
    ({"max_grad_norm": 1.0}, "gradient_clipping"),
    ({"amsgrad": True}, "amsgrad"),
    ({"exclude_from_weight_decay": "bias"}, "optimizer.params.exclude_from_weight_decay"),
    ({"exclude_from_trust_ratio": ["("]}, "optimizer.params.exclude_from_trust_ratio"),
])
def test_bad_params_name_the_key(params, match):
    with pytest.raises(ConfigError, match=match):
        LambConfig.from_optimizer_block({"type": "Lamb", "params": params})


def test_build_lamb_adjusts_zero_config_and_rejects_unsupported():
    model = torch.nn.Linear(4, 2)
    cfg = LambConfig()
    plain: dict = {"zero_optimization": {"stage": 0}}
    build_lamb(cfg, model, plain)
    assert plain == {"zero_optimization": {"stage": 0}}
    for stage in (1, 2, 3):
        ds = {"zero_optimization": {"stage": stage}}
        build_lamb(cfg, model, ds)
        assert ds["zero_allow_untested_optimizer"] is True
    ds = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    build_lamb(cfg, model, ds)
    assert ds["zero_force_ds_cpu_optimizer"] is False
    with pytest.raises(ConfigError, match="nvme"):
        build_lamb(cfg, model, {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}})
    with pytest.raises(ConfigError, match="ratio"):
        build_lamb(cfg, model, {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu",
                                                                                         "ratio": 0.5}}})
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        build_lamb(cfg, model, {"zero_optimization": {"stage": 4}})


def test_param_groups_exclude_bert_biases_and_layer_norms():
    model = build_model("bert-tiny", vocab_size=128)
    cfg = LambConfig.from_optimizer_block({"type": "Lamb", "params": {"weight_decay": 0.01,
                                                                       "exclude_from_weight_decay": ["bias", "norm"]}})
    opt = build_lamb(cfg, model, {})
    names = {id(p): n for n, p in model.named_parameters()}
    decay, plain = opt.param_groups
    assert decay["weight_decay"] == 0.01 and decay["trust_ratio"] is True
    assert plain["weight_decay"] == 0.0 and plain["trust_ratio"] is False
    decay_names = {names[id(p)] for p in decay["params"]}
    plain_names = {names[id(p)] for p in plain["params"]}
    assert "encoder.layers.0.qkv.weight" in decay_names and "embeddings.word.weight" in decay_names
    assert {"encoder.layers.0.attn_norm.weight", "encoder.layers.1.ffn_out.bias", "mlm.bias",
            "embeddings.norm.weight", "encoder.final_norm.bias"} <= plain_names
    assert all("norm" not in n and "bias" not in n for n in decay_names)
    assert len(decay_names) + len(plain_names) == len(list(model.parameters()))   # tied decoder counted once


def test_pld_lamb_recipe():
    from ds_pld.config import parse_config

    path = ROOT / "ds_configs" / "pld_lamb.json"
    parsed = parse_config(path)
    raw = json.loads(Path(path).read_text())
    assert raw["train_batch_size"] == 65536 and raw["bf16"]["enabled"] and raw["gradient_clipping"] == 1.0
    assert raw["zero_optimization"]["stage"] == 1
    assert parsed.pld.enabled and parsed.pld.theta == 0.5 and parsed.pld.gamma == 0.001
    assert parsed.model.num_layers == 12 and parsed.model.hidden_size == 768
    cfg = LambConfig.from_optimizer_block(parsed.deepspeed["optimizer"])
    assert (cfg.lr, cfg.weight_decay, cfg.bias_correction, cfg.max_coeff, cfg.min_coeff, cfg.betas, cfg.eps) == (
        11e-3, 0.01, False, 0.3, 0.01, (0.9, 0.999), 1e-6)
    ds = dict(parsed.deepspeed)
    opt = build_lamb(cfg, build_model("bert-tiny", vocab_size=128), ds)
    assert ds["zero_allow_untested_optimizer"] is True and len(opt.param_groups) == 2


# --------------------------------------------------------------------------------- through ds_pld.initialize
def tiny_engine_config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
            "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
            "optimizer": {"type": "Lamb", "params": {"lr": 1e-3, "weight_decay": 0.01, "max_coeff": 0.3,
                                                     "exclude_from_weight_decay": ["bias", "norm"]}}}


@pytest.mark.parametrize("stage", [0, 2])
def test_initialize_with_lamb_block_trains_on_cpu(single_rank_world, stage):
    torch.manual_seed(0)
    model = build_model("bert-tiny", vocab_size=128, hidden_dropout=0.0, attention_dropout=0.0)
    before = model.encoder.layers[0].qkv.weight.detach().clone()
    engine, optimizer, *_ = ds_pld.initialize(model=model, config=tiny_engine_config(stage))
    lamb = find_lamb(engine)
    assert isinstance(lamb, Lamb) and lamb.is_bound
    assert bind_lamb_to_engine(engine) is lamb   # idempotent
    assert (type(engine.optimizer).__name__ == "DeepSpeedZeroOptimizer") == (stage == 2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(3):
        ids = torch.randint(1, 128, (4, 16), generator=g)
        out = engine(ids, labels=ids)
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses)
    stats = lamb.trust_ratio_stats
    assert 0.01 - 1e-6 <= stats["min"] <= stats["median"] <= stats["max"] <= 0.3 + 1e-6   # the clamps, in fp32
    after = engine.module.encoder.layers[0].qkv.weight.detach().float()
    assert not torch.equal(after, before)


# ---------------------------------------------------------------------------------------- real ranks (gloo)
@pytest.fixture(scope="module")
def zero_report(tmp_path_factory) -> dict:
    """One launcher start (~1 min on 2 CPU cores) runs every stage, bf16 variant and checkpoint check."""
    out = tmp_path_factory.mktemp("lamb") / "report.json"
    run_deepspeed([str(SCRIPTS / "lamb_zero_check.py"), "--out", str(out), "--steps", "20"])
    return json.loads(out.read_text())


def result_of(zero_report: dict, kind: str, run: str) -> dict:
    """One run's result; skipped where ds_pld refuses the set-up on the installed DeepSpeed (ds_pld.compat)."""
    result = zero_report[kind][run]
    if "refused" in result:
        pytest.skip(f"ds_pld refuses {run} here: {result['refused']}")
    return result


SHARDED_FP32 = ["zero1", "zero2", "zero3", "zero2_offload_cpu", "zero3_offload_cpu"]
BF16 = ["zero0_bf16", "zero1_bf16", "zero2_bf16", "zero3_bf16", "zero1_bf16_fp32_accum"]


@pytest.mark.slow
@pytest.mark.parametrize("run", ["zero0_whole_batch"] + SHARDED_FP32)
def test_two_rank_zero_matches_one_rank_reference(zero_report, run):
    """2 ranks, half the global batch each, 20 steps == one rank on the whole batch, every weight to 1e-5."""
    result = result_of(zero_report, "runs", run)
    assert zero_report["world_size"] == 2
    assert result["max_rel_err"] < 1e-5, result["rel_err"]
    assert result["layout_norm_err"] < 1e-9
    assert result["stats_same_on_ranks"]
    reference_stats = zero_report["runs"]["zero0_whole_batch"]["trust_ratio_stats"]
    for key in ("min", "median", "max"):
        assert result["trust_ratio_stats"][key] == pytest.approx(reference_stats[key], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("run", SHARDED_FP32 + BF16[1:])
def test_one_norm_all_reduce_per_step(zero_report, run):
    """DeepSpeed steps one param group at a time; only the trust-ratio group all-reduces, once, a tiny vector."""
    assert result_of(zero_report, "runs", run)["all_reduces_per_step"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("run", BF16)
def test_bf16_runs_close_to_fp32(zero_report, run):
    result = result_of(zero_report, "runs", run)
    assert result["loss_finite"]
    assert result["max_rel_err"] < 5e-2, result["rel_err"]
    assert result["layout_norm_err"] < 1e-9
    assert result["stats_same_on_ranks"]


@pytest.mark.slow
@pytest.mark.parametrize("run", ["zero0", "zero1", "zero2", "zero3", "zero1_bf16_fp32_accum"])
def test_checkpoint_resume_keeps_optimizer_state(zero_report, run):
    result = result_of(zero_report, "checkpoint", run)
    assert result["state_equal"]            # exp_avg, exp_avg_sq, step equal after reload
    assert all(step == 10 for step in result["step_after_load"])
    assert result["max_rel_err"] == 0.0     # continuing == the uninterrupted run
