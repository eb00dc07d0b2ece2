"""Each way of running a Linear layer (models/kernels.py) computes what the layer computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from models.kernels import KERNELS, Kernel, TunedLinear, block_int8, release_pages

ROOT = Path(__file__).resolve().parents[2]

# How far each format may be from fp32 on random data (relative error of the output).
TOLERANCE = {"fp32": 1e-6, "fp32-onednn": 1e-5, "fp16-fbgemm": 1e-3, "bf16": 1e-2, "bf16-onednn": 1e-2,
             "int8-weight": 3e-2, "int8-smooth": 3e-2, "int8-screen": 3e-2}


def runnable(name: str) -> bool:
    """Whether this CPU and torch build run the way at all (oneDNN bf16 needs AVX-512, ...)."""
    kernel = KERNELS[name]
    if not kernel.available():
        return False
    try:
        kernel.run(torch.randn(2, 32), kernel.prepare(torch.randn(16, 32), torch.ones(32)))
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_every_way_computes_the_layer(name, rows):
    if not runnable(name):
        pytest.skip(f"{name} does not run on this CPU")
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 200, bias=True)
    x = torch.randn(rows, 96)
    prepared = KERNELS[name].prepare(linear.weight.detach(), x.abs().amax(dim=0))
    layer = TunedLinear(linear, (name, prepared), (name, prepared), few_rows=16)
    with torch.inference_mode():
        expected, got = linear(x), layer(x)
    error = float((got - expected).norm() / expected.norm())
    assert error <= TOLERANCE[name], (name, error)
    assert got.shape == expected.shape and got.dtype == torch.float32


def test_the_screened_output_layer_is_exact_on_its_likeliest_logits():
    if not runnable("int8-screen"):
        pytest.skip("fbgemm is not in this torch build")
    torch.manual_seed(0)
    weight = _q8_0_like(5000, 64)  # a vocabulary of 5000, stored as a GGUF's Q8_0 (Gemma's is)
    x = torch.randn(3, 64)
    got = KERNELS["int8-screen"].run(x, KERNELS["int8-screen"].prepare(weight))
    expected = x @ weight.T
    top = expected.topk(40, dim=-1).indices
    assert torch.equal(got.topk(40, dim=-1).indices.sort().values, top.sort().values)
    assert torch.allclose(got.gather(1, top), expected.gather(1, top), atol=1e-5)
    assert float((got - expected).norm() / expected.norm()) < 3e-2  # the rest: int8


def _q8_0_like(rows: int, width: int) -> torch.Tensor:
    """fp32 values as GGUF's Q8_0 stores them: blocks of 32 int8 times one fp16 scale each."""
    q = torch.randint(-127, 128, (rows, width // 32, 32)).float()
    q[..., 0] = 127  # each block's largest value is its scale times 127, as Q8_0 quantizes
    d = (torch.rand(rows, width // 32, 1) * 1e-3 + 1e-4).half().float()
    return (q * d).view(rows, width)


def test_block_int8_gives_q8_0_values_back_bit_for_bit_and_others_within_half_a_step():
    weight = _q8_0_like(300, 96)
    packed = block_int8(weight)
    assert packed.q.dtype == torch.int8 and packed.scale.dtype == torch.float16  # 2 bytes a block
    assert torch.equal(packed.rows(torch.arange(300)), weight)
    assert torch.equal(packed.rows(torch.tensor([[5, 7], [299, 0]]))[1, 0], weight[299])
    other = torch.randn(300, 96)
    approx = block_int8(other).rows(torch.arange(300))
    step = other.view(300, 3, 32).abs().amax(-1, keepdim=True) / 127
    assert bool(((approx - other).view(300, 3, 32).abs() <= step / 2 + 1e-7).all())
    assert not torch.equal(approx, other)
    odd = torch.randn(10, 50)  # a width that is no multiple of 32: one block a row
    assert block_int8(odd).block == 50 and float((block_int8(odd).rows(torch.arange(10)) - odd).abs().max()) < 0.02


def _recording(name: str, calls: list) -> Kernel:
    return Kernel(name, 0, 4, lambda w, a=None: w, lambda x, w: (calls.append((name, x.shape[0])), x @ w.T)[1])


def test_few_rows_run_one_way_many_rows_another_and_the_last_of_many_the_few_way(monkeypatch):
    calls: list = []
    monkeypatch.setitem(KERNELS, "few-way", _recording("few-way", calls))
    monkeypatch.setitem(KERNELS, "many-way", _recording("many-way", calls))
    linear = torch.nn.Linear(8, 4, bias=False)
    w = linear.weight.detach()
    layer = TunedLinear(linear, ("few-way", w), ("many-way", w), few_rows=4)
    layer(torch.randn(1, 3, 8))
    assert calls == [("few-way", 3)]
    calls.clear()
    layer(torch.randn(1, 9, 8))  # a prompt: all rows the many way, its last row again the few way
    assert calls == [("many-way", 9), ("few-way", 1)]


def test_a_layer_with_one_way_runs_it_once():
    calls: list = []
    KERNELS["only-way"] = _recording("only-way", calls)
    try:
        linear = torch.nn.Linear(8, 4, bias=False)
        layer = TunedLinear(linear, ("only-way", linear.weight.detach()), ("only-way", linear.weight.detach()), few_rows=4)
        layer(torch.randn(9, 8))
        assert calls == [("only-way", 9)]
    finally:
        del KERNELS["only-way"]


def test_fbgemm_fp16_memory_counts_its_padding():
    # Measured: Gemma's 262144x640 output layer took 514 MB in fp16 (640 inputs packed as 1024).
    assert KERNELS["fp16-fbgemm"].megabytes(262144, 640) == pytest.approx(512.0)
    assert KERNELS["bf16-onednn"].megabytes(262144, 640) == pytest.approx(320.0)


@pytest.mark.parametrize("name", ["fp32-onednn", "bf16-onednn", "fp16-fbgemm"])
def test_a_whole_model_keeps_its_output(name):
    if not runnable(name):
        pytest.skip(f"{name} does not run on this CPU")
    from models.tuning import apply, linear_groups

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 300, (3, 17))
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        groups = linear_groups(model)
        apply(groups, {g.key: {"few": name, "many": name} for g in groups}, {}, release=False)
        after = model(input_ids=ids).logits
    assert all(isinstance(layer, TunedLinear) for g in groups for layer in [getattr(p, a) for p, a, _ in g.layers])
    assert torch.allclose(before, after, atol=TOLERANCE[name] * 20, rtol=TOLERANCE[name] * 20)


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise hints are Linux only")
def test_release_pages_drops_a_mapped_weight_from_memory_and_keeps_its_values(tmp_path):
    # A weight mapped from a file, as transformers maps safetensors: 64 MB of known values.
    path = tmp_path / "weight.bin"
    values = np.arange(16 * 2**20, dtype=np.float32) % 1000
    values.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="c")  # private, copy-on-write, like safetensors
    weight = torch.from_numpy(mapped)
    total = float(weight.sum())  # every page is read: resident now
    resident = _rss_file_kb()
    assert release_pages(weight)
    assert resident - _rss_file_kb() > 32 * 1024  # most of the 64 MB left the resident set
    assert float(weight.sum()) == total  # and read back from the file, unchanged


LEVELS_SCRIPT = """
import json, torch
from models.kernels import _int_mm_levels
levels = _int_mm_levels()
g = torch.Generator().manual_seed(1)
x = torch.randint(-127, 128, (64, 512), dtype=torch.int8, generator=g)
w = torch.randint(-levels, levels + 1, (256, 512), dtype=torch.int8, generator=g)
w[:, ::2] = levels  # pairs of large products, the case 16-bit sums saturate on
exact = x.to(torch.int32) @ w.to(torch.int32).t()
print(json.dumps({"levels": levels, "exact": bool(torch.equal(torch._int_mm(x, w.t()), exact))}))
"""


@pytest.mark.parametrize("cap", ["native", "avx2", "avx512-no-vnni"])
def test_int8_prompts_multiply_exactly_on_every_cpu_kind(cap):
    # Without VNNI, oneDNN sums int8 pairs in 16 bits, which saturate at full range (19 % off on
    # random int8 under an AVX2 cap): int8-smooth's weights are made as wide as this CPU
    # multiplies exactly, by asking it.
    caps = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
            "avx512-no-vnni": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}}
    env = dict(os.environ, PYTHONPATH=str(ROOT), **caps[cap])
    out = subprocess.run([sys.executable, "-c", LEVELS_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["exact"] and result["levels"] in (63, 127), result


def test_the_largest_logits_found_by_blocks_are_topks():
    from models.kernels import largest

    g = torch.Generator().manual_seed(1)
    for rows, width, k in [(1, 262144, 40), (3, 262144, 256), (2, 49152, 40), (3, 1000, 40)]:
        x = torch.randn(rows, width, generator=g) * 3
        x[0, :5000] = float("-inf")  # masked tokens, as sampling masks them
        x[-1, 64:96] += 20  # the largest crowded into one block
        expected = torch.topk(x, k, dim=-1)
        values, indices = largest(x, k)
        assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices), (rows, width, k)
