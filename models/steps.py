"""The model steps of a Tab press as small plain functions (after gpt-fast's generate.py).

prefill -> (sample -> decode_step)*, and read_hidden -> read_logits (or read_all) for the
perplexity view: the engine, the batching code and scoring call these and nothing else of the
model, so this file is all there is to read about what runs (decode_step hands Gemma 3 and
Llama to models/decode.py's step, written out).
"""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache

from models import decode
from models.kernels import largest


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Run the prompt tokens through the model, filling ``cache``. Returns last-position logits [B, V]."""
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :]


@torch.inference_mode()
def decode_step(
    model,
    tokens: torch.Tensor,
    cache: DynamicCache,
    positions: torch.Tensor | None = None,
    attention: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token for each row: tokens [B] -> next-token logits [B, V].

    ``positions`` [B]: each row's position (rows of a batch may be left-padded); ``attention``
    [B, 1, 1, width] (True = a real token), given when every layer holds every token: then
    Gemma 3 and Llama run the step written out (models/decode.py, ~8 ms a step less).
    """
    if attention is not None and positions is not None:
        plan = decode.plan_for(model)
        if plan is not None:
            return decode.step(plan, cache, tokens, positions, attention)
    out = model(
        input_ids=tokens[:, None],
        attention_mask=attention,
        position_ids=None if positions is None else positions[:, None],
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1, :]


@torch.inference_mode()
def follow_logprobs(model, cache: DynamicCache, heads: list[list[int]], then: list[int], blend=None,
                    before: list[int] = ()) -> torch.Tensor:
    """How likely ``then`` follows each of ``heads`` (a few tokens each) after the prompt in
    ``cache`` (batch 1, left unchanged): the summed log-probabilities [len(heads)] of ``then``.

    One forward over len(heads) rows on copies of the prompt's cache, shorter rows padded on
    the right (a causal model's earlier positions never see the padding). Writing in the
    middle: which opening does the text after the caret follow best? ``blend(logits, contexts)``
    (a learned style's text cache, models/textcache.py) changes each read position's logits,
    ``contexts`` being the tokens before it (``before``, the prompt's last ones, then the row's).
    """
    width = max(len(head) for head in heads) + len(then)
    rows = [head + list(then) for head in heads]
    ids = torch.tensor([row + [row[-1]] * (width - len(row)) for row in rows], device=cache.layers[0].keys.device)
    branch = copy.deepcopy(cache)
    branch.batch_repeat_interleave(len(heads))
    logits = model(input_ids=ids, past_key_values=branch, use_cache=True).logits
    # then[j] after row r is predicted at position len(head) - 1 + j: only those are read
    at = [(r, len(head) - 1 + j) for r, head in enumerate(heads) for j in range(len(then))]
    read = logits[[r for r, _ in at], [j for _, j in at]].float()
    if blend is not None:
        read = blend(read, [list(before) + rows[r][: j + 1] for r, j in at])
    wanted = torch.tensor(list(then) * len(heads), device=read.device)
    return logprobs_of(read, wanted).view(len(heads), len(then)).sum(dim=1)


@torch.inference_mode()
def read_all(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits at every position of one text, no cache (scoring): input_ids [1, T] -> [T, V] in fp32."""
    return model(input_ids=input_ids).logits[0].float()


@torch.inference_mode()
def read_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The last hidden state at every position of one text, before the output layer (scoring
    in bounded memory): input_ids [1, T] -> [T, hidden]. read_logits turns rows of it into
    logits; together they give read_all's result without its [T, V] tensor."""
    return model.base_model(input_ids=input_ids).last_hidden_state[0]


@torch.inference_mode()
def read_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of rows of read_hidden's result: hidden [n, hidden] -> [n, V] in fp32, with the
    final logit soft-capping where the model has one (Gemma 2; transformers' own order of operations)."""
    logits = model.get_output_embeddings()(hidden[None])[0]
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = logits / cap
        logits = torch.tanh(logits)
        logits = logits * cap
    return logits.float()


def sampling_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What sample() draws from: the top-k of ``logits`` [B, V] at ``temperature``, then the
    smallest set of them whose mass reaches top_p (always at least one), renormalised.

    Returns (token ids [B, k], probabilities [B, k]; zero outside the top-p set).
    """
    logits = logits.float()
    k = max(1, min(int(top_k), logits.shape[-1]))
    top_vals, top_idx = largest(logits, k)
    probs = torch.softmax(top_vals / max(temperature, 1e-5), dim=-1)
    if top_p < 1.0:
        cumulative = probs.cumsum(dim=-1)
        probs = probs.masked_fill(cumulative - probs > top_p, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return top_idx, probs


@torch.inference_mode()
def sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from sampling_distribution(``logits`` [B, V]).

    Returns (tokens [B], log-probabilities [B] of those tokens under the untempered model).
    """
    logits = logits.float()
    top_idx, probs = sampling_distribution(logits, temperature, top_k, top_p)
    choice = torch.multinomial(probs, 1, generator=generator)
    tokens = top_idx.gather(-1, choice).squeeze(-1)
    return tokens, logprobs_of(logits, tokens)


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(``tokens`` [B]) under ``logits`` [B, V] (untempered): each row's log-probability of its token.

    log_softmax's one fused pass, not the token's logit less logsumexp: for Gemma's 262,144
    logits 0.12-0.24 against 0.23-0.64 ms for 1-3 rows (EPYC), once a step; capped to AVX2
    0.17 against 0.14-0.16 at 1 row, 0.18 against 0.24-0.30 at 2, about even at 3. The same
    to ~3e-5 nats."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, None]).squeeze(-1)


def total_variation(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], vocab: int) -> torch.Tensor:
    """Total variation distance [B] between two sampling_distribution() results over ``vocab`` tokens."""
    dense = torch.zeros(a[0].shape[0], vocab)
    dense.scatter_add_(1, a[0], a[1])
    dense.scatter_add_(1, b[0], -b[1])
    return 0.5 * dense.abs().sum(dim=-1)


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
