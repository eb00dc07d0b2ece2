"""The decode step written out (models/decode.py) gives transformers' logits; the batch's cache
grows in place (models/batching.GrowingCache) and holds what torch.cat would."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from models import decode
from models.kernels import KERNELS
from models.tuning import apply, linear_groups
from models.batching import BatchKV, GrowingCache
from models.steps import prefill
from tests.unit.test_batching import VOCAB, tiny


def batch(model, prompts: list[list[int]]) -> BatchKV:
    kv = BatchKV(model.config, limit=40)
    for prompt in prompts:
        cache = DynamicCache(config=model.config)
        prefill(model, torch.tensor([prompt]), cache)
        kv.add(cache, len(prompt), 2)
    return kv


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize("ways", [None, "fp16-fbgemm", "int8-weight"])  # int8-weight: q, k, v (and gate, up) joined
def test_the_written_out_step_gives_transformers_logits(kind, ways):
    model = tiny(kind)
    if ways is not None:  # the layers as the app runs them on a CPU (the step calls their way directly)
        if not KERNELS[ways].available():
            pytest.skip(f"{ways} is not in this torch build")
        groups = linear_groups(model)
        apply(groups, {g.key: {"few": ways, "many": "fp32"} for g in groups}, {}, release=False)
    plan = decode.plan_for(model)
    assert plan is not None
    assert all((layer.qkv is not None) == (ways == "int8-weight") for layer in plan.layers)
    if ways == "int8-weight":  # each layer runs a view of the joined weight: no second copy
        attn = model.model.layers[0].self_attn
        assert attn.k_proj.few_weight.q.untyped_storage().data_ptr() == attn.q_proj.few_weight.q.untyped_storage().data_ptr()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 11)]
    lean, general = batch(model, prompts), batch(model, prompts)
    fed = torch.randint(3, VOCAB, (8, 4), generator=g)
    for step in range(8):
        got = lean.step(model, fed[step])
        model.__dict__["_tabwrite_decode_plan"] = None  # transformers' forward for the other batch
        try:
            expected = general.step(model, fed[step])
        finally:
            del model.__dict__["_tabwrite_decode_plan"]
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (kind, step)
        if step == 4:  # a press's rows leave the batch
            lean.keep([0, 1])
            general.keep([0, 1])
            fed = fed[:, :2]


def test_other_architectures_have_no_written_out_step():
    assert decode.plan_for(tiny("gpt2")) is None


def test_the_cache_grows_in_place_and_holds_what_concatenation_would():
    model = tiny("llama")
    cache = DynamicCache(config=model.config)
    prefill(model, torch.tensor([[5, 6, 7, 8]]), cache)
    grown = GrowingCache.of(cache)
    keys = [torch.randn(1, 2, 1, 16) for _ in range(70)]
    expected = cache.layers[0].keys.clone()
    pointers = set()
    for k in keys:
        out, _ = grown.update(k, k, 0)
        expected = torch.cat([expected, k], dim=-2)
        assert torch.equal(out, expected)
        pointers.add(out.data_ptr())
    # 70 tokens with room for 64 more at a time: the buffer moved once, not on every token.
    assert len(pointers) == 2
    assert grown.get_seq_length(0) == 4 + 70


def test_a_sliding_window_layer_about_to_slide_is_left_to_transformers():
    model = tiny("gemma3")  # sliding window 48
    cache = DynamicCache(config=model.config)
    prefill(model, torch.tensor([list(range(3, 48))]), cache)  # 45 tokens
    grown = GrowingCache.of(cache)
    layer = grown.layers[0]
    assert layer.is_sliding
    reference = DynamicCache(config=model.config)
    prefill(model, torch.tensor([list(range(3, 48))]), reference)
    for n in range(5):
        k = torch.randn(1, 1, 1, 32)
        out, _ = grown.update(k, k, 0)
        expected, _ = reference.update(k, k, 0)
        assert torch.equal(out, expected), n  # in place below the window, transformers' way past it
    assert layer.keys.shape[-2] == 47 and layer.cumulative_length == 50  # window - 1 kept, 50 seen
