"""One decode step written out by hand for the embedded models' architectures (Gemma 3, Llama).

A decode step of Gemma 3 270M at batch 3 spent ~18 ms of ~37 outside its matmuls: the
module calls, masks, rotary tables, cache bookkeeping and casts transformers' general code
makes per layer, ~100 small ops each. The same step as a plain function over the same
modules' weights (the TunedLinear layers, the norms' scales, the rotary frequencies) does
only the arithmetic. It is used for the batch decode steps (models/batching.py) while every
layer holds every token (below any sliding window), which is when the batch passes one
explicit mask; prompts, long batches and other architectures run through transformers.
tests/unit/test_decode.py checks it gives transformers' logits on tiny Gemma 3 and Llama models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.kernels import KERNELS, Int8Weight, TunedLinear


# A Linear as the step calls it: fp32 [rows, in] -> [rows, out].
Matmul = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _Layer:
    q: Matmul
    k: Matmul
    v: Matmul
    o: Matmul
    gate: Matmul
    up: Matmul
    down: Matmul
    norms: list[torch.Tensor]  # scales of: input, [q, k,] post-attention / pre-MLP, [pre-MLP, post-MLP]
    rope: int  # index into Plan.inv_freq
    # q, k and v in one call, and gate and up, where their weights could be joined (_joined);
    # then Gemma's q and k norms are one call too, with this scale [heads + kv_heads, head_dim]
    qkv: Matmul | None = None
    gate_up: Matmul | None = None
    qk_norm: torch.Tensor | None = None


@dataclass
class Plan:
    """What a decode step needs of a model, gathered once."""

    gemma: bool
    layers: list[_Layer]
    embed: nn.Module
    final_norm: torch.Tensor
    lm_head: Matmul
    inv_freq: list[torch.Tensor]
    rope_scaling: list[float]
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    eps: float
    softcap: float | None


def _scale(norm: nn.Module, gemma: bool) -> torch.Tensor:
    """The factor a norm multiplies by: Gemma's (1 + weight), Llama's weight; fp32."""
    fused = getattr(norm, "scale", None)  # models/fastnorm.py's FusedGemmaRMSNorm already holds 1 + weight
    if fused is not None:
        return fused
    weight = norm.weight.detach().float()
    return (1.0 + weight) if gemma else weight


def _direct(linear: nn.Module) -> Matmul:
    """``linear`` as the step calls it: a TunedLinear's plain function (TunedLinear.matmul)."""
    return linear.matmul() if isinstance(linear, TunedLinear) else linear


def _joined(linears: list[nn.Module]) -> Matmul | None:
    """One call for Linears that read the same input (q, k, v; gate, up), outputs side by side,
    where each runs its decode steps as int8-weight: their int8 rows stacked into one weight,
    and each layer left running a view of its part (the same values, no second copy).

    A decode step made ~200 small calls; each int8 matmul also casts its input to bf16 and its
    output back, and small ones read memory less well: 18 layers' seven int8 matmuls at 1 / 3 rows
    took 3.94 / 4.32 ms called one by one, 3.80 / 4.06 ms as four (EPYC), with the q, k and v
    rows the same bit for bit. Other ways (fbgemm's packed fp16, oneDNN's) run as they are."""
    if not all(isinstance(x, TunedLinear) and x.bias is None and x.few_name == "int8-weight"
               and isinstance(x.few_weight, Int8Weight) for x in linears):
        return None
    q = torch.cat([x.few_weight.q for x in linears])
    scale = torch.cat([x.few_weight.scale for x in linears])
    start = 0
    for x in linears:
        rows = x.few_weight.q.shape[0]
        x.few_weight = Int8Weight(q[start : start + rows], scale[start : start + rows])
        start += rows
    joined, run, few = Int8Weight(q, scale), KERNELS["int8-weight"].run, linears[0].few_rows

    def call(x: torch.Tensor) -> torch.Tensor:
        return run(x, joined) if x.shape[0] <= few else torch.cat([layer(x) for layer in linears], dim=-1)

    return call


def plan_for(model: nn.Module) -> Plan | None:
    """The plan for ``model``, or None where the step is not written out for its architecture."""
    cached = model.__dict__.get("_tabwrite_decode_plan", False)
    if cached is not False:
        return cached
    plan = None
    kind = getattr(model.config, "model_type", "")
    if kind in ("gemma3_text", "llama") and type(model).__name__ in ("Gemma3ForCausalLM", "LlamaForCausalLM"):
        plan = _build(model, kind == "gemma3_text")
    model.__dict__["_tabwrite_decode_plan"] = plan
    return plan


def _build(model: nn.Module, gemma: bool) -> Plan | None:
    config, inner = model.config, model.model
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return None
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return None
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if act != ("gelu_pytorch_tanh" if gemma else "silu"):
        return None
    rotary = inner.rotary_emb
    if gemma:
        types = sorted(set(config.layer_types))
        inv_freq = [getattr(rotary, f"{t}_inv_freq") for t in types]
        scaling = [float(getattr(rotary, f"{t}_attention_scaling")) for t in types]
        rope_of = [types.index(t) for t in config.layer_types]
    else:
        if getattr(rotary, "rope_type", "default") not in ("default", "llama3", "linear"):
            return None  # dynamic rope types change with the sequence
        inv_freq, scaling, rope_of = [rotary.inv_freq], [float(rotary.attention_scaling)], [0] * config.num_hidden_layers
    layers = []
    for i, layer in enumerate(inner.layers[: config.num_hidden_layers]):
        attn, mlp = layer.self_attn, layer.mlp
        norms = [_scale(layer.input_layernorm, gemma)]
        if gemma:
            norms += [_scale(attn.q_norm, gemma), _scale(attn.k_norm, gemma), _scale(layer.post_attention_layernorm, gemma),
                      _scale(layer.pre_feedforward_layernorm, gemma), _scale(layer.post_feedforward_layernorm, gemma)]
        else:
            norms += [_scale(layer.post_attention_layernorm, gemma)]
        qkv, gate_up = _joined([attn.q_proj, attn.k_proj, attn.v_proj]), _joined([mlp.gate_proj, mlp.up_proj])
        matmuls = [_direct(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
        qk_norm = None
        if qkv is not None and gemma:
            qk_norm = torch.cat([norms[1].expand(config.num_attention_heads, -1), norms[2].expand(config.num_key_value_heads, -1)])
        layers.append(_Layer(*matmuls, norms, rope_of[i], qkv, gate_up, qk_norm))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    scaling_attn = config.query_pre_attn_scalar ** -0.5 if gemma else head_dim ** -0.5
    return Plan(
        gemma, layers, inner.embed_tokens, _scale(inner.norm, gemma), _direct(model.lm_head), inv_freq, scaling,
        config.num_attention_heads, config.num_key_value_heads, head_dim, scaling_attn, float(config.rms_norm_eps),
        getattr(config, "final_logit_softcapping", None),
    )


def _norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), scale, eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1). The
    halves swapped by one roll and the minus moved into the sine (``signed_sin`` = (-sin1, sin2)):
    the same values bit for bit ((-a) * b == a * (-b)), in 4 ops instead of 7 (10.1 -> 6.4 us for
    a [3, 4, 256] query on an EPYC; 36 a step)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _gated(layer: _Layer, h: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The MLP's act(gate(h)) * up(h), from one call where gate and up are joined."""
    if layer.gate_up is None:
        return act(layer.gate(h)) * layer.up(h)
    both = layer.gate_up(h)
    half = both.shape[-1] // 2
    return act(both[:, :half]) * both[:, half:]


@torch.inference_mode()
def step(plan: Plan, cache, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One token for each row: tokens [B] at ``positions`` [B], attending where ``mask`` [B, 1, 1, W] is
    True (W: the cache's length plus this token). Appends to ``cache``; returns logits [B, V] (fp32)."""
    rows, eps = tokens.shape[0], plan.eps
    x = plan.embed(tokens).float()  # [B, H]; Gemma's embedding scales itself
    tables = []
    for inv_freq, scaling in zip(plan.inv_freq, plan.rope_scaling):
        freqs = positions[:, None].float() * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [B, 1, D]: broadcasts over heads
        sin = emb.sin() * scaling
        half = sin.shape[-1] // 2
        tables.append((emb.cos() * scaling, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)))
    group = plan.heads // plan.kv_heads
    for index, layer in enumerate(plan.layers):
        cos, sin = tables[layer.rope]
        h = _norm(x, layer.norms[0], eps)
        if layer.qkv is not None:  # q and k side by side as heads: normed and rotated together
            both = layer.qkv(h)
            width = (plan.heads + plan.kv_heads) * plan.head_dim
            qk = both[:, :width].view(rows, plan.heads + plan.kv_heads, plan.head_dim)
            v = both[:, width:].view(rows, plan.kv_heads, 1, plan.head_dim)
            if plan.gemma:  # the same values as each norm with its own scale (F.rms_norm scales last)
                qk = F.rms_norm(qk, (plan.head_dim,), None, eps) * layer.qk_norm
            qk = _rotate(qk, cos, sin)
            q, k = qk[:, : plan.heads], qk[:, plan.heads :]
        else:
            q = layer.q(h).view(rows, plan.heads, plan.head_dim)
            k = layer.k(h).view(rows, plan.kv_heads, plan.head_dim)
            v = layer.v(h).view(rows, plan.kv_heads, 1, plan.head_dim)
            if plan.gemma:
                q, k = _norm(q, layer.norms[1], eps), _norm(k, layer.norms[2], eps)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        keys, values = cache.update(k[:, :, None, :], v, index)
        # The heads that share a key/value head attend as that head's "queries" (no repeat_kv copy).
        out = F.scaled_dot_product_attention(
            q.view(rows, plan.kv_heads, group, plan.head_dim), keys, values, attn_mask=mask, scale=plan.scaling
        )
        attn = layer.o(out.reshape(rows, plan.heads * plan.head_dim))
        if plan.gemma:
            x = x + _norm(attn, layer.norms[3], eps)
            h = _norm(x, layer.norms[4], eps)
            x = x + _norm(layer.down(_gated(layer, h, _gelu_tanh)), layer.norms[5], eps)
        else:
            x = x + attn
            h = _norm(x, layer.norms[1], eps)
            x = x + layer.down(_gated(layer, h, F.silu))
    logits = plan.lm_head(_norm(x, plan.final_norm, eps)).float()
    if plan.softcap is not None:
        logits = torch.tanh(logits / plan.softcap) * plan.softcap
    return logits
