"""Pre-packed oneDNN linears compute the same thing as the layers they replace."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import transformers

from models.fastlinear import PackedLinear, _packed_available, pack_fastest, release_pages


@pytest.mark.skipif(not _packed_available(), reason="this torch build has no oneDNN linear")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packing_keeps_the_model_output(dtype):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    ids = torch.randint(0, 300, (3, 17))
    with torch.inference_mode():
        before = model(input_ids=ids).logits.float()
        report = pack_fastest(model, min_gain=0.0, budget_mb=1e6)  # pack every shape that checks out
        after = model(input_ids=ids).logits.float()
    assert report and all(used for _, _, used in report.values())
    assert any(isinstance(m, PackedLinear) for m in model.modules())
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    assert torch.allclose(before, after, atol=tolerance, rtol=tolerance)


def test_a_layer_that_is_not_faster_is_left_alone():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()
    pack_fastest(model, min_gain=1e9)  # nothing can be a billion times faster
    assert type(model[0]) is torch.nn.Linear


@pytest.mark.skipif(not _packed_available(), reason="this torch build has no oneDNN linear")
def test_the_memory_budget_limits_packing():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32)).eval()
    pack_fastest(model, min_gain=0.0, budget_mb=0.0)
    assert all(type(m) is torch.nn.Linear for m in model)


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
