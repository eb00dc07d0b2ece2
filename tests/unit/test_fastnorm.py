"""The fused Gemma RMSNorm gives exactly the numbers of the norm it replaces."""

from __future__ import annotations

import pytest
import torch
import transformers

from models.fastnorm import FusedGemmaRMSNorm, fuse_norms


def tiny_gemma3(dtype):
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=48, max_position_embeddings=256,
        layer_types=["sliding_attention", "full_attention"],
    )
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)  # Gemma's norms start at zero weight (a scale of 1): make them matter
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norms_leave_every_logit_unchanged(dtype):
    model = tiny_gemma3(dtype)
    ids = torch.randint(0, 300, (2, 23))
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        swapped = fuse_norms(model)
        after = model(input_ids=ids).logits
    # Six norms a layer (q, k, and four around attention and the MLP) and the final one.
    assert swapped == 2 * 6 + 1
    assert sum(isinstance(m, FusedGemmaRMSNorm) for m in model.modules()) == swapped
    assert torch.equal(before, after)
    # Swapped in inference mode, the model still runs with autograd on (as the benchmark scores text).
    assert torch.equal(model(input_ids=ids).logits.detach(), after)


def test_other_norms_are_left_alone():
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    assert fuse_norms(model) == 0
    assert not any(isinstance(m, FusedGemmaRMSNorm) for m in model.modules())
