"""How each Linear layer runs on this machine: chosen by measurement, checked, remembered.

At the first start of a model on a machine, for each weight shape of the model, every way in
models/kernels.py that this CPU and this torch can run is prepared on the real weights,
checked against fp32 on real activations (the model reading models/probe.txt), and timed at
the row counts the engine runs: a few rows (a decode step: 3 rows a Tab press) and many (a
prompt being prefilled). A way must be within FEW_TOLERANCE of fp32 to decode and within
LAYER_TOLERANCE to read prompts; the fastest that is wins each, within WEIGHTS_BUDGET_MB of
memory. Then the whole model is checked on the probe text as the engine reads a press (its
first half as a prompt, the rest a few tokens at a time): bits per character in English and
in Chinese may rise at most PROBE_TOLERANCE_PCT over fp32 and the distribution suggestions
are drawn from may move at most PROBE_TV, or a loose format is left out and the choice made
again (fp32 always passes). A way that cannot run here (oneDNN's bf16 under an AVX2 cap), or
runs slowly (an int8 kernel that took 491 ms instead of 17 on one Xeon), loses by measurement.

Timing covers every layer of a shape in turn, not one layer again and again: a decode step
streams all of a model's weights from memory, and one small layer repeated would sit in the
cache and flatter the formats that read more bytes.

The choice is saved under the cache folder with a fingerprint of the machine (CPU model, ISA
flags, torch version, threads, and the environment variables that cap the ISA): a later start
with the same fingerprint applies it without timing anything; another CPU, or the same one
emulating another kind, gets its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.core import give_back_memory
from models.kernels import KERNELS, REFERENCE, Int8Weight, Kernel, TunedLinear, release_pages
from models.settings import Settings
from models.steps import sampling_distribution, total_variation

log = logging.getLogger("tabwrite")

# A layer -> its GPTQ-rounded int8 weight, or None (models/rounding.py; made once per model, on first ask).
Rounded = Callable[[nn.Module], "Int8Weight | None"]

TUNING_VERSION = 4  # bump when the choice logic changes: every machine tunes again
FEW_ROWS = 16  # a layer input of at most this many rows runs the "few" way (decode steps, short typed prompts)
TIMED_FEW = 3  # one Tab press decodes three rows at a time
TIMED_BATCH = 48  # a batch of many writers' presses, for the layer with only one way for every row count
TIMED_MANY = 128  # a prompt being prefilled (the engine admits up to ~256 prompt tokens per round)
# Many rows are bound by arithmetic, not by reading weights: a few layers of a shape, timed and
# scaled up, tell as much as all of them and cost a fraction of the first start.
MANY_LAYERS = 6
# Relative error of one layer's output on the probe's real activations that each use allows.
# Decode steps produce the distribution the suggestions are drawn from after every token, so
# they take only formats as close as bf16 (2-3e-3 here; fp16 1-2e-4): with int8 weights
# (6-11e-3) in the decode steps that distribution moved 0.037/0.049 (English/Chinese, total
# variation from fp32, held-out text) against 0.026/0.033 with fp16. A prompt's int8 error is
# damped: its last token runs the decode way (see kernels.TunedLinear), and smoothed int8
# (8e-3 to 3e-2) cost +0.2/+0.3 % bits/char there.
FEW_TOLERANCE = 4e-3
# int8 weights rounded by GPTQ (models/rounding.py) are let into decode steps at their layer
# error (Gemma: 4-7e-3 on the probe's inputs, to nearest 6-11e-3) and then judged, like every
# choice, by the whole model on the probe text below: on held-out text read as a press the
# distribution moved 0.029 / 0.037 with them, 0.034 / 0.045 rounded to nearest (fp16: 0.020 /
# 0.025; EPYC, 2026-12-07).
ROUNDED_FEW_TOLERANCE = 1.2e-2
LAYER_TOLERANCE = 4e-2
PROBE_TOLERANCE_PCT = 1.0  # bits/char on the probe text may rise this much over fp32, per language
# ... and the distribution the suggestions are drawn from (after each decode step) may move this
# much in total variation from fp32's, on average (bf16 weights everywhere: ~0.017; every matmul
# in int8: ~0.05 English, ~0.08 Chinese).
PROBE_TV = 0.04
# A less precise format must be this much faster to be chosen over a more precise one: two
# formats a few per cent apart swap places from one run to the next on a noisy machine.
SPEED_TIE = 0.10
# ... and int8 weights rounded by GPTQ, this much faster than the next best way for decode
# steps: their error shares the probe check's budget with the prompts' int8, which gains more.
# Under the AVX2 cap four shapes timed 12-24 % faster alone in int8 made a decode step 3 %
# faster (bench.ways: 20.2 against 20.9 ms), and their share of the distribution's move left
# no room for int8 prompts (first suggestion 356 ms, the choice 29.9 s: EPYC, 2026-12-07);
# natively every body shape's int8 was 42-80 % faster than its next best way.
ROUNDED_SPEED_TIE = 0.25
SHAPE_TRIALS = 2  # when the probe check fails, this many one-shape changes are checked (~2.5 s each) before whole formats
# Prepared weights may take this much memory: a layer whose few and many rows run different
# formats holds two copies. The app's steady RSS is to stay under 1.5 GB with Gemma 3 270M:
# ~700 MB is the rest: torch, transformers, the tokenizer, the engine's caches at work (measured).
WEIGHTS_BUDGET_MB = float(os.environ.get("TABWRITE_WEIGHTS_BUDGET_MB", 800))
PRESS_STEPS, PRESS_PROMPT = 22, 200  # what a Tab press costs is estimated from: decode steps, prompt tokens
TIME_BUDGET_S = 0.03  # timing per way and row count, at most (after a first call)
GIVE_UP = 2.0  # a way this many times slower than the best so far, after one call, is not timed further
CHECK_ROWS = 64  # real input rows a layer's output is checked on
SCREENED = 64  # an output layer exact only on its likeliest logits (int8-screen) is checked on these
# (on a slice of the vocabulary, on its share of them)
# A layer with more output rows than twice this (Gemma's 262144-token output layer) is measured
# on its first SLICE_ROWS rows and the time scaled up: reading a quarter of it is as memory-bound
# as reading all of it, and preparing seven formats of the whole of it took ~4 s.
SLICE_ROWS = 65536
# The order ways are tried in: likely winners first, so that the slow ones (fp32 through MKL
# took 206 ms where fp16 took 11 on one EPYC) are given up on after one call.
ORDER = ("int8-screen", "fp16-fbgemm", "bf16-onednn", "int8-weight", "int8-smooth", "fp32-onednn", "bf16", "fp32")

# ISA flags that decide which kernels a CPU runs well (x86 /proc/cpuinfo "flags", Arm "Features").
_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimddp", "sve", "bf16", "i8mm",
)
# Environment variables that change which instructions the libraries use (the emulation knobs).
_ISA_ENV = (
    "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
    "FBGEMM_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE", "ONEDNN_DEFAULT_FPMATH_MODE",
)


def _cpuinfo() -> tuple[str, set[str]]:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and value.strip():
                    name = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return name, flags


def cpu_fingerprint() -> dict:
    """What the choice depends on. Any change to it means measuring again."""
    name, flags = _cpuinfo()
    return {
        "cpu": name,
        "flags": sorted(f for f in _FLAGS if f in flags),
        "torch": torch.__version__,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "env": {k: os.environ[k] for k in _ISA_ENV if os.environ.get(k)},
        "tuner": TUNING_VERSION,
    }


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- the model's layers, grouped by shape


@dataclass
class Group:
    """The Linear layers of one weight shape. ``single``: one way for every row count (the
    output layer, whose second copy would cost more memory than it saves time)."""

    key: str
    layers: list[tuple[nn.Module, str, nn.Linear]]
    single: bool


def shape_key(layer: nn.Linear, single: bool = False) -> str:
    """The key a layer's shape is measured and chosen under ("2048x640", "262144x640-output")."""
    return f"{layer.out_features}x{layer.in_features}" + ("-output" if single else "")


def linear_groups(model: nn.Module) -> list[Group]:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    groups: dict[str, Group] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child.weight.device.type != "cpu":
                continue
            single = child is output
            key = shape_key(child, single)
            groups.setdefault(key, Group(key, [], single)).layers.append((parent, name, child))
    return list(groups.values())


# ---------------------------------------------------------------- the probe text


def probe_texts() -> list[str]:
    """models/probe.txt, English and Chinese apart (written for this repo; never the benchmark's held-out text)."""
    return texts_by_language(Path(__file__).parent / "probe.txt")


def texts_by_language(path: Path) -> list[str]:
    """The paragraphs of a text file as two texts: the English (ASCII) ones, then the others."""
    text = path.read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    english = "\n\n".join(p for p in paragraphs if p.isascii())
    other = "\n\n".join(p for p in paragraphs if not p.isascii())
    return [t for t in (english, other) if t]


@torch.inference_mode()
def token_logits(model: nn.Module, ids: torch.Tensor, prompt: int | None = None) -> torch.Tensor:
    """fp32 next-token logits after each token of ``ids`` [1, n] but the last: [n - 1, V].

    ``prompt``: read the first ``prompt`` tokens whole (the "many" ways, as a prompt is
    prefilled) and the rest FEW_ROWS at a time through the KV cache (the "few" ways, as
    decode steps run): the text is then read as the engine reads a press.
    """
    if prompt is None:
        return model(input_ids=ids).logits[0, :-1].float()
    from transformers import DynamicCache

    cache, end = DynamicCache(config=model.config), ids.shape[1] - 1
    parts = [model(input_ids=ids[:, :prompt], past_key_values=cache, use_cache=True).logits[0]]
    for start in range(prompt, end, FEW_ROWS):
        parts.append(model(input_ids=ids[:, start : min(start + FEW_ROWS, end)], past_key_values=cache, use_cache=True).logits[0])
    return torch.cat(parts).float()


def token_nll(model: nn.Module, ids: torch.Tensor, prompt: int | None = None) -> torch.Tensor:
    """Negative log-likelihood of each token of ``ids`` after the first: [n - 1] (see token_logits)."""
    return F.cross_entropy(token_logits(model, ids, prompt), ids[0, 1:], reduction="none")


@dataclass
class Probe:
    ids: list[torch.Tensor]  # each text's tokens [1, n]
    reference: list[torch.Tensor]  # fp32 negative log-likelihood of each token
    drawn: list[tuple[torch.Tensor, torch.Tensor]]  # fp32 sampling distribution after each token (steps.sampling_distribution)
    absmax: dict[int, torch.Tensor]  # id(layer) -> largest |input| per input channel
    inputs: dict[str, torch.Tensor]  # group key -> real input rows of its first layer (CHECK_ROWS of them)


@torch.inference_mode()
def run_probe(model: nn.Module, tokenizer, groups: list[Group], texts: list[str]) -> Probe:
    """Read the probe texts with the model as it is (fp32): reference scores and each layer's inputs."""
    absmax: dict[int, torch.Tensor] = {}
    inputs: dict[str, list[torch.Tensor]] = {}
    first = {id(g.layers[0][2]): g.key for g in groups}

    def hook(key: int):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            seen = absmax.get(key)
            absmax[key] = x.abs().amax(dim=0) if seen is None else torch.maximum(seen, x.abs().amax(dim=0))
            if key in first:
                inputs.setdefault(first[key], []).append(x)

        return record

    # The module in place now (the layer, or the layer run another exact way), keyed by the layer.
    handles = [getattr(parent, attr).register_forward_pre_hook(hook(id(layer))) for g in groups for parent, attr, layer in g.layers]
    try:
        ids = [tokenizer(t, return_tensors="pt").input_ids for t in texts]
        reference, drawn = [], []
        for i in ids:
            logits = token_logits(model, i)
            reference.append(F.cross_entropy(logits, i[0, 1:], reduction="none"))
            drawn.append(_drawn(logits))
    finally:
        for h in handles:
            h.remove()
    rows = {}
    for key, parts in inputs.items():
        x = torch.cat(parts)
        rows[key] = x[torch.linspace(0, x.shape[0] - 1, min(CHECK_ROWS, x.shape[0])).long()]  # spread over the texts
    return Probe(ids, reference, drawn, absmax, rows)


def _drawn(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distribution suggestions are drawn from with the editor's default settings."""
    defaults = Settings()
    return sampling_distribution(logits, defaults.temperature, defaults.top_k, defaults.top_p)


def read_probe(model: nn.Module, tokenizer, exact: list[str] | None = None, kept: dict | None = None) -> Probe:
    """The model, still fp32, reading the probe texts (run_probe) through an exact way that is
    fast here (run_exactly; ``exact``: the names to try). ``kept``: where the prepared weights
    of that way are left, for the tuning to time (else they are dropped)."""
    groups = linear_groups(model)
    run_exactly(groups, exact, kept, single_default=True)
    try:
        return run_probe(model, tokenizer, groups, probe_texts())
    finally:
        restore(groups)


# The probe's fp32 read is the model's, not the machine's: made once per model (at the GGUF's
# conversion, beside GPTQ's rounding: models/loading.py), saved, and read by every machine's
# choice after. It was ~3 s of a first start's choice (AMD EPYC, 2 cores: 3.4 of 10.8 s; an
# AVX2-only Zen 3: 2.6-3.6 of 13-16 s), which is to cost at most 10 s.
PROBE_VERSION = 1


def probe_path(folder: Path, model_key: str) -> Path:
    """Where ``model_key``'s probe read is kept: named by what it depends on besides the model."""
    defaults = Settings()
    depends = [PROBE_VERSION, probe_texts(), CHECK_ROWS, defaults.temperature, defaults.top_k, defaults.top_p]
    return folder / f"{model_key}-probe-{_digest(depends)}.pt"


def named_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The model's Linear layers by module name (the names are the same in every process)."""
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear}


def save_probe(probe: Probe, model: nn.Module, path: Path) -> None:
    """``probe`` on disk, its layers by name (so another process's model of the same weights finds them)."""
    named = {id(m): n for n, m in named_linears(model).items()}
    data = {"ids": probe.ids, "reference": probe.reference, "drawn": [list(d) for d in probe.drawn],
            "absmax": {named[k]: v for k, v in probe.absmax.items() if k in named}, "inputs": probe.inputs}
    partial = path.with_name(path.name + f".partial-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, partial)
        os.replace(partial, path)  # atomic: a half-written file is never read
    except OSError:  # a read-only cache: read again at the next first start
        partial.unlink(missing_ok=True)


def load_probe(model: nn.Module, tokenizer, path: Path) -> Probe | None:
    """The probe read saved at ``path``, if it is this model's: the same tokens, a range for every
    Linear layer of its size, inputs for every shape. None otherwise (or where unreadable)."""
    try:
        data = torch.load(path, weights_only=True)
        ids = [tokenizer(t, return_tensors="pt").input_ids for t in probe_texts()]
        if len(ids) != len(data["ids"]) or not all(torch.equal(a, b) for a, b in zip(ids, data["ids"])):
            return None
        linears = named_linears(model)
        if set(linears) != set(data["absmax"]) or any(data["absmax"][n].shape != (m.in_features,) for n, m in linears.items()):
            return None
        groups = linear_groups(model)
        if any(data["inputs"].get(g.key) is None or data["inputs"][g.key].shape[-1] != g.layers[0][2].in_features for g in groups):
            return None
        absmax = {id(m): data["absmax"][n] for n, m in linears.items()}
        return Probe(ids, data["reference"], [tuple(d) for d in data["drawn"]], absmax, data["inputs"])
    except Exception:  # noqa: BLE001 - missing, damaged or another model's: read again
        return None


def load_or_read_probe(model: nn.Module, tokenizer, folder: Path, model_key: str,
                       say: Callable[[str], None] = lambda m: None) -> Probe:
    """The model's probe read: from ``folder`` if made before (by this model's conversion or an
    earlier choice on any machine), else read now and saved."""
    path = probe_path(folder, model_key)
    probe = load_probe(model, tokenizer, path)
    if probe is None:
        started = time.perf_counter()
        probe = read_probe(model, tokenizer)
        save_probe(probe, model, path)
        say(f"  read the probe text in fp32 in {time.perf_counter() - started:.1f} s (once per model)")
    return probe


# ---------------------------------------------------------------- measuring the ways


@dataclass
class Measured:
    kernel: str
    error: float | None = None  # relative error of the first layer's output on real inputs
    few_ms: float | None = None  # all the group's layers in turn, TIMED_FEW rows
    batch_ms: float | None = None  # single groups only: TIMED_BATCH rows
    many_ms: float | None = None  # other groups: TIMED_MANY rows
    refused: str = ""  # why it cannot be used here ("" = it can)

    def cost(self, regime: str) -> float | None:
        if regime == "few" and self.batch_ms is not None and self.few_ms is not None:
            return self.few_ms + self.batch_ms / (TIMED_BATCH / TIMED_FEW)  # per press, alone and among many
        return self.few_ms if regime == "few" else self.many_ms


def _last_level_cache_bytes() -> int:
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip().upper()
        return int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    except (OSError, ValueError):
        return 32 * 2**20


_flush_buffer: torch.Tensor | None = None


def _flush_cache() -> None:
    """Read more than the CPU's last-level cache, so the next call finds its weights in memory,
    as in a decode step (which streams every other weight between two calls of a layer). Timed
    hot, Gemma's output layer made int8-screen and bf16 look alike (~16 ms); in a decode step
    int8-screen's 168 MB took ~27 ms a step against ~33 for bf16's 320 MB."""
    global _flush_buffer
    if _flush_buffer is None:
        _flush_buffer = torch.ones(max(2 * _last_level_cache_bytes(), 32 * 2**20) // 4)
    float(_flush_buffer.sum())


def _drop_flush_buffer() -> None:
    """Let go of _flush_cache's buffer once the timing is over: kept, it was 64 MB (twice a
    32 MB cache) of a serving process's memory for good (1449 MB against 1321 at a later start,
    Gemma under the AVX2 cap, 2026-12-07)."""
    global _flush_buffer
    _flush_buffer = None


def seconds_per_call(fn: Callable[[], object], give_up_s: float | None = None, cold: bool = False) -> float:
    """Seconds per call: the median of a few calls within TIME_BUDGET_S (one first call not
    counted). A way whose first call takes longer than ``give_up_s`` is not timed further.
    ``cold``: the cache is flushed before each call (see _flush_cache)."""
    started = time.perf_counter()
    fn()
    if give_up_s is not None and time.perf_counter() - started > 2 * give_up_s:
        return time.perf_counter() - started
    times: list[float] = []
    spent = 0.0
    while len(times) < 2 or (spent < TIME_BUDGET_S and len(times) < (8 if cold else 25)):
        if cold:
            _flush_cache()
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
        spent += times[-1]
        if give_up_s is not None and times[0] > give_up_s:
            break
    return sorted(times)[len(times) // 2]


def _timed_side_by_side(fns: list[Callable[[], object]], pairs: int = 12) -> list[float]:
    """Seconds per call of each of ``fns``, timed cold and in turns (a, b, b, a, a, b, ...), the
    median of each. Timed apart, seconds apart, two ways' times drift with the machine: at one
    first start (EPYC, 2026-12-07) three shapes timed GPTQ's int8 only 14-22 % faster than fp16
    or bf16 where other starts timed it 42-80 % faster. The first of ``fns`` is the candidate:
    where its first call is far slower than the others' (``_weight_int8pack_mm`` took 491 ms
    where fp32 took 36 on one Xeon), the first calls' times are returned, without the turns."""
    first = []
    for fn in fns:
        started = time.perf_counter()
        fn()
        first.append(time.perf_counter() - started)
    if len(fns) > 1 and first[0] > 2 * GIVE_UP * min(first[1:]):
        return first
    times: list[list[float]] = [[] for _ in fns]
    for n in range(pairs):
        for i in range(len(fns)) if n % 2 == 0 else reversed(range(len(fns))):
            _flush_cache()
            started = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - started)
    return [sorted(t)[len(t) // 2] for t in times]


def _rows(sample: torch.Tensor, n: int) -> torch.Tensor:
    repeats = -(-n // sample.shape[0])
    return sample.repeat(repeats, 1)[:n].contiguous()


def measured_weights(group: Group) -> tuple[list[torch.Tensor], float]:
    """The weights a group is measured on, and what to multiply their times by."""
    weights = [layer.weight.detach() for _, _, layer in group.layers]
    rows = weights[0].shape[0]
    if len(weights) == 1 and rows > 2 * SLICE_ROWS:
        return [weights[0][:SLICE_ROWS]], rows / SLICE_ROWS
    return weights, 1.0


def measure(group: Group, kernel: Kernel, probe: Probe, reference: torch.Tensor, best: dict[str, float],
            ready: list | None = None, rounded: Rounded | None = None,
            rival: tuple[Measured, list] | None = None) -> tuple[Measured, list | None]:
    """Prepare ``kernel`` for every layer of ``group``, check it on real inputs and time it.

    ``reference``: the fp32 output of the group's first layer on the probe's rows. ``best``: the
    fastest times so far (ms) by regime. Returns the measurement and the prepared weights
    (None if refused). ``ready``: the whole group's weights in this format, already made.
    ``rounded``: each layer's GPTQ int8 weight, for the ways that take one. ``rival``: the way
    decode steps would run otherwise, measured, and its prepared weights: a rounded way is timed
    side by side with it, and its time is the rival's scaled by the ratio of the two.
    """
    found = Measured(kernel.name)
    if not kernel.available():
        found.refused = "not available in this torch build"
        return found, None
    if kernel.many_rows_only and group.single:
        found.refused = "for prompts only, and this layer has one way for every row count"
        return found, None
    if kernel.output_only and not group.single:
        found.refused = "for the output layer only"
        return found, None
    try:
        weights, scale = measured_weights(group)
        layers = [layer for _, _, layer in group.layers]
        has_rounding = kernel.rounded and scale == 1.0 and rounded is not None and not group.single
        round_of = rounded if has_rounding else (lambda layer: None)
        paired = None
        if has_rounding and ready is None:
            # GPTQ's rounding takes seconds (once per model): asked for only where this way would
            # win decode steps. Its speed is the bytes', whatever their values: timed rounded to
            # nearest first, side by side with the rival.
            nearest = [kernel.make(w, probe.absmax.get(id(layer))) for w, layer in zip(weights, layers)]
            x = _rows(probe.inputs[group.key], TIMED_FEW)
            runs = [lambda: [kernel.run(x, p) for p in nearest]]
            if rival is not None:
                runs.append(lambda: [KERNELS[rival[0].kernel].run(x, p) for p in rival[1]])
            timed_ms = [1e3 * t for t in _timed_side_by_side(runs)]
            del nearest, runs
            if rival is not None:  # the rival's time as measured, scaled by what side by side showed
                paired = timed_ms[0] / timed_ms[1]
                few, against = rival[0].few_ms * paired, rival[0].few_ms
            else:
                few, against = timed_ms[0], best.get("few", float("inf"))
            if not few * (1 + ROUNDED_SPEED_TIE) < against:
                found.few_ms = few
                found.refused = f"not clearly faster than the way it would replace ({few:.2f} against {against:.2f} ms): not rounded"
                return found, None
            ready = [kernel.make(w, probe.absmax.get(id(layer)), round_of(layer)) for w, layer in zip(weights, layers)]
        # The first layer first: a way that fails the check costs one layer's preparing, not all.
        prepared = ready if ready is not None and scale == 1.0 else [kernel.make(weights[0], probe.absmax.get(id(layers[0])), round_of(layers[0]))]
        if scale != 1.0 and hasattr(prepared[0], "candidates"):
            # A slice of the vocabulary gets its share of int8-screen's exact rows, so that the
            # time scaled up is the whole layer's (else its fixed part is counted 1/share times).
            prepared[0].candidates = max(1, round(prepared[0].candidates / scale))
        sample = probe.inputs[group.key]
        # One call of the first layer at the row counts it would be timed at, before it is made
        # for the rest of its group and timed: a way far slower than the best so far is not timed
        # there (its one call's time, scaled to the group, stands), and where that leaves nothing
        # to time, not made for the rest either. It is still checked: it may be the way taken
        # when faster, looser ones are left out (_settle). Only where one call is long enough to
        # tell: the output layer, and prompts' rows. On an AVX2-only Zen 3, int8-smooth's
        # `_int_mm` took 30-60x fp16's time at 128 rows and emulated bf16 5x int8-screen's on the
        # output layer: making and timing them was ~2 s of a 13-17 s first start.
        early = {"few": TIMED_FEW, "batch": TIMED_BATCH} if group.single else {} if kernel.few_rows_only else {"many": TIMED_MANY}
        slow = {}
        for regime, n in early.items():
            if regime in best:
                started = time.perf_counter()
                kernel.run(_rows(sample, n), prepared[0])
                estimate = 1e3 * (time.perf_counter() - started) * scale * len(weights)
                if estimate > 2 * GIVE_UP * best[regime]:
                    slow[regime] = estimate
        found.few_ms, found.batch_ms, found.many_ms = slow.get("few"), slow.get("batch"), slow.get("many")
        out = kernel.run(sample, prepared[0])
        if kernel.output_only:  # checked where it is exact: the logits suggestions are drawn from
            checked = min(SCREENED, max(1, getattr(prepared[0], "candidates", 4 * SCREENED) // 4), reference.shape[-1])
            top = reference.topk(checked, dim=-1).indices
            out, reference = out.gather(1, top), reference.gather(1, top)
        found.error = float((out - reference).norm() / reference.norm().clamp_min(1e-12))
        if not found.error <= LAYER_TOLERANCE:  # also catches nan
            found.refused = f"output differs from fp32 by {found.error:.1e} (limit {LAYER_TOLERANCE:g})"
            return found, None
        few_limit = ROUNDED_FEW_TOLERANCE if has_rounding and round_of(layers[0]) is not None else FEW_TOLERANCE
        for_few = not kernel.many_rows_only and found.error <= few_limit
        if (group.single or kernel.few_rows_only) and not for_few:
            found.refused = f"output differs from fp32 by {found.error:.1e} (limit for decode steps {few_limit:g})"
            return found, None
        if slow and set(slow) == set(early) and (group.single or kernel.many_rows_only):
            return found, None  # no row count left where it could win (apply() makes it whole if it is taken)
        prepared += [kernel.make(w, probe.absmax.get(id(layer)), round_of(layer))
                     for w, layer in zip(weights[len(prepared) :], layers[len(prepared) :])]

        def timed(n: int, regime: str) -> float:
            x = _rows(sample, n)
            layers = prepared[:MANY_LAYERS] if regime == "many" else prepared
            factor = scale * len(prepared) / len(layers)
            cutoff = GIVE_UP * best[regime] / 1e3 / factor if regime in best else None
            return 1e3 * factor * seconds_per_call(lambda: [kernel.run(x, p) for p in layers], cutoff, cold=regime != "many")

        if for_few and paired is not None:  # timed side by side above: the same bytes, rounded otherwise
            found.few_ms = rival[0].few_ms * paired
        elif for_few and "few" not in slow:
            found.few_ms = timed(TIMED_FEW, "few")
        if group.single and "batch" not in slow:
            found.batch_ms = timed(TIMED_BATCH, "batch")
        elif not group.single and not kernel.few_rows_only and "many" not in slow:
            found.many_ms = timed(TIMED_MANY, "many")

    except Exception as e:  # noqa: BLE001 - a way this CPU cannot run (oneDNN bf16 under AVX2, ...)
        found.refused = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:120]}"
        return found, None
    return found, (prepared if scale == 1.0 else None)


def choose(measured: list[Measured], regime: str, excluded: set[str] = frozenset(), prefer: str | None = None) -> str:
    """The fastest usable way for ``regime``; ways within SPEED_TIE of it go to ``prefer`` if it
    is among them, else to the more precise. For prompts, ``prefer`` is the way decode steps run:
    its weights are resident anyway, and any other way is a second copy. On an AVX2-only Zen 3,
    fp16 and fp32 through oneDNN timed within a few % of each other for the 2048x640 layers'
    prompts, and fp32 (the more precise) held another 189 MB: steady RSS 1529 against 1307 MB."""
    usable = [m for m in measured if not m.refused and m.kernel not in excluded and m.cost(regime) is not None]
    if not usable:
        return REFERENCE
    fastest = min(m.cost(regime) for m in usable)
    close = [m for m in usable if m.cost(regime) <= fastest * (1 + SPEED_TIE)]
    way = next((m for m in close if m.kernel == prefer), None) or min(close, key=lambda m: (KERNELS[m.kernel].precision, m.cost(regime)))
    if KERNELS[way.kernel].rounded:  # chosen only where clearly faster (ROUNDED_SPEED_TIE)
        other = choose(measured, regime, excluded | {way.kernel})
        cost = next((m.cost(regime) for m in usable if m.kernel == other), None)
        if cost is not None and cost <= way.cost(regime) * (1 + ROUNDED_SPEED_TIE):
            return other
    return way.kernel


# ---------------------------------------------------------------- applying a choice


def apply(groups: list[Group], choice: dict[str, dict[str, str]], absmax: dict[int, torch.Tensor],
          prepared: dict[tuple[str, str], list] | None = None, release: bool = True, rounded: Rounded | None = None) -> None:
    """Swap every layer for a TunedLinear running the chosen ways (``prepared``: weights already
    made, and where the ones made here are left). ``release``: hand the dense weights' pages back.
    ``rounded``: each layer's GPTQ int8 weight, for the ways that take one (else they round to nearest)."""
    prepared = {} if prepared is None else prepared
    for group in groups:
        names = choice[group.key]
        ways = {}
        for regime in ("few", "many"):
            name = names[regime]
            if (group.key, name) not in prepared:
                round_of = rounded if rounded is not None and KERNELS[name].rounded else (lambda layer: None)
                prepared[(group.key, name)] = [
                    KERNELS[name].make(layer.weight.detach(), absmax.get(id(layer)), round_of(layer)) for _, _, layer in group.layers
                ]
            ways[regime] = (name, prepared[(group.key, name)])
        for i, (parent, attr, layer) in enumerate(group.layers):
            setattr(parent, attr, TunedLinear(layer, (ways["few"][0], ways["few"][1][i]), (ways["many"][0], ways["many"][1][i]), FEW_ROWS))
            if release and REFERENCE not in (names["few"], names["many"]):
                # The dense weight is no longer read (but for embedding lookups when it is tied).
                release_pages(layer.weight.detach())


def run_exactly(groups: list[Group], names: list[str] | None = None, prepared: dict | None = None,
                single_default: bool = False) -> str:
    """Run every layer in fp32 through oneDNN where it can (the same numbers as PyTorch's default
    fp32 matmul to ~1e-6; the default, MKL, took 2.8 s instead of ~1 s to read the probe text on
    an EPYC). Returns the way used; the default where oneDNN cannot run. ``single_default``: the
    output layer keeps the default (tuning: oneDNN's copy of Gemma's would hold 671 MB more at
    the first start's peak, ~3 GB, for ~0.1 s of reading the probe)."""
    for name in names or [k for k in KERNELS if KERNELS[k].precision == 0]:
        if name == REFERENCE or not KERNELS[name].available():
            continue
        try:
            ways = {g.key: {"few": r, "many": r} for g in groups for r in [REFERENCE if g.single and single_default else name]}
            apply(groups, ways, {}, prepared, release=False)
            return name
        except Exception:  # noqa: BLE001 - this CPU cannot run it: read with the default instead
            restore(groups)
            if prepared is not None:
                prepared.clear()
    return REFERENCE


def restore(groups: list[Group]) -> None:
    for group in groups:
        for parent, attr, layer in group.layers:
            setattr(parent, attr, layer)


# ---------------------------------------------------------------- the whole tuning


@dataclass
class Tuning:
    fingerprint: dict
    choice: dict[str, dict[str, str]]  # group key -> {"few": kernel, "many": kernel}
    measured: dict[str, list[dict]] = field(default_factory=dict)
    probe: dict = field(default_factory=dict)
    seconds: float = 0.0
    absmax: dict = field(default_factory=dict, repr=False)  # id(layer) -> input range on the probe (int8-smooth)

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in vars(self).items() if k != "absmax"}, indent=1)

    def describe(self) -> str:
        """One line: the ways chosen, e.g. 'fp16-fbgemm (decoding) / int8-smooth (prompts)'."""
        few = sorted({c["few"] for c in self.choice.values()})
        many = sorted({c["many"] for c in self.choice.values()})
        return f"{'+'.join(few)} (decoding) / {'+'.join(many)} (prompts)"


def _say(message: str) -> None:
    print(f"[tabwrite] {message}", file=sys.stderr, flush=True)


def _check(model, probe: Probe) -> dict:
    """How far the model as it now runs is from fp32 on the probe texts, each read as the
    engine reads a press: the first half whole (the "many" ways; its scores are also the
    perplexity view's), the rest a few rows at a time through the KV cache (the "few" ways).
    Bits/char change (%) of each part, and the mean total variation distance of the
    distribution drawn from after each token of the second part."""
    many, few, tv = [], [], []
    for ids, reference, drawn in zip(probe.ids, probe.reference, probe.drawn):
        half = ids.shape[1] // 2
        logits = token_logits(model, ids, prompt=half)
        nll = F.cross_entropy(logits, ids[0, 1:], reduction="none")
        # Position half - 1 (the prompt's last) is scored by the prompt's read, the rest by decode steps.
        many.append(100 * float(nll[:half].sum() / reference[:half].sum() - 1))
        few.append(100 * float(nll[half:].sum() / reference[half:].sum() - 1))
        later = (drawn[0][half - 1 :], drawn[1][half - 1 :])
        tv.append(float(total_variation(later, _drawn(logits[half - 1 :]), logits.shape[-1]).mean()))
    return {"many_change_pct": [round(x, 3) for x in many], "few_change_pct": [round(x, 3) for x in few],
            "worst_change_pct": round(max(many + few), 3), "tv": [round(x, 4) for x in tv], "worst_tv": round(max(tv), 4)}


def _passes(check: dict) -> bool:
    return check["worst_change_pct"] <= PROBE_TOLERANCE_PCT and check["worst_tv"] <= PROBE_TV


@torch.inference_mode()
def tune(model: nn.Module, tokenizer, kernels: list[str] | None = None, say: Callable[[str], None] = _say,
         rounded: Rounded | None = None, probe: Callable[[], Probe] | None = None) -> Tuning:
    """Measure, choose, check, and leave ``model`` running the choice. ``kernels``: the names to try;
    ``rounded``: each layer's GPTQ int8 weight (models/rounding.py), for the ways that take one;
    ``probe``: gives the model's fp32 read of the probe text (load_or_read_probe); else it is read here."""
    started = time.perf_counter()
    groups = linear_groups(model)
    names = kernels or [k for k in ORDER if k in KERNELS] + [k for k in KERNELS if k not in ORDER]
    # The ways that take GPTQ's rounding last: it is made only for a way faster than all the others.
    names = [k for k in names if not KERNELS[k].rounded] + [k for k in names if KERNELS[k].rounded]
    say(f"choosing how to run {sum(len(g.layers) for g in groups)} matmuls on this CPU ({_cpuinfo()[0]}); "
        f"once per machine, about 10 s")
    kept: dict[tuple[str, str], list] = {}
    # (Read here, the exact way's prepared weights are kept for timing; loaded, it is timed as the others.)
    probe = probe() if probe is not None else read_probe(model, tokenizer, [k for k in names if KERNELS[k].precision == 0], kept)
    measured: dict[str, list[Measured]] = {}
    choice: dict[str, dict[str, str]] = {}
    for n, group in enumerate(groups):
        best: dict[str, float] = {}
        found: list[Measured] = []
        reference = F.linear(probe.inputs[group.key], measured_weights(group)[0][0].float())
        for name in names:
            primary = KERNELS[name].fallback_for
            if primary and any(m.kernel == primary and not m.refused for m in found):
                continue  # the same format through a faster library ran here: no need of this one
            rival = None
            if KERNELS[name].rounded:
                leader = choose(found, "few")
                ways = [m for m in found if m.kernel == leader]
                if ways and ways[0].few_ms is not None and (group.key, leader) in kept:
                    rival = (ways[0], kept[(group.key, leader)])
            m, prepared = measure(group, KERNELS[name], probe, reference, best, kept.get((group.key, name)), rounded, rival)
            found.append(m)
            if not m.refused:
                for regime, ms in (("few", m.few_ms), ("batch", m.batch_ms), ("many", m.many_ms)):
                    if ms is not None:
                        best[regime] = min(best.get(regime, ms), ms)
            if prepared is not None:  # None also when only a slice was made: apply() makes the winner whole
                kept[(group.key, name)] = prepared
            # Keep only the weights of ways that may still win: memory stays bounded.
            leaders = set(group_ways(group, found).values())
            for key in [k for k in kept if k[0] == group.key and k[1] not in leaders]:
                del kept[key]
        measured[group.key] = found
        choice[group.key] = group_ways(group, found)
        # (The weights budget is applied once every group is measured, below.)
        times = ", ".join(
            f"{m.kernel} " + "/".join(f"{t:.1f}" if t is not None else "-" for t in ((m.cost("few"),) if group.single else (m.cost("few"), m.many_ms)))
            for m in found if not m.refused
        )
        say(f"  [{n + 1}/{len(groups)}] {group.key} x{len(group.layers)} (ms few rows/many): {times} -> "
            f"{choice[group.key]['few']} / {choice[group.key]['many']}")
    choice = within_budget(groups, measured, choice)
    _drop_flush_buffer()
    give_back_memory()  # the formats measured and dropped: their pages go back before the winners are made whole
    check = _settle(model, groups, measured, choice, probe, kept, say, rounded)
    tuning = Tuning(
        cpu_fingerprint(), choice, {k: [vars(m) for m in v] for k, v in measured.items()}, check,
        round(time.perf_counter() - started, 2), probe.absmax,
    )
    say(f"chose {tuning.describe()} in {tuning.seconds:.1f} s; on the probe text bits/char {check['worst_change_pct']:+.2f} %, "
        f"distribution moved {check['worst_tv']:.3f}")
    return tuning


def choice_without(groups: list[Group], measured: dict[str, list[Measured]], excluded: set[str]) -> dict[str, dict[str, str]]:
    """The fastest choice (see choose) among the ways not in ``excluded``, within WEIGHTS_BUDGET_MB."""
    choice = {group.key: group_ways(group, measured[group.key], excluded) for group in groups}
    return within_budget(groups, measured, choice, excluded)


def group_ways(group: Group, found: list[Measured], excluded: set[str] = frozenset()) -> dict[str, str]:
    """A shape's ways: the fastest for decode steps, and for prompts the fastest with a tie going
    to the decode steps' way (see choose); the output layer runs one way for both."""
    few = choose(found, "few", excluded)
    return {"few": few, "many": few if group.single else choose(found, "many", excluded, prefer=few)}


def unrounded(tuning: "Tuning") -> dict[str, dict[str, str]]:
    """``tuning``'s choice with every way that takes GPTQ's rounding replaced by its shape's next
    best measured way: for a model whose weights the rounding was not made for (a learned style,
    models/style.py), where rounding to nearest would move the distribution more than the probe
    check allowed (0.034 / 0.045 on held-out text against 0.029 / 0.037)."""
    rounded = {k for k, kernel in KERNELS.items() if kernel.rounded}
    choice = {key: dict(ways) for key, ways in tuning.choice.items()}
    for key, ways in choice.items():
        for regime, way in ways.items():
            if way in rounded:
                found = [Measured(**m) for m in tuning.measured.get(key, [])]
                ways[regime] = choose(found, regime, rounded)
    return choice


def weight_mb(groups: list[Group], choice: dict[str, dict[str, str]]) -> float:
    """Memory the prepared weights of ``choice`` take (a layer running two formats holds both)."""
    total = 0.0
    for group in groups:
        layer = group.layers[0][2]
        for way in {choice[group.key]["few"], choice[group.key]["many"]}:
            total += KERNELS[way].megabytes(layer.out_features, layer.in_features) * len(group.layers)
    return total


def within_budget(groups: list[Group], measured: dict[str, list[Measured]], choice: dict, excluded: set[str] = frozenset()) -> dict:
    """The choice made to fit WEIGHTS_BUDGET_MB: while it does not, the one change of one group's
    way (for few or many rows) that frees memory at the least cost to a press is made."""
    choice = {k: dict(v) for k, v in choice.items()}
    while weight_mb(groups, choice) > WEIGHTS_BUDGET_MB:
        now_mb, now_cost, best = weight_mb(groups, choice), press_cost(groups, measured, choice), None
        for group in groups:
            for regimes in (("few", "many"),) if group.single else (("few",), ("many",), ("few", "many")):
                for m in measured[group.key]:
                    if m.refused or m.kernel in excluded or any(m.cost(r) is None for r in (("few",) if group.single else regimes)):
                        continue
                    if all(m.kernel == choice[group.key][r] for r in regimes):
                        continue
                    trial = {k: dict(v) for k, v in choice.items()}
                    for r in regimes:
                        trial[group.key][r] = m.kernel
                    freed = now_mb - weight_mb(groups, trial)
                    if freed <= 0:
                        continue
                    price = (press_cost(groups, measured, trial) - now_cost) / freed
                    if best is None or price < best[0]:
                        best = (price, trial)
        if best is None:
            break  # nothing smaller to run: over budget it is
        choice = best[1]
    return choice


def press_cost(groups: list[Group], measured: dict[str, list[Measured]], choice: dict) -> float:
    """Estimated ms of a Tab press under ``choice``: a ~200-token prompt and ~22 decode steps."""
    total = 0.0
    for group in groups:
        found = {m.kernel: m for m in measured[group.key]}
        few, many = found[choice[group.key]["few"]], found[choice[group.key]["many"]]
        total += PRESS_STEPS * (few.cost("few") or 0.0)
        if not group.single:
            total += (many.many_ms if many.many_ms is not None else 1e6) * PRESS_PROMPT / TIMED_MANY
    return total


def shape_swaps(groups: list[Group], measured: dict[str, list[Measured]], choice: dict,
                excluded: set[str] = frozenset()) -> list[tuple[float, dict, str]]:
    """Each loose format in ``choice`` replaced, in one layer shape and one use (decoding or
    prompts) only, by that shape's next best: (ms a press it costs, the choice, what changed),
    loosest first. Changes that would pass WEIGHTS_BUDGET_MB are left out."""
    now, found = press_cost(groups, measured, choice), []
    for group in groups:
        for regimes in (("few", "many"),) if group.single else (("few",), ("many",)):
            way = choice[group.key][regimes[0]]
            if KERNELS[way].precision == 0:
                continue
            trial = {k: dict(v) for k, v in choice.items()}
            for r in regimes:
                trial[group.key][r] = choose(measured[group.key], regimes[0], excluded | {way})
            if trial[group.key] == choice[group.key] or weight_mb(groups, trial) > WEIGHTS_BUDGET_MB:
                continue
            use = "prompts" if regimes == ("many",) else "decoding"
            error = next((m.error for m in measured[group.key] if m.kernel == way), None) or 0.0
            found.append((press_cost(groups, measured, trial) - now, trial, f"{way} for {group.key} ({use})", error))
    # The shape where the format is furthest from fp32 first (its layer error on the probe's
    # inputs), then the cheapest: on an EPYC capped to AVX2 the cheapest changes were the
    # small shapes', which did not pass, where leaving int8 out of the loosest (640x2048,
    # error 0.029) did (distribution moved 0.033, limit 0.04).
    return [f[:3] for f in sorted(found, key=lambda f: (-round(f[3], 3), f[0]))]


def _settle(model, groups, measured, choice, probe: Probe, kept: dict, say, rounded: Rounded | None = None) -> dict:
    """Apply ``choice`` (in place) and check it on the probe text; while it fails, leave out one
    loose format from one layer shape (shape_swaps), else from the whole model (the one whose
    absence costs a press least and passes), else the loosest, and check again."""
    excluded: set[str] = set()
    for _ in range(len(KERNELS) + 1):  # each round leaves out one more format; fp32 always passes
        apply(groups, choice, probe.absmax, kept, rounded=rounded)
        check = _check(model, probe)
        in_use = {c[r] for c in choice.values() for r in ("few", "many")}
        loose = sorted((k for k in in_use if KERNELS[k].precision > 0), key=lambda k: -KERNELS[k].precision)
        if _passes(check) or not loose:
            return check
        say(f"  on the probe text bits/char rose {check['worst_change_pct']:.2f} % (limit {PROBE_TOLERANCE_PCT:g} %) and the "
            f"suggestions' distribution moved {check['worst_tv']:.3f} (limit {PROBE_TV:g}) with {', '.join(loose)}")
        # First, a loose format left out of one layer shape only: the whole model may take it
        # everywhere but one place. (Gemma, EPYC capped to AVX2: int8 prompts in every shape
        # moved the distribution 0.049; without int8 in the 640x2048 layers, 0.033; in the
        # 256x640 ones (keys and values), 0.029.) Then one format out of the whole model, the
        # one whose absence costs a press least first.
        trials = [(trial, what) for _, trial, what in shape_swaps(groups, measured, choice, excluded)[:SHAPE_TRIALS]]
        whole = {k: choice_without(groups, measured, excluded | {k}) for k in loose}
        trials += sorted(((trial, k) for k, trial in whole.items()), key=lambda t: press_cost(groups, measured, t[0]))
        for trial, what in trials:
            restore(groups)
            apply(groups, trial, probe.absmax, kept, rounded=rounded)
            attempt = _check(model, probe)
            if _passes(attempt):
                say(f"  not using {what}")
                choice.clear()
                choice.update(trial)
                return attempt
        # No one format's absence is enough: leave out the least precise and go on.
        excluded.add(loose[0])
        say(f"  not using {loose[0]}")
        restore(groups)
        choice.clear()
        choice.update(choice_without(groups, measured, excluded))
    apply(groups, choice, probe.absmax, kept, rounded=rounded)  # not reached: with every loose format left out, fp32 passes
    return _check(model, probe)


# ---------------------------------------------------------------- remembered per machine


def _paths(folder: Path, model_key: str, fingerprint: dict) -> tuple[Path, Path]:
    stem = f"{model_key}-{_digest(fingerprint)}"
    return folder / f"{stem}.json", folder / f"{stem}.absmax.pt"


def tune_or_load(model: nn.Module, tokenizer, folder: Path, model_key: str, say: Callable[[str], None] = _say,
                 rounding: Callable[[], dict[int, Int8Weight]] | None = None) -> Tuning:
    """Apply this machine's saved choice for this model, or tune now and save it. ``rounding``:
    makes each layer's GPTQ int8 weight (models/rounding.py), by id(layer); called once, on the
    model still in fp32, only where a way that takes it would win (tuning) or was chosen (a
    later start)."""
    try:
        return _tune_or_load(model, tokenizer, folder, model_key, say, rounding)
    finally:
        give_back_memory()


def _rounded(rounding: Callable[[], dict[int, Int8Weight]] | None) -> Rounded | None:
    """``rounding`` as a lookup by layer that calls it once, at the first layer asked for."""
    if rounding is None:
        return None
    table: list[dict] = []

    def lookup(layer: nn.Module) -> Int8Weight | None:
        if not table:
            table.append(rounding())
        return table[0].get(id(layer))

    return lookup


def _tune_or_load(model: nn.Module, tokenizer, folder: Path, model_key: str, say: Callable[[str], None],
                  rounding: Callable[[], dict[int, Int8Weight]] | None) -> Tuning:
    fingerprint = cpu_fingerprint()
    path, stats_path = _paths(folder, model_key, fingerprint)
    groups = linear_groups(model)
    try:
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") != fingerprint or set(saved["choice"]) != {g.key for g in groups}:
            raise ValueError("another machine or model")
        layers = [layer for g in groups for _, _, layer in g.layers]
        stats = torch.load(stats_path, weights_only=True)
        absmax = {id(layer): stats[i] for i, layer in enumerate(layers) if i < len(stats)}
        tuning = Tuning(saved["fingerprint"], saved["choice"], saved.get("measured", {}), saved.get("probe", {}),
                        saved.get("seconds", 0.0), absmax)
        # Made (or read) now if the choice takes it, while every layer is still the model's own:
        # apply() swaps them a shape at a time.
        uses = rounding is not None and any(KERNELS[w].rounded for c in tuning.choice.values() for w in c.values() if w in KERNELS)
        table = rounding() if uses else {}
        apply(groups, tuning.choice, absmax, rounded=lambda layer: table.get(id(layer)))
        log.info("matmuls as chosen for this CPU before (%s): %s", path.name, tuning.describe())
        return tuning
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, json.JSONDecodeError):
        pass
    layers = [layer for g in groups for _, _, layer in g.layers]
    tuning = tune(model, tokenizer, say=say, rounded=_rounded(rounding), probe=lambda: load_or_read_probe(model, tokenizer, folder, model_key, say))
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".partial-{os.getpid()}")
    torch.save([tuning.absmax.get(id(layer), torch.zeros(layer.in_features)) for layer in layers], stats_path)
    partial.write_text(tuning.to_json())
    os.replace(partial, path)  # atomic: a half-written choice is never read
    return tuning
