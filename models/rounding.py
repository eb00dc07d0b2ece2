"""int8 weights rounded to what the layer computes, not to the nearest step (GPTQ).

A decode step reads every weight once, so its cost is the bytes of the weights: int8 halves
fp16's. Rounded to nearest with one scale per output channel, int8 moved the distribution
suggestions are drawn from by 0.034 / 0.045 (total variation, held-out English / Chinese read
as a press; fp16: 0.020 / 0.025, most of it from the prompt's int8), twice what fp16 did. GPTQ
(Frantar et al., 2023) rounds one input column at a time and moves each rounding error onto
the columns not yet rounded, in proportion to how the layer's inputs co-vary (H = X^T X on a
calibration text): the output errors cancel where the inputs are correlated. The same int8
values then moved it 0.029 / 0.037.

The rounding depends on the model and the calibration text only, never the CPU, so it is made
once per model and kept beside the converted weights (models/loading.py); each machine still
decides by measurement whether int8 runs fast on it (models/tuning.py, int8-weight).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from models.kernels import Int8Weight
from models.tuning import _say, linear_groups, texts_by_language

VERSION = 1  # bump when the rounding changes: every model rounds again
CALIBRATION = Path(__file__).parent / "calibration.txt"
CALIBRATION_TOKENS = 2048  # per language part; read in pieces of PIECE tokens
PIECE = 512
DAMP = 0.01  # added to H's diagonal, as a share of its mean: H is singular where inputs are
BLOCK = 32  # columns whose errors are carried as one matmul to the rest (GPTQ's lazy batch; 128: 1.3x slower)
LEVELS = 127
CHUNK = 6  # matrices rounded together


def _shapes(model: nn.Module) -> list[list[tuple[str, nn.Linear]]]:
    """The Linear layers int8-weight may run, by weight shape as the tuning groups them
    (tuning.linear_groups; the output layer is int8-screen's business), with their names."""
    names = {id(m): n for n, m in model.named_modules()}
    return [[(names[id(layer)], layer) for _, _, layer in group.layers] for group in linear_groups(model) if not group.single]


def body_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Those layers by module name."""
    return {name: layer for shape in _shapes(model) for name, layer in shape}


def calibration_texts() -> list[str]:
    """models/calibration.txt, English and Chinese apart (written for this repo: not the probe
    text the choice is checked on, nor any benchmark's held-out text)."""
    return texts_by_language(CALIBRATION)


@torch.inference_mode()
def hessians(model: nn.Module, tokenizer, layers: dict[str, nn.Linear], texts: list[str]) -> dict[str, torch.Tensor]:
    """X^T X of each layer's inputs over ``texts`` (fp32); layers that share an input share one tensor."""
    sums: dict[str, torch.Tensor] = {}
    last: list = [None, None]  # the input seen last and whose it was: q, k and v read one tensor in turn

    def hook(name: str):
        def record(module, args):
            x = args[0]
            if x is last[0]:  # held in ``last``, so never another tensor at a reused address
                sums.setdefault(name, sums[last[1]])
                return
            last[:] = [x, name]
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            sums[name] = sums[name].addmm_(flat.T, flat) if name in sums else flat.T @ flat

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids[:, :CALIBRATION_TOKENS]
            # Pieces: the model reads each as a text of its own (sliding windows never matter).
            for start in range(0, ids.shape[1], PIECE):
                model.base_model(input_ids=ids[:, start : start + PIECE])  # the output layer is not rounded here
    finally:
        for h in handles:
            h.remove()
        last.clear()
    return sums


def gptq(weights: torch.Tensor, hessian: torch.Tensor) -> Int8Weight:
    """GPTQ-rounded symmetric int8, one scale per output channel, for weights [L, out, in] that
    share one H [L, in, in] per matrix (L matrices rounded together: the column loop's small ops
    are the cost, ~4 us each whatever the size). Returns q [L, out, in], scale [L, out]."""
    w = weights.float().clone()
    h = hessian.float().clone()
    count, _, width = w.shape
    diagonal = h.diagonal(dim1=-2, dim2=-1)
    dead = diagonal == 0  # an input that is always 0: any value rounds exactly
    diagonal.add_(dead.float())
    w.masked_fill_(dead[:, None, :], 0)
    diagonal.add_(DAMP * diagonal.mean(dim=-1, keepdim=True))
    # The upper Cholesky factor of H^-1: row i holds how column i's error spreads to later columns.
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    scale = weights.float().abs().amax(dim=-1).clamp_min(1e-12) / LEVELS  # [L, out]: round to nearest's scales
    q = torch.empty(w.shape, dtype=torch.int8)
    for start in range(0, width, BLOCK):
        end = min(start + BLOCK, width)
        block = w[:, :, start:end]
        errors = torch.empty_like(block)
        hinv = inverse[:, start:end, start:end]
        for i in range(end - start):
            column = block[:, :, i]
            rounded = (column / scale).round_().clamp_(-LEVELS, LEVELS)
            q[:, :, start + i] = rounded.to(torch.int8)
            error = (column - rounded * scale) / hinv[:, i, i][:, None]
            block[:, :, i:] -= error[:, :, None] * hinv[:, i, None, i:]
            errors[:, :, i] = error
        if end < width:
            w[:, :, end:] -= errors @ inverse[:, start:end, end:]
    return Int8Weight(q, scale)


def round_model(model: nn.Module, tokenizer, say: Callable[[str], None] = _say) -> dict[str, Int8Weight]:
    """GPTQ int8 of every body Linear of ``model`` (fp32), by module name."""
    started = time.perf_counter()
    shapes = _shapes(model)
    layers = {name: layer for shape in shapes for name, layer in shape}
    say(f"rounding {len(layers)} matmuls to int8 for this model (once per model, ~15 s on 2 cores): reading "
        f"{CALIBRATION.name}")
    sums = hessians(model, tokenizer, layers, calibration_texts())
    say(f"  calibration read in {time.perf_counter() - started:.1f} s; rounding")
    out: dict[str, Int8Weight] = {}
    # One weight shape is rounded together (gptq); a layer the calibration never reached keeps none.
    for group in ([name for name, _ in shape if name in sums] for shape in shapes):
        # A few matrices at a time: Gemma's 18 down projections' H alone are 302 MB (2048 x 2048
        # fp32 each), and their factors and inverse as much again each.
        for names in (group[i : i + CHUNK] for i in range(0, len(group), CHUNK)):
            w = torch.stack([layers[n].weight.detach().float() for n in names])
            h = torch.stack([sums[n] for n in names])
            rounded = gptq(w, h)
            for i, n in enumerate(names):
                out[n] = Int8Weight(rounded.q[i].clone(), rounded.scale[i].clone())
    say(f"rounded in {time.perf_counter() - started:.1f} s")
    return out


def _digest() -> str:
    text = CALIBRATION.read_bytes() if CALIBRATION.is_file() else b""
    return hashlib.sha256(text + f"|{VERSION}|{CALIBRATION_TOKENS}|{PIECE}|{DAMP}|{BLOCK}|{LEVELS}".encode()).hexdigest()[:12]


def path_for(model_key: str) -> Path:
    from models.registry import cache_root

    return cache_root() / "rounded" / f"{model_key}-{_digest()}.pt"


def save(rounded: dict[str, Int8Weight], model_key: str) -> None:
    path = path_for(model_key)
    partial = path.with_name(path.name + f".partial-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({n: (w.q, w.scale) for n, w in rounded.items()}, partial)
        os.replace(partial, path)  # atomic: a half-written file is never read
    except OSError:  # a read-only cache: made again at the next start
        partial.unlink(missing_ok=True)


def load_or_make(model: nn.Module, tokenizer, model_key: str, say: Callable[[str], None] = _say) -> dict[str, Int8Weight]:
    """The GPTQ int8 weights of ``model``'s body by module name: read from the cache if made
    before (the GGUF's conversion makes them, models/loading.py), else made now and saved."""
    path = path_for(model_key)
    if path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
            layers = body_linears(model)
            if all(n in saved and saved[n][0].shape == m.weight.shape for n, m in layers.items()):
                return {n: Int8Weight(q, s) for n, (q, s) in saved.items()}
        except Exception:  # a damaged file: made again below
            pass
    rounded = round_model(model, tokenizer, say)
    save(rounded, model_key)
    return rounded


def by_layer(model: nn.Module, rounded: dict[str, Int8Weight]) -> dict[int, Int8Weight]:
    """``rounded`` keyed by the identity of ``model``'s layers (what the tuning asks by): never by
    name alone, so another model with the same names (a learned style) never gets these values."""
    return {id(m): rounded[n] for n, m in body_linears(model).items() if n in rounded and rounded[n].q.shape == m.weight.shape}
