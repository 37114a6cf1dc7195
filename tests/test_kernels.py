"""The Triton kernels against the torch reference (`TorchOps`), forward and backward; the GPU benchmark's smoke run.

How the kernels run without a GPU: Triton decides whether a kernel is interpreted when `@triton.jit` decorates it,
i.e. when `ds_pld.kernels.triton_ops` is first imported, not when triton itself is imported. In a shared pytest
process another test file may already have imported that module in compiled mode (building any model with
kernels='auto' does), and setting TRITON_INTERPRET=1 in-process would leak into every later test. So the kernel
cases below run where that is settled for the whole process:
  * in a child `python -m pytest` on this file with TRITON_INTERPRET=1 (started by
    `test_kernel_cases_under_triton_interpreter`; this is how they run in CI, on the CPU), or
  * in-process when the whole pytest run has TRITON_INTERPRET=1 (CPU) or, without it, on a CUDA device.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds_pld.kernels import build_ops
from ds_pld.kernels.reference import TorchOps

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CHILD_MARKER = "DS_PLD_KERNEL_CASES_CHILD"  # set in the child so it runs only the kernel cases
IN_CHILD = os.environ.get(CHILD_MARKER) == "1"
KERNEL_DEVICE = "cpu" if INTERPRETED else ("cuda" if torch.cuda.is_available() else None)

KERNEL_CASE_REASON = "needs triton and either TRITON_INTERPRET=1 or a CUDA device (runs via the subprocess test)"
kernel_case = pytest.mark.skipif(not HAS_TRITON or KERNEL_DEVICE is None, reason=KERNEL_CASE_REASON)
parent_only = pytest.mark.skipif(IN_CHILD, reason="runs in the parent pytest process only")

SHAPES = [(2, 3, 96), (5, 768), (3, 1030)]
DTYPES = [torch.float32, torch.bfloat16]
# Triton keeps bf16 inputs in fp32 until the final store, so its bf16 results must be within about one bf16
# rounding (2^-8 relative) of the fp32 reference evaluated on the same bf16-valued inputs.
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 8e-3, "atol": 8e-3}}


def triton_ops():
    from ds_pld.kernels.triton_ops import TritonOps

    return TritonOps()


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def run_with_grads(op, inputs: list[torch.Tensor], grad_out: torch.Tensor, *args) -> tuple[torch.Tensor, list]:
    """op(*inputs, *args) and d(sum(out * grad_out))/d(inputs)."""
    out = op(*inputs, *args)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in inputs]


def compare_to_reference(name: str, tensors: list[torch.Tensor], *args,
                         ref_dtype: torch.dtype = torch.float32) -> None:
    """Triton op on `tensors` (their dtype) vs TorchOps on `ref_dtype` copies: output and gradients wrt every tensor.
    float64 references suit degenerate shapes, where torch's own fp32 rounding noise (e.g. a LayerNorm over one
    column, whose exact centred value is 0) would exceed the tolerance."""
    dtype = tensors[0].dtype
    ref_inputs = leaves(*(t.to(ref_dtype) for t in tensors))
    ref_out = getattr(TorchOps(), name)(*ref_inputs, *args)
    grad_out = torch.randn_like(ref_out).to(dtype).to(ref_dtype)
    ref_out.backward(grad_out)
    out, grads = run_with_grads(getattr(triton_ops(), name), leaves(*tensors), grad_out.float(), *args)
    assert out.dtype == dtype and out.shape == ref_out.shape
    torch.testing.assert_close(out.float(), ref_out.detach().float(), **TOLERANCE[dtype])
    for index, (grad, ref_input) in enumerate(zip(grads, ref_inputs)):
        assert grad is not None and grad.dtype == tensors[index].dtype, f"grad of input {index}"
        assert grad.shape == tensors[index].shape, f"grad of input {index}"
        torch.testing.assert_close(grad.float(), ref_input.grad.float(), **TOLERANCE[dtype],
                                   msg=f"grad of input {index}")


def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, device=KERNEL_DEVICE).to(dtype)


@kernel_case
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bias_gelu_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    compare_to_reference("bias_gelu", [randn(*shape, dtype=dtype) * 2, randn(shape[-1], dtype=dtype)])


@kernel_case
@pytest.mark.parametrize("eps", [1e-12, 1e-5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer_norm_matches_reference(shape: tuple[int, ...], dtype: torch.dtype, eps: float) -> None:
    torch.manual_seed(0)
    hidden = shape[-1]
    x = randn(*shape, dtype=dtype) * 3 + 1  # a non-zero mean exercises the centring
    compare_to_reference("layer_norm", [x, 1 + randn(hidden, dtype=dtype) / 2, randn(hidden, dtype=dtype)], eps)


@kernel_case
@pytest.mark.parametrize("p, training, scale", [(0.0, True, 1.0), (0.0, True, 1.6), (0.3, False, 1.6)],
                         ids=["p0", "p0-pld-scale", "eval-pld-scale"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bias_dropout_residual_without_dropout_matches_reference(shape: tuple[int, ...], dtype: torch.dtype,
                                                                 scale: float, p: float, training: bool) -> None:
    torch.manual_seed(0)
    tensors = [randn(*shape, dtype=dtype), randn(shape[-1], dtype=dtype), randn(*shape, dtype=dtype)]
    compare_to_reference("bias_dropout_residual", tensors, p, scale, training)


@kernel_case
def test_mixed_dtypes_follow_torch_promotion_as_under_autocast() -> None:
    """Under autocast the matmul output is bf16 while bias and residual stream stay fp32: same dtypes as torch."""
    torch.manual_seed(0)
    x, bias, residual = randn(4, 96, dtype=torch.bfloat16), randn(96), randn(4, 96)
    for name, tensors, args in (("bias_gelu", [x, bias], ()),
                                ("bias_dropout_residual", [x, bias, residual], (0.0, 1.25, True))):
        ref_inputs = leaves(*tensors)
        ref_out = getattr(TorchOps(), name)(*ref_inputs, *args)
        grad_out = torch.randn_like(ref_out)
        ref_out.backward(grad_out)
        out, grads = run_with_grads(getattr(triton_ops(), name), leaves(*tensors), grad_out, *args)
        assert out.dtype == ref_out.dtype == torch.float32
        torch.testing.assert_close(out, ref_out.detach(), rtol=1e-5, atol=1e-5)
        for grad, ref_input in zip(grads, ref_inputs):
            assert grad.dtype == ref_input.grad.dtype
            torch.testing.assert_close(grad, ref_input.grad, **TOLERANCE[grad.dtype])


@kernel_case
def test_empty_batch_gives_empty_output_and_zero_parameter_grads() -> None:
    x, bias, residual, weight = leaves(randn(0, 96), randn(96), randn(0, 96), randn(96))
    ops = triton_ops()
    outputs = [ops.bias_gelu(x, bias), ops.bias_dropout_residual(x, bias, residual, 0.1, 1.0, True),
               ops.layer_norm(x, weight, bias, 1e-12)]
    assert all(out.shape == (0, 96) for out in outputs)
    sum(out.sum() for out in outputs).backward()
    assert torch.equal(bias.grad, torch.zeros_like(bias)) and torch.equal(weight.grad, torch.zeros_like(weight))


@kernel_case
def test_kernels_accumulate_over_several_row_tiles_per_program() -> None:
    """Big batches give each program several row tiles (the row programs are capped so the fp32 partial-sum buffers
    stay small); such batches are too slow for the interpreter, so launch the kernels directly with one program
    walking four 2-row tiles (the last one partial) and compare with torch."""
    from ds_pld.kernels import triton_bias_ops, triton_layer_norm

    torch.manual_seed(0)
    rows, cols, tiles, geometry = 7, 96, 4, {"BLOCK_M": 2, "BLOCK_N": 128}
    x, bias, weight, grad_out = randn(rows, cols), randn(cols), 1 + randn(cols) / 2, randn(rows, cols)
    ref_x, ref_weight, ref_bias = leaves(x, weight, bias)
    ref_out = torch.nn.functional.layer_norm(ref_x, (cols,), ref_weight, ref_bias, 1e-5)
    ref_out.backward(grad_out)
    out, grad_x = torch.empty_like(x), torch.empty_like(x)
    mean, rstd = torch.empty(rows, device=KERNEL_DEVICE), torch.empty(rows, device=KERNEL_DEVICE)
    grad_weight, grad_bias = torch.empty(1, cols, device=KERNEL_DEVICE), torch.empty(1, cols, device=KERNEL_DEVICE)
    triton_layer_norm._layer_norm_forward_kernel[(1,)](x, weight, bias, out, mean, rstd, rows, cols, 1e-5, tiles,
                                                       **geometry)
    triton_layer_norm._layer_norm_backward_kernel[(1,)](grad_out, x, weight, mean, rstd, grad_x, grad_weight,
                                                        grad_bias, rows, cols, tiles, **geometry)
    for got, want in ((out, ref_out.detach()), (grad_x, ref_x.grad), (grad_weight[0], ref_weight.grad),
                      (grad_bias[0], ref_bias.grad)):
        torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])

    ref_x, ref_bias = leaves(x, bias)
    torch.nn.functional.gelu(ref_x + ref_bias).backward(grad_out)
    triton_bias_ops._bias_gelu_backward_kernel[(1, 1)](grad_out, x, bias, grad_x, grad_bias, rows, cols, tiles,
                                                       **geometry)
    torch.testing.assert_close(grad_x, ref_x.grad, **TOLERANCE[torch.float32])
    torch.testing.assert_close(grad_bias[0], ref_bias.grad, **TOLERANCE[torch.float32])

    seed = torch.zeros(1, dtype=torch.int64, device=KERNEL_DEVICE)
    triton_bias_ops._bias_dropout_residual_backward_kernel[(1, 1)](grad_out, grad_x, grad_bias, seed, 0.0, 2.0, rows,
                                                                   cols, tiles, HAS_DROPOUT=False, **geometry)
    torch.testing.assert_close(grad_x, 2 * grad_out)
    torch.testing.assert_close(grad_bias[0], 2 * grad_out.sum(0), **TOLERANCE[torch.float32])


# Shapes the model can produce but the main cases above do not: a width of 0 (an FFN layer that EarlyBERT's global
# pruning emptied), 0 rows, 1 column, widths that are not powers of two (3, 17) and one just past a 256-column block
# of the bias kernels (257), with 1 or more rows.
ODD_SHAPES = [(8, 0), (2, 3, 0), (0, 0), (0, 5), (1, 1), (4, 1), (3, 3), (5, 17), (2, 257)]
ODD_OPS = {
    "bias_gelu": lambda shape, dtype: ([randn(*shape, dtype=dtype) * 2, randn(shape[-1], dtype=dtype)], ()),
    "layer_norm": lambda shape, dtype: ([randn(*shape, dtype=dtype) * 3 + 1, 1 + randn(shape[-1], dtype=dtype) / 2,
                                         randn(shape[-1], dtype=dtype)], (1e-5,)),
    "bias_dropout_residual": lambda shape, dtype: ([randn(*shape, dtype=dtype), randn(shape[-1], dtype=dtype),
                                                    randn(*shape, dtype=dtype)], (0.0, 1.6, True)),
}


@kernel_case
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
@pytest.mark.parametrize("name", sorted(ODD_OPS))
def test_odd_and_empty_shapes_match_reference(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Forward and backward of every op on the odd shapes: same output, input gradients and (empty or zero)
    parameter gradients as the torch reference."""
    torch.manual_seed(0)
    tensors, args = ODD_OPS[name](shape, dtype)
    compare_to_reference(name, tensors, *args, ref_dtype=torch.float64)


@kernel_case
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
def test_dropout_on_odd_and_empty_shapes(shape: tuple[int, ...]) -> None:
    """With dropout on, odd shapes keep the mask contract: the output shape is x's, the gradient is zero exactly
    where the output fell back to the residual, and the bias gradient sums the input gradient over the rows."""
    torch.manual_seed(5)
    p, scale = 0.5, 1.25
    x, bias, residual = leaves(randn(*shape), randn(shape[-1]), randn(*shape))
    out = triton_ops().bias_dropout_residual(x, bias, residual, p, scale, True)
    assert out.shape == x.shape
    grad_out = randn(*shape)
    out.backward(grad_out)
    dropped = out.detach() == residual.detach()
    assert torch.equal(x.grad == 0, dropped | (grad_out == 0))
    kept = ~dropped
    torch.testing.assert_close(out.detach()[kept], (residual + (x + bias) * (scale / (1 - p))).detach()[kept])
    torch.testing.assert_close(x.grad[kept], grad_out[kept] * (scale / (1 - p)))
    assert bias.grad.shape == bias.shape
    torch.testing.assert_close(bias.grad, x.grad.flatten(0, -2).sum(0), rtol=1e-5, atol=1e-5)
    assert torch.equal(residual.grad, grad_out)


def dropout_case(p: float, scale: float, seed: int, shape: tuple[int, int] = (64, 320)):
    """One training-mode call with a fixed torch seed: (x, bias, residual, out, grad of x, bias, residual, dy)."""
    torch.manual_seed(1234)
    x, bias, residual = leaves(randn(*shape), randn(shape[1]), randn(*shape))
    grad_out = randn(*shape)
    torch.manual_seed(seed)
    out = triton_ops().bias_dropout_residual(x, bias, residual, p, scale, True)
    out.backward(grad_out)
    return x, bias, residual, out.detach(), x.grad, bias.grad, residual.grad, grad_out


@kernel_case
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keeps_about_1_minus_p_and_scales_kept_values(p: float) -> None:
    scale = 1.25
    x, bias, residual, out, *_ = dropout_case(p, scale, seed=7)
    kept = out != residual
    assert abs(kept.float().mean().item() - (1 - p)) < 0.02
    expected = residual + (x + bias) * (scale / (1 - p))
    torch.testing.assert_close(out[kept], expected.detach()[kept], rtol=1e-5, atol=1e-5)


@kernel_case
def test_dropout_backward_regenerates_the_forward_mask() -> None:
    p, scale = 0.3, 1.5
    _, _, residual, out, grad_x, grad_bias, grad_residual, grad_out = dropout_case(p, scale, seed=7)
    dropped = out == residual
    assert 0 < dropped.sum() < dropped.numel()
    assert torch.equal(grad_x == 0, dropped), "the gradient must be zero exactly where the output was dropped"
    torch.testing.assert_close(grad_x[~dropped], grad_out[~dropped] * (scale / (1 - p)))
    torch.testing.assert_close(grad_bias, grad_x.sum(0), rtol=1e-5, atol=1e-5)
    assert torch.equal(grad_residual, grad_out)


@kernel_case
def test_dropout_mask_is_reproducible_from_the_torch_seed() -> None:
    first, again, other = (dropout_case(0.5, 1.0, seed)[3] for seed in (7, 7, 8))
    assert torch.equal(first, again)
    residual = dropout_case(0.5, 1.0, 7)[2].detach()
    assert ((first != residual) != (other != residual)).float().mean() > 0.3, "a new seed must give a new mask"


@kernel_case
def test_consecutive_calls_draw_new_masks() -> None:
    """Each call draws a fresh Philox seed from the generator, so two layers never share a mask."""
    torch.manual_seed(0)
    x, bias, residual = randn(32, 128), randn(128), randn(32, 128)
    ops = triton_ops()
    first, second = (ops.bias_dropout_residual(x, bias, residual, 0.5, 1.0, True) for _ in range(2))
    assert not torch.equal(first != residual, second != residual)


def tiny_model(kernels: str, **overrides):
    from ds_pld.models import build_model

    return build_model("bert-tiny", kernels=kernels, vocab_size=97, **overrides).to(KERNEL_DEVICE)


def loss_and_grads(model, pld_seed: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(1, 97, (2, 12), generator=generator)
    labels = torch.where(torch.rand(2, 12, generator=generator) < 0.3, input_ids, -100)
    labels[0, 0] = input_ids[0, 0]
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[1, 9:] = 0
    batch = [t.to(KERNEL_DEVICE) for t in (input_ids, attention_mask, labels)]
    out = model(batch[0], attention_mask=batch[1], labels=batch[2], progressive_layer_drop=pld_seed is not None,
                pld_theta=0.5, pld_seed=pld_seed)
    out.loss.backward()
    return out.loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@kernel_case
@pytest.mark.parametrize("pld_seed", [None, 5], ids=["no-pld", "pld"])
def test_triton_model_matches_torch_model(pld_seed: int | None) -> None:
    """bert-tiny end to end without dropout: same loss and gradients with kernels='triton' and 'torch' (with PLD the
    kept layers are scaled by 1/p_l inside the fused residual add)."""
    torch_model = tiny_model("torch", hidden_dropout=0.0, attention_dropout=0.0).train()
    triton_model = tiny_model("triton", hidden_dropout=0.0, attention_dropout=0.0).train()
    triton_model.load_state_dict(torch_model.state_dict())
    assert triton_model.encoder.layers[0].ops.name == "triton"
    ref_loss, ref_grads = loss_and_grads(torch_model, pld_seed)
    loss, grads = loss_and_grads(triton_model, pld_seed)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@kernel_case
def test_checkpointed_recomputation_reproduces_the_dropout_masks() -> None:
    """Activation checkpointing restores torch's RNG state before recomputing a layer; drawing the Philox seed from
    torch's generator therefore recomputes the same masks, and the gradients equal those of a plain run."""
    plain = tiny_model("triton", num_layers=1).train()
    checkpointed = tiny_model("triton", num_layers=1, gradient_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    torch.manual_seed(11)
    ref_loss, ref_grads = loss_and_grads(plain, None)
    torch.manual_seed(11)
    loss, grads = loss_and_grads(checkpointed, None)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-6, atol=1e-7, msg=name)


def pruned_tiny_model(kernels: str):
    """bert-tiny (dropout 0) pruned by a ticket that empties layer 0's FFN and leaves layer 1 a width of 171 (not a
    power of two), with one head less in layer 1: what EarlyBERT's global FFN pruning can draw."""
    from ds_pld.earlybert import Ticket, prune_model

    torch.manual_seed(0)
    full = tiny_model(kernels, hidden_dropout=0.0, attention_dropout=0.0, slimming=True).train()
    ticket = Ticket(heads=[[0, 1], [1]], neurons=[[], list(range(0, 512, 3))])
    return prune_model(full, ticket)


@kernel_case
def test_pruned_model_with_an_emptied_ffn_layer_trains_a_step_with_triton_kernels() -> None:
    """A width-0 FFN layer goes through the Triton bias+GELU with a [tokens, 0] input: the loss, every gradient and
    the weights after one SGD step equal those of the same pruned model on the torch ops (SGD, because Adam would
    blow rounding-level gradient differences up to a full step)."""
    triton_model, torch_model = pruned_tiny_model("triton"), pruned_tiny_model("torch")
    assert torch_model.config.layer_intermediate == triton_model.config.layer_intermediate == (0, 171)
    emptied = triton_model.encoder.layers[0]
    assert emptied.ops.name == "triton" and emptied.ffn_in.out_features == 0
    torch_model.load_state_dict(triton_model.state_dict())
    before = {name: p.detach().clone() for name, p in triton_model.named_parameters()}
    results = []
    for model in (torch_model, triton_model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        loss, grads = loss_and_grads(model, None)
        optimizer.step()
        results.append((loss, grads, dict(model.named_parameters())))
    (ref_loss, ref_grads, ref_params), (loss, grads, params) = results
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    assert grads["encoder.layers.0.ffn_in.weight"].shape == (0, 128)
    assert grads["encoder.layers.0.ffn_out.bias"].abs().sum() > 0, "the emptied FFN still adds its output bias"
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    for name, param in params.items():
        torch.testing.assert_close(param, ref_params[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(params["encoder.layers.1.ffn_in.weight"], before["encoder.layers.1.ffn_in.weight"])


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_auto_backend_runs_torch_ops_on_cpu_tensors() -> None:
    """'auto' must route CPU tensors to TorchOps: with dropout its output is torch's own dropout, bit for bit."""
    auto = build_ops("auto")
    assert (auto.name, build_ops("triton").name, build_ops("torch").name) == ("auto", "triton", "torch")
    x, bias, residual = torch.randn(16, 64), torch.randn(64), torch.randn(16, 64)
    outputs = []
    for ops in (auto, TorchOps()):
        torch.manual_seed(3)
        outputs.append(ops.bias_dropout_residual(x, bias, residual, 0.5, 1.2, True))
    assert torch.equal(*outputs)


@parent_only
@pytest.mark.skipif(not HAS_TRITON or INTERPRETED, reason="checks the compiled-mode device guard")
def test_compiled_triton_ops_reject_cpu_tensors_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="CUDA device.*TRITON_INTERPRET"):
        triton_ops().bias_gelu(torch.randn(2, 8), torch.randn(8))


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


@parent_only
@pytest.mark.skipif(not HAS_TRITON or INTERPRETED, reason="the cases already run in this process")
def test_kernel_cases_under_triton_interpreter() -> None:
    """Runs every kernel case of this file on the CPU in a child pytest with TRITON_INTERPRET=1 (see the module
    docstring for why a child process)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-rs"],
                          cwd=ROOT, env=child_env(TRITON_INTERPRET="1", **{CHILD_MARKER: "1"}),
                          capture_output=True, text=True, timeout=600, check=False)
    report = proc.stdout[-12000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, report
    assert " passed" in report, report
    assert KERNEL_CASE_REASON not in proc.stdout, f"kernel cases were skipped in the child:\n{report}"
