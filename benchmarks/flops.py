"""Forward matmul FLOPs of one transformer layer, the yardstick the speed benchmarks print their ideals with.

Per sequence of n tokens: QKV 2*h*3w*n, output projection 2*w*h*n, FFN 2*2*h*i*n, and attention's scores and
context 2*2*n*n*w (w = heads x head size). Training costs about 3x the forward for every part, so ratios hold. The
n*n term is why attention's share of a layer grows with the sequence, and why dropping tokens saves more than
their fraction at long sequences.
"""
from __future__ import annotations


def layer_flops(hidden: int, width: int, intermediate: int, tokens: int) -> float:
    """Forward matmul FLOPs of one layer (attention width `width`, FFN `intermediate`) on one sequence of
    `tokens` tokens."""
    linear = 2 * hidden * 3 * width + 2 * width * hidden + 2 * 2 * hidden * intermediate
    return tokens * linear + 2 * 2 * tokens * tokens * width


def attention_share(hidden: int, width: int, intermediate: int, tokens: int) -> float:
    """The share of a layer's matmul FLOPs spent in the scores and context products."""
    return 2 * 2 * tokens * tokens * width / layer_flops(hidden, width, intermediate, tokens)
