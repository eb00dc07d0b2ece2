"""Run each Linear layer through whichever CPU matmul path is fastest on this machine.

Decoding multiplies a handful of rows (one per suggestion) by large weight matrices, which
is bound by reading the weights. PyTorch's default bf16 path and oneDNN's path with the
weight pre-packed ("reordered") for the CPU differ a lot by matrix shape and CPU: on one
AVX-512 EPYC here, Gemma's 262144x640 output layer took 23 ms by default and 13 ms packed,
while some smaller shapes were faster by default. So we time both on the real shapes once
at load (well under a second) and keep the faster, after checking it gives the same numbers,
within a memory budget (a packed weight is a second copy).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
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


# A packed weight is a second copy. Where the dense weight is mapped from the safetensors
# file (every cached model), release_pages hands its pages back, so packing costs little
# resident memory: on Gemma 3 270M, packing every layer (511 MiB) instead of the output layer
# and the attention ones (376 MiB) took a decode step from ~42 to ~34 ms (batch 3) at the same
# 1157 MB RSS. The budget still bounds a model held in anonymous memory (a hub download).
DEFAULT_BUDGET_MB = 600


_MADV_RANDOM, _MADV_PAGEOUT = 1, 21  # Linux <sys/mman.h>


def release_pages(tensor: torch.Tensor) -> bool:
    """Ask the kernel to take this tensor's memory out of the process's resident set, losing nothing.

    After packing, the dense weight of Gemma's output layer is read only to look up the
    embeddings of a few tokens (it is tied to the input embedding). It lies in the safetensors
    file that transformers maps into memory, so its 320 MB need not stay resident:
    MADV_PAGEOUT drops clean file pages (they are read back from the file when touched) and
    never discards data, and MADV_RANDOM stops a lookup from reading ahead. Linux only;
    returns whether the kernel took the hint.
    """
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or tensor.numel() == 0:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return False
    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page  # whole pages inside the tensor only
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if end <= start:
        return False
    libc.madvise(start, end - start, _MADV_RANDOM)
    return libc.madvise(start, end - start, _MADV_PAGEOUT) == 0


@torch.inference_mode()
def pack_fastest(model: nn.Module, rows: int = 3, min_gain: float = 1.15, budget_mb: float | None = None) -> dict:
    """Swap Linear layers for PackedLinear where that is at least ``min_gain`` times faster.

    Packing costs memory, so within ``budget_mb`` of extra memory the shapes that save the
    most time in all go first. Returns {shape: (default_ms, packed_ms, used_packed)}.
    """
    if budget_mb is None:
        budget_mb = float(os.environ.get("TABWRITE_PACK_BUDGET_MB", DEFAULT_BUDGET_MB))
    report: dict = {}
    if not _packed_available():
        return report
    layers: dict[tuple, list[tuple[nn.Module, str, nn.Linear]]] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.device.type == "cpu":
                key = (child.out_features, child.in_features, child.weight.dtype)
                layers.setdefault(key, []).append((parent, name, child))
    candidates = []
    for key, group in layers.items():
        child = group[0][2]
        try:
            candidate = PackedLinear(child, torch.ops.mkldnn._reorder_linear_weight(child.weight.detach(), rows))
        except RuntimeError:
            continue
        x = torch.randn(rows, child.in_features, dtype=child.weight.dtype)
        same = torch.allclose(candidate(x).float(), child(x).float(), rtol=2e-2, atol=2e-2)
        repeats = 5 if child.out_features * child.in_features > 10_000_000 else 40
        default_s = _time(lambda: child(x), repeats)
        packed_s = _time(lambda: candidate(x), repeats)
        del candidate
        name = f"{key[0]}x{key[1]}"
        report[name] = (round(default_s * 1e3, 3), round(packed_s * 1e3, 3), False)
        if same and default_s >= packed_s * min_gain:
            saving = (default_s - packed_s) * len(group)
            cost = child.weight.numel() * child.weight.element_size() * len(group)
            candidates.append((saving, cost, name, group))
    spent = 0.0
    for _, cost, name, group in sorted(candidates, key=lambda c: c[0], reverse=True):
        if spent + cost > budget_mb * 2**20:
            continue
        spent += cost
        for parent, attr, child in group:
            packed = torch.ops.mkldnn._reorder_linear_weight(child.weight.detach(), rows)
            setattr(parent, attr, PackedLinear(child, packed))
            # The dense copy is now only read for embedding lookups (when tied), if at all.
            release_pages(child.weight.detach())
        report[name] = report[name][:2] + (True,)
    return report
