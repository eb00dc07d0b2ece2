"""The model steps of a Tab press as small plain functions (after gpt-fast's generate.py).

prefill -> (sample -> decode_step)*: the engine and the batching code call these and
nothing else of the model, so this file is all there is to read about what runs.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Run the prompt tokens through the model, filling ``cache``. Returns last-position logits [B, V]."""
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :]


@torch.inference_mode()
def decode_step(model, tokens: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """One token for each row: tokens [B] -> next-token logits [B, V]."""
    out = model(input_ids=tokens[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :]


@torch.inference_mode()
def sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from the top-k (then top-p) of ``logits`` [B, V].

    Returns (tokens [B], log-probabilities [B] of those tokens under the untempered model).
    """
    logits = logits.float()
    k = max(1, min(int(top_k), logits.shape[-1]))
    top_vals, top_idx = torch.topk(logits, k, dim=-1)
    probs = torch.softmax(top_vals / max(temperature, 1e-5), dim=-1)
    if top_p < 1.0:
        # Keep the smallest set of tokens whose mass reaches top_p (always at least one).
        cumulative = probs.cumsum(dim=-1)
        probs = probs.masked_fill(cumulative - probs > top_p, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(probs, 1, generator=generator)
    tokens = top_idx.gather(-1, choice).squeeze(-1)
    chosen = top_vals.gather(-1, choice).squeeze(-1)
    logprobs = chosen - torch.logsumexp(logits, dim=-1)
    return tokens, logprobs


def forbid_unlikely_stop(logits: torch.Tensor, rows: list[int], stop_ids: torch.Tensor) -> torch.Tensor:
    """Stop tokens made impossible in ``rows`` unless one of them is the model's first choice.

    A row that has said nothing yet and samples a rare end-of-text token would come back
    empty, and the writer would see two suggestions instead of three; a model that is sure
    the text ends here (its top token is a stop token) is still allowed to say so.
    """
    index = torch.tensor(rows, device=logits.device)
    picked = logits.index_select(0, index)
    stop_best = picked.index_select(1, stop_ids).max(dim=-1).values
    unlikely = stop_best < picked.max(dim=-1).values
    if bool(unlikely.any()):
        logits = logits.clone()
        masked_rows = index[unlikely]
        logits[masked_rows[:, None], stop_ids[None, :]] = float("-inf")
    return logits


def longest_common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
