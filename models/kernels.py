"""The ways one Linear layer can run on a CPU, each with its weight in a format of its own.

Which way is fastest depends on the CPU far more than on the model. Gemma's 262144x640
output layer at 3 rows (a Tab press decodes three rows at a time), measured on two CPUs of
this project's kind:

    way            AMD EPYC, AVX-512 + bf16    same, bf16 masked off*    Intel Xeon, no bf16
    fp32           185 ms (MKL, a slow path)   206 ms                    36-39 ms
    fp32-onednn     26 ms                       29 ms
    bf16-onednn     12 ms                       33 ms (emulated)          47-50 ms (emulated)
    fp16-fbgemm     11 ms                       11 ms
    int8-weight     15 ms                       17 ms                     491 ms
    * ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI

so no format can be picked by assumption: models/tuning.py times them all on the machine it
runs on and keeps the fastest that is faithful. Every way takes and returns fp32 activations,
so the rest of the model runs in fp32 and each layer's weight format is its own business.

The formats, from most to least precise, with what each cost Gemma 3 270M in bits per
character on held-out English / Chinese when every layer used it (bench/data/heldout.txt):
fp32 (exact), fp16 (+0.00 % / -0.01 %: the GGUF's block values d*q need up to 19 bits, fp16
keeps 11), bf16 (+0.06 % / -0.05 %), int8 weights with bf16 activations (-0.02 % / +0.05 %),
int8 weights and int8 activations, smoothed (+0.42 % / +0.26 % for all but the output layer;
it is meant for prompts, where the arithmetic and not the reading of weights is the cost).
Not offered: fbgemm's dynamic int8 (one scale for all of a prompt's activations): +12.8 % /
+16.9 %, the outlier channels set the scale and flatten the rest.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

_CHUNK_ROWS = 16384  # weights are converted in row chunks: no full-size fp32 temporaries


@dataclass(frozen=True)
class Kernel:
    """One way to compute ``x @ weight.T`` for fp32 ``x`` [rows, in]."""

    name: str
    precision: int  # lower is more precise; ties in speed go to the more precise way
    bytes_per_weight: float
    # (fp32 weight [out, in], largest |input| per input channel seen on the probe text or None)
    # -> what run() needs
    prepare: Callable[[torch.Tensor, torch.Tensor | None], object]
    run: Callable[[torch.Tensor, object], torch.Tensor]  # (x, prepared) -> fp32 [rows, out]
    available: Callable[[], bool] = lambda: True
    many_rows_only: bool = False  # offered for prompts only (see int8-smooth)
    few_rows_only: bool = False  # offered for decode steps only (see int8-weight)
    output_only: bool = False  # offered for the output layer only (see int8-screen)
    padded_in: int = 1  # the format rounds the input dimension up to a multiple of this (memory)
    fallback_for: str = ""  # measured only where this other way cannot run (the same format, a slower path)
    # prepare also takes the layer's GPTQ-rounded int8 weight (models/rounding.py) where there is one
    rounded: bool = False

    def make(self, weight: torch.Tensor, act_absmax: torch.Tensor | None = None, rounded: "Int8Weight | None" = None):
        """The prepared weight: ``prepare``, given ``rounded`` if this way takes it."""
        return self.prepare(weight, act_absmax, rounded) if self.rounded else self.prepare(weight, act_absmax)

    def megabytes(self, out_features: int, in_features: int) -> float:
        """Memory one prepared weight of this shape takes."""
        padded = -(-in_features // self.padded_in) * self.padded_in
        return self.bytes_per_weight * out_features * padded / 2**20


# ---------------------------------------------------------------- int8 weights, shared by three ways


@dataclass
class Int8Weight:
    """Symmetric int8 per output channel: weight ~= q * scale[:, None]."""

    q: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # fp32 [out]


def quantize_int8(weight: torch.Tensor, levels: int = 127) -> Int8Weight:
    """``levels``: the largest |q| (127; 63 where int8 products are summed in 16 bits, see _int_mm_levels)."""
    q, scale = _quantize_blocks(weight, weight.shape[1], levels, 1e-12)
    return Int8Weight(q, scale[:, 0])


def _quantize_blocks(weight: torch.Tensor, block: int, levels: int, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per ``block`` inputs of a row: q int8 [out, in] and scale
    fp32 [out, in / block], weight ~= q * scale; a scale is at least ``floor / levels``.

    In row chunks, in one reused buffer: made at every start, Gemma's output layer in blocks of
    32 took 0.70-0.89 s with fresh temporaries per chunk and 0.16-0.21 s so (same values)."""
    out, width = weight.shape
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(out, width // block, dtype=torch.float32)
    buffer = torch.empty(min(out, _CHUNK_ROWS), width // block, block)
    for start in range(0, out, _CHUNK_ROWS):
        w = weight[start : start + _CHUNK_ROWS].float().view(-1, width // block, block)
        work = buffer[: w.shape[0]]
        s = torch.abs(w, out=work).amax(dim=-1).clamp_min_(floor).div_(levels)
        torch.div(w, s[..., None], out=work).round_().clamp_(-levels, levels)
        q[start : start + _CHUNK_ROWS] = work.view(-1, width)  # the copy converts to int8
        scale[start : start + _CHUNK_ROWS] = s
    return q, scale


def _to(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A converted copy of ``weight``, made in row chunks (a mapped fp32 weight is read once)."""
    out = torch.empty(weight.shape, dtype=dtype)
    for start in range(0, weight.shape[0], _CHUNK_ROWS):
        out[start : start + _CHUNK_ROWS] = weight[start : start + _CHUNK_ROWS]
    return out


# ---------------------------------------------------------------- the ways


def _onednn_available() -> bool:
    return hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()


def _fbgemm_available() -> bool:
    engines = torch.backends.quantized.supported_engines
    return _LINEAR_FP16 is not None and _LINEAR_INT8 is not None and ("fbgemm" in engines or "x86" in engines)


def _onednn_prepare(dtype: torch.dtype, rows_hint: int = 3):
    def prepare(weight, act_absmax=None):
        # May raise where oneDNN cannot run this dtype (bf16 under ONEDNN_MAX_CPU_ISA=AVX2):
        # tuning then counts the way as unavailable for this CPU.
        return torch.ops.mkldnn._reorder_linear_weight(_to(weight, dtype) if dtype != weight.dtype else weight.contiguous(), rows_hint)

    return prepare


def _onednn_run(dtype: torch.dtype):
    def run(x, packed):
        y = torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, None, "none", [], "")
        return y.float()

    return run


_PACK_ROWS = 32768  # rows per slice where a library packs a weight on one thread

# fbgemm's ops called through their one overload: ``torch.ops.quantized.linear_dynamic_fp16(...)``
# first walks its arguments in Python looking for fake script objects (its weight is a torchbind
# object), ~4 us a call, ~140 calls a decode step; the overload goes straight to C++.
def _overload(name: str):
    try:
        return getattr(torch.ops.quantized, name).default
    except (AttributeError, RuntimeError):  # a build without quantized ops: these ways are never available
        return None


_LINEAR_FP16 = _overload("linear_dynamic_fp16")
_LINEAR_INT8 = _overload("linear_dynamic")


def _fp16_prepare(weight, act_absmax=None):
    # fbgemm converts to fp16 one element at a time on one thread: 3.3 s for Gemma's 168M-weight
    # output layer, paid at every start. Packed in slices on two threads it takes half that,
    # and running the slices one after another costs nothing measurable.
    if weight.shape[0] <= _PACK_ROWS:
        return [torch.ops.quantized.linear_prepack_fp16(weight.contiguous(), None)]
    from concurrent.futures import ThreadPoolExecutor

    slices = [weight[i : i + _PACK_ROWS] for i in range(0, weight.shape[0], _PACK_ROWS)]
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        return list(pool.map(lambda w: torch.ops.quantized.linear_prepack_fp16(w.contiguous(), None), slices))


def _fp16_run(x, packed):
    if len(packed) == 1:
        return _LINEAR_FP16(x, packed[0])
    return torch.cat([_LINEAR_FP16(x, p) for p in packed], dim=-1)


@dataclass
class SmoothInt8Weight(Int8Weight):
    smooth: torch.Tensor  # fp32 [in]: the input is divided by it, the weight's columns multiplied


def _int8_smooth_prepare(weight, act_absmax):
    # SmoothQuant (Xiao et al., 2023), alpha 0.5: a few input channels of a transformer carry
    # outliers 10-100x the rest; quantizing such activations to int8 flattens every other
    # channel. Moving half of each channel's range into the weight evens them out. On Gemma 3
    # 270M (every matmul but the output layer in int8, held-out text) plain per-row int8 cost
    # +0.75 % bits/char in English and +1.23 % in Chinese, smoothed +0.42 % and +0.26 %.
    if act_absmax is None:
        smooth = torch.ones(weight.shape[1])
    else:
        w_absmax = torch.zeros(weight.shape[1])
        for start in range(0, weight.shape[0], _CHUNK_ROWS):
            w_absmax = torch.maximum(w_absmax, weight[start : start + _CHUNK_ROWS].abs().amax(dim=0).float())
        smooth = (act_absmax.float().clamp_min(1e-5).sqrt() / w_absmax.clamp_min(1e-5).sqrt()).clamp(1e-2, 1e2)
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.shape[0], dtype=torch.float32)
    levels = _int_mm_levels()
    for start in range(0, weight.shape[0], _CHUNK_ROWS):
        part = quantize_int8(weight[start : start + _CHUNK_ROWS].float() * smooth, levels)
        q[start : start + _CHUNK_ROWS], scale[start : start + _CHUNK_ROWS] = part.q, part.scale
    return SmoothInt8Weight(q, scale, smooth)


_levels: int | None = None


def _int_mm_levels() -> int:
    """The largest |weight| in int8 that ``torch._int_mm`` multiplies exactly on this CPU.

    Without VNNI (AVX2, AVX-512 before Cascade Lake) oneDNN multiplies int8 pairs with
    vpmaddubsw, whose 16-bit sums saturate: with activations and weights at full range its
    result was off by 19 % (random int8 data, EPYC capped to AVX2), and on Gemma's real
    activations the smoothed int8 layers' error rose 1.3-2.6x (0.008-0.025 -> 0.014-0.031)
    and the probe check refused them. With weights within +-63 a pair's sum fits in 16 bits
    and the product is exact. So the CPU is asked, not assumed: full range if exact, else 63."""
    global _levels
    if _levels is None:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(-127, 128, (32, 256), dtype=torch.int8, generator=g)
        x[:, ::2] = 127  # the worst case: neighbouring pairs both large
        w = torch.full((32, 256), 127, dtype=torch.int8)
        w[::2] = -127
        _levels = 63
        try:
            exact = x.to(torch.int32) @ w.to(torch.int32).t()
            if torch.equal(torch._int_mm(x, w.t()), exact):
                _levels = 127
        except RuntimeError:
            pass
    return _levels


def _int8_smooth_run(x, w: SmoothInt8Weight):
    # Each activation row gets its own scale, so one token's outlier does not flatten the
    # others; int8 x int8 -> int32 runs on oneDNN (VNNI where the CPU has it).
    # In place after the first division (the same values bit for bit): each fresh tensor of a
    # prompt's size is memory the allocator maps and faults in anew; quantizing 198 x 2048
    # took 0.41-1.3 ms with two more of them, 0.14 ms without (EPYC, also under the AVX2 cap).
    x = x / w.smooth
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-12).div_(127.0)
    xq = x.div_(scale).round_().to(torch.int8)
    return torch._int_mm(xq, w.q.t()).float().mul_(scale).mul_(w.scale)


def _fbgemm_int8(w: Int8Weight) -> list:
    """fbgemm's packed int8 weight, in slices of _PACK_ROWS rows packed on all threads (fbgemm
    packs on one: 1.6 s for Gemma's output layer, paid at every start).

    It takes the quantized-tensor type torch has deprecated (a warning at every start, silenced
    here); once it is gone this raises, and tuning counts the way as one this torch cannot run."""
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    def pack(start: int):
        q, scale = w.q[start : start + _PACK_ROWS], w.scale[start : start + _PACK_ROWS]
        zero = torch.zeros(q.shape[0], dtype=torch.long)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            tensor = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
        return torch.ops.quantized.linear_prepack(tensor, None)

    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        return list(pool.map(pack, range(0, w.q.shape[0], _PACK_ROWS)))


def _fbgemm_int8_run(x: torch.Tensor, packed: list, reduce_range: bool) -> torch.Tensor:
    if len(packed) == 1:
        return _LINEAR_INT8(x, packed[0], reduce_range)
    # The same activation scale for every slice: it is taken from x alone.
    return torch.cat([_LINEAR_INT8(x, p, reduce_range) for p in packed], dim=-1)


@dataclass
class BlockInt8:
    """int8 in blocks of BLOCK inputs, one scale each: weight ~= q * scale (per block).

    A GGUF's Q8_0 tensor (Gemma 3's token embedding, tied to its output layer) is exactly this,
    so its values come back bit for bit (see block_int8); other weights lose at most half a
    step of 1/127 of their block's largest value."""

    q: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # fp16 (where it holds every scale exactly) or fp32 [out, in / block]
    block: int

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """fp32 rows ``index`` (any shape) -> [*index.shape, in].

        index_select, not ``q[index]``: for 3 x 1024 rows of Gemma's 262144 x 640 it took 0.05 ms
        where advanced indexing took 0.76 (EPYC)."""
        flat = index.reshape(-1)
        q = self.q.index_select(0, flat).view(flat.shape[0], -1, self.block).float()
        q.mul_(self.scale.index_select(0, flat).float()[..., None])
        return q.view(*index.shape, self.q.shape[1])

    def span(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``start``..``stop`` -> [stop - start, in], in fp32 (exact) or ``dtype``."""
        q = self.q[start:stop].view(stop - start, -1, self.block).to(dtype)
        q.mul_(self.scale[start:stop].to(dtype)[..., None])
        return q.view(stop - start, self.q.shape[1])

    def logits(self, index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Row ``index[b, c]`` of the weight times ``x[b]``: [B, C] from index [B, C], x [B, in].

        A row-wise dot product, not bmm: bmm with one column took 3.3-4.1 ms for 3 x 1024 rows
        against 0.7-0.8 (EPYC, natively and with AVX2 only)."""
        return torch.linalg.vecdot(self.rows(index), x[:, None, :])


BLOCK = 32  # GGUF's Q8_0 block


def block_int8(weight: torch.Tensor) -> BlockInt8:
    width = weight.shape[1]
    block = BLOCK if width % BLOCK == 0 else width
    # Q8_0's scale is fp16 d with d * 127 the block's largest value, exact in fp32, so
    # (d * 127) / 127 gives d back and round(value / d) its q: the round trip is exact.
    q, scale = _quantize_blocks(weight, block, 127, 1e-30)
    half = scale.half()
    if torch.equal(half.float(), scale):
        scale = half
    return BlockInt8(q, scale, block)


@dataclass
class Screen:
    packed: list  # fbgemm's int8 weight, in slices of rows
    exact: BlockInt8  # the weight again, for the exact values of a few rows
    reduce_range: bool  # 7-bit activations (see _screen_prepare)
    candidates: int = 256  # rows of exact logits per input row (SCREEN_CANDIDATES)


def largest(x: torch.Tensor, k: int, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(x, k)`` over the last dimension of logits [B, V]: the same values, largest
    first, found through blocks of ``block`` logits. The k blocks with the largest maxima hold
    the k largest logits (each of those lies in a block whose maximum is at least the k-th
    largest, and no more than k blocks can have one), so only they are searched.

    torch.topk over Gemma's 262,144 logits took 277 / 567 us (k 256) and 241 / 436 us (k 40)
    for 1 / 3 rows (EPYC); the maxima of 8192 blocks and a search of the k best blocks ~60 /
    ~170. (Equal logits at the k-th place may come out as another of the same value.)"""
    rows, width = x.shape
    if width % block or width // block < 4 * k or not x.is_contiguous():
        return torch.topk(x, k, dim=-1)
    blocks = x.view(rows, width // block, block).amax(dim=-1).topk(k, dim=-1).indices
    index = (blocks[..., None] * block + torch.arange(block, device=x.device)).view(rows, -1)
    values, at = x.gather(1, index).topk(k, dim=-1)
    return values, index.gather(1, at)


SCREEN_CANDIDATES = 256  # exact logits per row
SCREEN_ROWS = 16  # rows quantized together (fbgemm takes one scale for all the rows of a call)


def _screen_prepare(weight, act_absmax=None):
    w = quantize_int8(weight)
    packed = _fbgemm_int8(w)
    del w
    # 8-bit activations keep the int8 logits 5x closer (Gemma, held-out Chinese: +0.13 % bits/char
    # against +0.81 % with 7 bits), but where fbgemm multiplies with 16-bit sums (AVX2 without
    # VNNI) they can saturate. So both are tried on input of the layer's real range and the
    # closer kept.
    scale = act_absmax.float() / 3 if act_absmax is not None else torch.ones(weight.shape[1])
    probe = torch.randn(8, weight.shape[1], generator=torch.Generator().manual_seed(0)) * scale
    rows = weight[:4096].float()
    expected = probe @ rows.T
    errors = {}
    for reduce in (False, True):
        got = _fbgemm_int8_run(probe, packed[:1], reduce)[:, : rows.shape[0]]
        errors[reduce] = float((got - expected).norm() / expected.norm().clamp_min(1e-12))
    reduce = errors[True] < errors[False]
    # With 7-bit activations the int8 tail is rougher (+0.81 % bits/char on held-out Chinese with
    # 256 exact rows, +0.22 % with 1024), so more rows are made exact.
    return Screen(packed, block_int8(weight), reduce, 4 * SCREEN_CANDIDATES if reduce else SCREEN_CANDIDATES)


def _screen_run(x, s: Screen):
    # Every logit from int8 (fbgemm, activations quantized on the fly: ~1e-2 off), then the
    # likeliest SCREEN_CANDIDATES of each row again in fp32: those are the ones sampling draws
    # from (top-k 40 of them) and the perplexity view mostly shows, and they come out exact;
    # the rest only feed the normalisation. Gemma's output layer reads 168 MB this way instead
    # of 320 (bf16) or 512 (fbgemm's fp16, which pads 640 inputs to 1024).
    # The exact rows come from a resident block-int8 copy (exact for Gemma's Q8_0 weight), not
    # from the fp32 weight: that one lies in the mapped model file with its pages handed back
    # (kernels.release_pages), and gathering 3 x 256 rows of it faulted them in from the file:
    # 46 ms for a random set and 5.5 ms of a 29 ms decode step at batch 3 on an EPYC, for
    # 0.2 ms from the resident copy (its 178 MB are counted in the format's bytes).
    if x.shape[0] > SCREEN_ROWS:  # scoring a text: a few rows at a time, each with its own scale
        return torch.cat([_screen_run(part, s) for part in x.split(SCREEN_ROWS)])
    approx = _fbgemm_int8_run(x, s.packed, s.reduce_range)
    top = largest(approx, min(s.candidates, approx.shape[-1]))[1]
    return approx.scatter_(1, top, s.exact.logits(top, x))


def _int8_weight_prepare(weight, act_absmax=None, rounded: Int8Weight | None = None):
    # GPTQ's rounding where the model has one (models/rounding.py: the distribution suggestions
    # are drawn from moved 0.029 / 0.037 instead of 0.034 / 0.045 from fp32), else the nearest.
    w = rounded if rounded is not None and rounded.q.shape == weight.shape else quantize_int8(weight)
    return Int8Weight(w.q, w.scale.bfloat16())


def _int8_weight_run(x, w: Int8Weight):
    return torch._weight_int8pack_mm(x.bfloat16(), w.q, w.scale).float()


KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in [
        Kernel("fp32", 0, 4, lambda w, a=None: w, lambda x, w: F.linear(x, w)),
        Kernel("fp32-onednn", 0, 4, _onednn_prepare(torch.float32), _onednn_run(torch.float32), _onednn_available),
        # fbgemm packs the input dimension in blocks of 512 rows: Gemma's 640 takes 1024, so its
        # output layer in fp16 holds 514 MB, not 320 (measured).
        Kernel("fp16-fbgemm", 1, 2, _fp16_prepare, _fp16_run, _fbgemm_available, padded_in=512),
        Kernel("bf16", 2, 2, lambda w, a=None: _to(w, torch.bfloat16), lambda x, w: F.linear(x.bfloat16(), w).float(),
               fallback_for="bf16-onednn"),
        Kernel("bf16-onednn", 2, 2, _onednn_prepare(torch.bfloat16), _onednn_run(torch.bfloat16), _onednn_available),
        # For decode steps only: weight-only int8 halves the bytes a step reads, while a prompt's
        # arithmetic runs through its dequantisation (Gemma's 2048x640 layers at 128 rows:
        # 88-147 ms against 24 for int8-smooth).
        Kernel("int8-weight", 3, 1, _int8_weight_prepare, _int8_weight_run, lambda: hasattr(torch, "_weight_int8pack_mm"),
               few_rows_only=True, rounded=True),
        # The output layer only: a model's vocabulary is most of its weights (62 % of Gemma 3
        # 270M's) and a suggestion only needs its likeliest logits exactly.
        Kernel("int8-screen", 1, 2 + 2 / BLOCK, _screen_prepare, _screen_run, _fbgemm_available, output_only=True),
        # For prompts only: there the arithmetic is the cost and int8 arithmetic is 2-4x faster
        # (prefill of Gemma's 2048x640 layers at 128 rows: 26 ms against 63 for fp32), while a
        # decode step reads as many bytes with int8 weights alone (int8-weight) and loses less.
        Kernel("int8-smooth", 4, 1, _int8_smooth_prepare, _int8_smooth_run, lambda: hasattr(torch, "_int_mm"), many_rows_only=True),
    ]
}
REFERENCE = "fp32"


# ---------------------------------------------------------------- the dense weight, once a copy runs

_MADV_RANDOM, _MADV_PAGEOUT = 1, 21  # Linux <sys/mman.h>


def release_pages(tensor: torch.Tensor) -> bool:
    """Ask the kernel to take this tensor's memory out of the process's resident set, losing nothing.

    Once a layer runs from a copy of its weight in another format, the dense fp32 weight is
    read only to look up the embeddings of a few tokens (Gemma's output layer is tied to the
    input embedding), if at all. It lies in the safetensors file that transformers maps into
    memory, so its pages (671 MB for Gemma's output layer) need not stay resident:
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


# ---------------------------------------------------------------- the layer


class TunedLinear(nn.Module):
    """A Linear layer that runs a few rows (decoding) one way and many rows (a prompt) another.

    ``few`` and ``many`` are (kernel name, prepared weight); when both name the same kernel they
    share one prepared weight. Inference only; fp32 in, fp32 out.

    Where the two ways differ, the last of many rows also runs the "few" way: it is the prompt's
    last token, whose output is the distribution the suggestions' first tokens are drawn from.
    Computed from int8 activations, that distribution moved 0.060 (English) / 0.085 (Chinese)
    in total variation from fp32's on held-out text; with the last token computed like a decode
    step (reading the prompt's int8-made keys and values) ~0.03, for one more read of the
    weights per prompt (~a decode step).
    """

    def __init__(self, linear: nn.Linear, few: tuple[str, object], many: tuple[str, object], few_rows: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        self.few_rows = few_rows
        self.few_name, self.few_weight = few
        self.many_name, self.many_weight = many
        self._few_run, self._many_run = KERNELS[self.few_name].run, KERNELS[self.many_name].run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != torch.float32:
            flat = flat.float()
        if flat.shape[0] <= self.few_rows:
            y = self._few_run(flat, self.few_weight)
        else:
            y = self._many_run(flat, self.many_weight)
            if self.few_name != self.many_name:
                y[-1:] = self._few_run(flat[-1:], self.few_weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(dtype)

    def matmul(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """This layer for fp32 [rows, in] -> [rows, out] as a plain function: up to ``few_rows``
        rows its few-rows way called straight, not through nn.Module's call and forward's reshapes
        and casts (~5 us less a call: 127 calls, ~0.6 ms of a ~19 ms decode step at batch 3 on an
        EPYC, models/decode.py); more rows (many writers in one batch) as forward runs them."""
        if self.bias is not None:
            return self
        run, weight, few = self._few_run, self.few_weight, self.few_rows

        def call(x: torch.Tensor) -> torch.Tensor:
            return run(x, weight) if x.shape[0] <= few else self(x)

        return call

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, few={self.few_name} (<= {self.few_rows} rows), many={self.many_name}"
