"""Run each Linear layer through whichever CPU matmul path is fastest on this machine.

Decoding multiplies a handful of rows (one per suggestion) by large weight matrices, which
is bound by reading the weights. PyTorch's default bf16 path and oneDNN's path with the
weight pre-packed ("reordered") for the CPU differ a lot by matrix shape and CPU: on one
AVX-512 EPYC here, Gemma's 262144x640 output layer took 23 ms by default and 13 ms packed,
while some smaller shapes were faster by default. So we time both on the real shapes once
at load (well under a second) and keep the faster, after checking it gives the same numbers.
"""

from __future__ import annotations

import time

import torch
from torch import nn


def _packed_available() -> bool:
    return hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()


class PackedLinear(nn.Module):
    """A Linear whose weight is pre-packed for oneDNN (same maths, CPU only, inference only)."""

    def __init__(self, linear: nn.Linear, packed: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = packed
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def _time(fn, repeats: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


@torch.inference_mode()
def pack_fastest(model: nn.Module, rows: int = 3, min_gain: float = 1.15) -> dict:
    """Swap Linear layers for PackedLinear where that is at least ``min_gain`` times faster.

    Returns {shape: (default_ms, packed_ms, used_packed)} for what was measured.
    """
    report: dict = {}
    if not _packed_available():
        return report
    decisions: dict[tuple[int, int, torch.dtype], bool] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child.weight.device.type != "cpu":
                continue
            key = (child.out_features, child.in_features, child.weight.dtype)
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(child.weight.detach(), rows)
            except RuntimeError:
                decisions[key] = False
                continue
            if key not in decisions:
                x = torch.randn(rows, child.in_features, dtype=child.weight.dtype)
                candidate = PackedLinear(child, packed)
                same = torch.allclose(candidate(x).float(), child(x).float(), rtol=2e-2, atol=2e-2)
                repeats = 5 if child.out_features * child.in_features > 10_000_000 else 40
                default_s = _time(lambda: child(x), repeats)
                packed_s = _time(lambda: candidate(x), repeats)
                decisions[key] = bool(same and default_s >= packed_s * min_gain)
                report[f"{key[0]}x{key[1]}"] = (round(default_s * 1e3, 3), round(packed_s * 1e3, 3), decisions[key])
            if decisions[key]:
                setattr(parent, name, PackedLinear(child, packed))
    return report
