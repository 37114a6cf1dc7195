"""Training throughput and MFU of BERT pretraining steps on one GPU: our pre-LN model with the Triton kernels and
with the torch ops, and Hugging Face `BertForMaskedLM` (SDPA attention), each with and without PLD (theta 0.5).

Plain torch (AdamW, no DeepSpeed), one batch of random tokens with a fixed number of masked positions per sequence,
warm-up steps and then timed steps (one ds_pld.timing.StepTimer over them all: the GPU is synchronized before each
clock reading, not between steps). MFU counts the model FLOPs of what actually ran: 3 x forward matmul FLOPs (QKV,
attention scores and values, output projection, FFN) of the layers that ran, plus the MLM head over the masked
positions only, divided by the GPU's dense bf16 peak (`--peak-tflops`). The same count is used for Hugging Face BERT,
which computes its head over every position: its extra head work is overhead, not model FLOPs. Hugging Face BERT has
no layer dropping; its PLD rows run the same kept layers (sampled from the same seeds) without the 1/p_l scaling, as a
throughput reference only. `vs matmul` relates the achieved FLOP rate to an N x N x N bf16 matmul measured in the same
run.

    python benchmarks/gpu_throughput.py                  # bert-base, seq 128, bf16
    python benchmarks/gpu_throughput.py --compile        # also try torch.compile
    TRITON_INTERPRET=1 python benchmarks/gpu_throughput.py --cpu-smoke   # bert-tiny on the CPU: checks it runs
"""
from __future__ import annotations

import argparse
import gc
import platform
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# Run as a script from a checkout: make the repository's ds_pld importable without installing it.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from ds_pld.models import build_bert_config, build_model
from ds_pld.models.bert import IGNORE_INDEX
from ds_pld.pld import sample_keep_mask
from ds_pld.timing import StepTimer

H100_SXM_BF16_DENSE_TFLOPS = 989.0
NO_CUDA_EXIT_CODE = 2


@dataclass(frozen=True)
class Setup:
    """What every row of the table shares."""

    device: torch.device
    preset: str
    vocab_size: int
    batch_size: int
    seq_len: int
    masked_per_sequence: int
    precision: str
    warmup: int
    steps: int
    pld_theta: float
    compile: bool


@dataclass(frozen=True)
class RowResult:
    model: str
    pld: bool
    seqs_per_s: float = 0.0
    tflops: float = 0.0
    mean_layers: float = 0.0
    error: str | None = None
    skipped: str | None = None


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bert-base")
    parser.add_argument("--vocab-size", type=int, default=None, help="default: the preset's (30522)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--mask-fraction", type=float, default=0.15, help="masked positions per sequence")
    parser.add_argument("--precision", choices=("bf16", "autocast"), default="bf16",
                        help="bf16: bf16 weights and activations (as DeepSpeed's bf16 mode runs the module); "
                             "autocast: fp32 weights under torch.autocast(bfloat16)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pld-theta", type=float, default=0.5)
    parser.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_DENSE_TFLOPS,
                        help="dense bf16 peak of the GPU in TFLOP/s (default: H100 SXM)")
    parser.add_argument("--matmul-size", type=int, default=8192, help="N of the N^3 bf16 reference matmul")
    parser.add_argument("--compile", action="store_true", help="wrap each model in torch.compile")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="bert-tiny, a few steps on the CPU: checks the script runs (numbers mean nothing); "
                             "the triton rows run only with TRITON_INTERPRET=1")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.preset, args.vocab_size, args.batch_size, args.seq_len = "bert-tiny", 512, 2, 16
        args.warmup, args.steps, args.matmul_size = 1, 1, 128
    return args


def train_step_flops(preset: str, vocab: int, batch_size: int, seq_len: int, layers_run: int,
                     masked_tokens: int) -> float:
    """Model FLOPs of one training step: 3 x the forward matmul FLOPs (backward = 2 x forward)."""
    config = build_bert_config(preset)
    hidden, intermediate = config.hidden_size, config.intermediate_size
    tokens = batch_size * seq_len
    projections = 2 * tokens * (4 * hidden * hidden + 2 * hidden * intermediate)  # QKV + output, FFN in + out
    attention = 2 * 2 * batch_size * seq_len * seq_len * hidden  # Q K^T and P V over all heads
    head = 2 * masked_tokens * (hidden * hidden + hidden * vocab)  # transform + tied decoder
    return 3.0 * (layers_run * (projections + attention) + head)


def make_batch(setup: Setup) -> Batch:
    """Random tokens; `masked_per_sequence` random positions per sequence carry labels (a constant count keeps the
    head's shape fixed from step to step)."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, setup.vocab_size, (setup.batch_size, setup.seq_len), generator=generator)
    scores = torch.rand(setup.batch_size, setup.seq_len, generator=generator)
    masked = scores.argsort(dim=1)[:, :setup.masked_per_sequence]
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels.scatter_(1, masked, input_ids.gather(1, masked))
    return Batch(input_ids.to(setup.device), labels.to(setup.device))


def build_hf_model(preset: str, vocab_size: int) -> nn.Module:
    """transformers.BertForMaskedLM of the preset's shape, from a config (no download), SDPA attention."""
    from transformers import BertConfig as HFBertConfig
    from transformers import BertForMaskedLM

    ours = build_bert_config(preset, vocab_size=vocab_size)
    config = HFBertConfig(vocab_size=ours.vocab_size, hidden_size=ours.hidden_size,
                          num_hidden_layers=ours.num_layers, num_attention_heads=ours.num_heads,
                          intermediate_size=ours.intermediate_size, hidden_dropout_prob=ours.hidden_dropout,
                          attention_probs_dropout_prob=ours.attention_dropout,
                          max_position_embeddings=ours.max_position_embeddings, layer_norm_eps=ours.layer_norm_eps,
                          attn_implementation="sdpa")
    return BertForMaskedLM(config)


@contextmanager
def only_layers(encoder: nn.Module, keep: list[bool]) -> Iterator[None]:
    """Run Hugging Face's encoder over the kept layers only (its forward iterates `encoder.layer`)."""
    full = encoder.layer
    encoder.layer = nn.ModuleList(layer for layer, kept in zip(full, keep) if kept)
    try:
        yield
    finally:
        encoder.layer = full


def step_function(name: str, model: nn.Module, compiled: nn.Module, batch: Batch, setup: Setup,
                  pld: bool) -> Callable[[int], int]:
    """A closure running forward + backward for step `step`; returns how many layers ran."""
    if name.startswith("ours"):
        def run(step: int) -> int:
            out = compiled(batch.input_ids, labels=batch.labels, progressive_layer_drop=pld,
                           pld_theta=setup.pld_theta, pld_seed=step)
            out.loss.backward()
            return out.layers_run
        return run

    num_layers = len(model.bert.encoder.layer)

    def run_hf(step: int) -> int:
        keep = sample_keep_mask(setup.pld_theta, num_layers, step) if pld else [True] * num_layers
        with only_layers(model.bert.encoder, keep) if pld else nullcontext():
            compiled(input_ids=batch.input_ids, labels=batch.labels).loss.backward()
        return sum(keep)
    return run_hf


def build(name: str, setup: Setup) -> nn.Module:
    torch.manual_seed(0)
    if name == "ours, triton kernels":
        return build_model(setup.preset, kernels="triton", vocab_size=setup.vocab_size)
    if name == "ours, torch ops":
        return build_model(setup.preset, kernels="torch", vocab_size=setup.vocab_size)
    return build_hf_model(setup.preset, setup.vocab_size)


def run_row(name: str, pld: bool, setup: Setup) -> RowResult:
    model = build(name, setup).to(setup.device)
    if setup.precision == "bf16":
        model = model.to(torch.bfloat16)
    model.train()
    fused = setup.device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, foreach=not fused)
    batch = make_batch(setup)
    compiled = torch.compile(model) if setup.compile else model
    step = step_function(name, model, compiled, batch, setup, pld)
    autocast = (torch.autocast(setup.device.type, dtype=torch.bfloat16) if setup.precision == "autocast"
                else nullcontext())

    def train_step(index: int) -> int:
        with autocast:
            layers = step(index)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return layers

    for index in range(setup.warmup):
        train_step(index)
    with StepTimer(setup.device) as timer:
        layers_run = [train_step(setup.warmup + index) for index in range(setup.steps)]
    masked_tokens = setup.batch_size * setup.masked_per_sequence
    flops = sum(train_step_flops(setup.preset, setup.vocab_size, setup.batch_size, setup.seq_len, layers,
                                 masked_tokens) for layers in layers_run)
    return RowResult(name, pld, seqs_per_s=setup.batch_size * setup.steps / timer.seconds,
                     tflops=flops / timer.seconds / 1e12, mean_layers=sum(layers_run) / len(layers_run))


def matmul_tflops(device: torch.device, size: int, repeats: int = 10) -> float:
    """Achieved TFLOP/s of a size^3 bf16 matmul: the practical ceiling on this GPU, measured in this run."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    with StepTimer(device) as timer:
        for _ in range(repeats):
            a @ b
    return 2 * size**3 * repeats / timer.seconds / 1e12


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_table(setup: Setup, results: list[RowResult], matmul: float, matmul_size: int, peak_tflops: float) -> str:
    on_gpu = setup.device.type == "cuda"
    lines = [
        f"Device: {device_name(setup.device)}; torch {torch.__version__}",
        (f"{setup.preset} (vocab {setup.vocab_size}), batch {setup.batch_size} x seq {setup.seq_len}, "
         f"{setup.masked_per_sequence} masked positions/seq, precision {setup.precision}, {setup.warmup} warm-up + "
         f"{setup.steps} timed steps{', torch.compile' if setup.compile else ''}; PLD theta {setup.pld_theta}; "
         f"{matmul_size}^3 bf16 matmul: {matmul:.3g} TFLOP/s; peak {peak_tflops:.0f} TFLOP/s"),
        "",
        "| model | PLD | layers run (mean) | sequences/s | model TFLOP/s | MFU | vs matmul |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results:
        pld = f"theta {setup.pld_theta}" if row.pld else "off"
        if row.error is not None or row.skipped is not None:
            why = f"failed: {row.error}" if row.error is not None else f"skipped: {row.skipped}"
            lines.append(f"| {row.model} | {pld} | {why} | | | | |")
            continue
        mfu = f"{100 * row.tflops / peak_tflops:.1f}%" if on_gpu else "n/a (CPU)"
        lines.append(f"| {row.model} | {pld} | {row.mean_layers:.2f} | {row.seqs_per_s:.1f} | {row.tflops:.3g} | "
                     f"{mfu} | {100 * row.tflops / matmul:.1f}% |")
    return "\n".join(lines)


def triton_usable(device: torch.device) -> str | None:
    """None when the triton rows can run here, else why not."""
    try:
        from ds_pld.kernels.triton_bias_ops import _bias_gelu_forward_kernel
        from ds_pld.kernels.triton_launch import interpreted
    except ImportError as err:
        return f"triton not importable ({err})"
    if device.type != "cuda" and not interpreted(_bias_gelu_forward_kernel):
        return "needs CUDA or TRITON_INTERPRET=1"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("gpu_throughput: no CUDA device found. This benchmark measures GPU throughput and needs one GPU; "
              "use --cpu-smoke for a quick CPU check that the script runs.", file=sys.stderr)
        return NO_CUDA_EXIT_CODE
    else:
        device = torch.device("cuda")
    vocab_size = args.vocab_size or build_bert_config(args.preset).vocab_size
    setup = Setup(device=device, preset=args.preset, vocab_size=vocab_size, batch_size=args.batch_size,
                  seq_len=args.seq_len, masked_per_sequence=max(1, round(args.mask_fraction * args.seq_len)),
                  precision=args.precision,
                  warmup=args.warmup, steps=args.steps, pld_theta=args.pld_theta, compile=args.compile)
    matmul = matmul_tflops(device, args.matmul_size)
    release_memory(device)
    no_triton = triton_usable(device)
    results: list[RowResult] = []
    for name in ("ours, triton kernels", "ours, torch ops", "HF BertForMaskedLM (sdpa)"):
        for pld in (False, True):
            if name == "ours, triton kernels" and no_triton is not None:
                results.append(RowResult(name, pld, skipped=no_triton))
                continue
            try:
                results.append(run_row(name, pld, setup))
            except Exception as err:  # noqa: BLE001 - one failing row (e.g. under --compile) must not hide the others
                results.append(RowResult(name, pld, error=f"{type(err).__name__}: {str(err)[:200]}"))
            release_memory(device)
    print(format_table(setup, results, matmul, args.matmul_size, args.peak_tflops))
    return 1 if any(row.error is not None for row in results) else 0


if __name__ == "__main__":
    sys.exit(main())
