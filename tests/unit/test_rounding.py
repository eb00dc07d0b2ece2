"""GPTQ's int8 rounding (models/rounding.py) and how the tuning takes it (models/tuning.py).

On a tiny random Llama and random matrices: the rounding must lower a layer's error on inputs
like those it was calibrated on, be kept once per model on disk, reach only the layers it was
made for, and let int8 into decode steps only where it exists.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F

from models import rounding, tuning
from models.kernels import KERNELS, Kernel, TunedLinear, quantize_int8
from tests.unit.test_tuning import _slow, chosen, fake, fakes, tiny_model  # noqa: F401  (fakes: a fixture)
from tests.unit.test_engine_logic import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def correlated_inputs(n: int, width: int, seed: int) -> torch.Tensor:
    """Rows whose channels co-vary, as a transformer's activations do (random ones would not):
    one fixed structure per width, new rows for each ``seed``."""
    fixed = torch.Generator().manual_seed(width)
    basis = torch.randn(8, width, generator=fixed)
    mix = torch.randn(width, width, generator=fixed) / width**0.5 + torch.eye(width)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g) @ basis + 0.3 * torch.randn(n, width, generator=g) @ mix


def test_gptq_rounds_closer_than_nearest_on_inputs_like_the_calibration():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 48, 64, generator=g)
    x = correlated_inputs(512, 64, 1)
    h = (x.T @ x).expand(2, 64, 64).contiguous()
    got = rounding.gptq(w, h)
    test = correlated_inputs(256, 64, 2)  # new rows from the same kind of inputs
    for i in range(2):
        nearest = quantize_int8(w[i])
        assert torch.equal(got.scale[i], nearest.scale)  # the same scales: only the rounding differs
        assert got.q.dtype == torch.int8 and int(got.q.abs().max()) <= rounding.LEVELS
        exact = test @ w[i].T
        err_gptq = float((test @ (got.q[i].float() * got.scale[i][:, None]).T - exact).norm())
        err_nearest = float((test @ (nearest.q.float() * nearest.scale[:, None]).T - exact).norm())
        assert err_gptq < 0.8 * err_nearest, (err_gptq, err_nearest)


def test_an_input_that_is_always_zero_does_not_break_the_rounding():
    w = torch.randn(1, 8, 16)
    x = correlated_inputs(64, 16, 3)
    x[:, 5] = 0
    got = rounding.gptq(w, (x.T @ x)[None])
    assert torch.isfinite(got.scale).all() and int(got.q.abs().max()) <= rounding.LEVELS


def test_the_hessians_are_each_layers_inputs_and_shared_where_the_input_is(tok):
    model, _ = tiny_model()
    layers = rounding.body_linears(model)
    assert model.lm_head not in layers.values() and len(layers) == 2 * 7
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.setdefault(n, []).append(args[0].reshape(-1, args[0].shape[-1])))
               for n, m in layers.items()]
    sums = rounding.hessians(model, tok, layers, ["The quick brown fox jumps over the lazy dog. " * 8])
    for h in handles:
        h.remove()
    q, k, v = (f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    assert sums[q] is sums[k] is sums[v]  # one tensor, summed once
    gate, up = "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"
    assert sums[gate] is sums[up] and sums[gate] is not sums[q]
    down = "model.layers.1.mlp.down_proj"
    x = torch.cat(seen[down]).float()
    assert torch.allclose(sums[down], x.T @ x, rtol=1e-4, atol=1e-3)


def test_the_rounding_is_made_once_per_model_and_kept_on_disk(tmp_path, monkeypatch, tok):
    monkeypatch.setenv("TABWRITE_CACHE", str(tmp_path))
    made: list[int] = []
    real = rounding.round_model
    monkeypatch.setattr(rounding, "round_model", lambda *a, **k: made.append(1) or real(*a, **k))
    model, _ = tiny_model()
    first = rounding.load_or_make(model, tok, "tiny", say=lambda m: None)
    assert made == [1] and rounding.path_for("tiny").is_file()
    again = rounding.load_or_make(model, tok, "tiny", say=lambda m: None)
    assert made == [1] and set(again) == set(first)
    assert all(torch.equal(again[n].q, first[n].q) and torch.equal(again[n].scale, first[n].scale) for n in first)
    rounding.path_for("tiny").write_bytes(b"damaged")
    rounding.load_or_make(model, tok, "tiny", say=lambda m: None)
    assert made == [1, 1]  # made again, not read


def test_the_rounding_reaches_only_the_layers_it_was_made_for(tok):
    model, _ = tiny_model()
    table = {n: quantize_int8(m.weight.detach()) for n, m in rounding.body_linears(model).items()}
    mine = rounding.by_layer(model, table)
    assert set(mine) == {id(m) for m in rounding.body_linears(model).values()}
    other, _ = tiny_model(seed=1)  # the same names (as a learned style has), other weights
    assert not set(rounding.by_layer(model, table)) & {id(m) for m in other.modules()}


def _exact_fast(x, w):
    return F.linear(x, w)


def rounded_fake(name: str, got: list, off: float = 1.0) -> Kernel:
    """A way that takes the rounding: records what it was given; ``off``: how far its output is."""
    def prepare(w, a=None, r=None):
        got.append(r)
        return w.detach().clone()
    return Kernel(name, 3, 1, prepare, lambda x, w: off * F.linear(x, w), few_rows_only=True, rounded=True)


def test_a_way_that_takes_the_rounding_gets_each_layers_own(fakes, tok):  # noqa: F811
    got: list = []
    names = fakes(rounded_fake("takes-rounding", got), fake("slow-exact", _slow))
    model, _ = tiny_model()
    table = {id(m): quantize_int8(m.weight.detach()) for m in rounding.body_linears(model).values()}
    tuning.tune(model, tok, kernels=names, say=lambda m: None, rounded=lambda layer: table.get(id(layer)))
    given = [r for r in got if r is not None]
    assert given and all(any(r is t for t in table.values()) for r in given)
    assert len({id(r) for r in given}) == len(table)  # every body layer, each its own
    got.clear()
    model, _ = tiny_model()
    tuning.tune(model, tok, kernels=names, say=lambda m: None)  # no rounding: None for every layer
    assert got and all(r is None for r in got)


def test_a_rounded_way_enters_decode_steps_only_where_there_is_a_rounding(fakes, tok):  # noqa: F811
    # 1 % off: over FEW_TOLERANCE, within ROUNDED_FEW_TOLERANCE.
    assert tuning.FEW_TOLERANCE < 0.01 < tuning.ROUNDED_FEW_TOLERANCE
    names = fakes(rounded_fake("rough-rounded", [], off=1.01), fake("slow-exact", _slow))
    model, _ = tiny_model()
    table = {id(m): quantize_int8(m.weight.detach()) for m in rounding.body_linears(model).values()}
    with_rounding = tuning.tune(model, tok, kernels=names, say=lambda m: None, rounded=lambda layer: table.get(id(layer)))
    body = {k: c for k, c in with_rounding.choice.items() if not k.endswith("-output")}
    assert all(c["few"] == "rough-rounded" for c in body.values()), json.dumps(with_rounding.choice)
    model, _ = tiny_model()
    without = tuning.tune(model, tok, kernels=names, say=lambda m: None)
    assert all(c["few"] == "slow-exact" for c in without.choice.values()), json.dumps(without.choice)


def test_a_model_the_rounding_was_not_made_for_takes_the_next_best_way():
    t = tuning.Tuning({}, {"64x64": {"few": "int8-weight", "many": "int8-smooth"}}, {"64x64": [
        vars(tuning.Measured("int8-weight", few_ms=1.0)), vars(tuning.Measured("fp16-fbgemm", few_ms=1.5, many_ms=3.0)),
        vars(tuning.Measured("int8-smooth", many_ms=1.0)), vars(tuning.Measured("fp32", few_ms=4.0, many_ms=4.0)),
    ]})
    assert KERNELS["int8-weight"].rounded
    assert tuning.unrounded(t) == {"64x64": {"few": "fp16-fbgemm", "many": "int8-smooth"}}
    assert t.choice["64x64"]["few"] == "int8-weight"  # the base model's own choice is left as it was


def test_a_rounded_way_is_chosen_only_where_it_is_clearly_faster():
    def measured(rounded_ms: float) -> list:
        return [tuning.Measured("fp16-fbgemm", few_ms=1.0), tuning.Measured("int8-weight", few_ms=rounded_ms),
                tuning.Measured("fp32", few_ms=4.0)]

    # 12 % faster than fp16 would pass SPEED_TIE, but not the rounded way's margin
    assert tuning.choose(measured(1.0 / 1.12), "few") == "fp16-fbgemm"
    assert tuning.choose(measured(1.0 / (1 + tuning.ROUNDED_SPEED_TIE) - 0.01), "few") == "int8-weight"
    assert tuning.choose(measured(0.5), "few", {"fp16-fbgemm"}) == "int8-weight"  # against fp32 (4 ms)
    assert tuning.ROUNDED_SPEED_TIE > tuning.SPEED_TIE


def test_the_rounding_is_made_once_and_only_where_the_way_would_win(fakes, tok):  # noqa: F811
    asked: list[int] = []

    def rounding():
        asked.append(1)
        return {}

    def slow_rounded(x, w):
        time.sleep(0.03)
        return F.linear(x, w)

    slow = Kernel("slow-rounded", 3, 1, lambda w, a=None, r=None: w.detach().clone(), slow_rounded, few_rows_only=True, rounded=True)
    names = fakes(slow, fake("exact", _exact_fast))
    model, _ = tiny_model()
    t = tuning.tune(model, tok, kernels=names, say=lambda m: None, rounded=tuning._rounded(rounding))
    body = [m["refused"] for key, found in t.measured.items() if not key.endswith("-output") for m in found if m["kernel"] == "slow-rounded"]
    assert asked == [] and body and all("not rounded" in r for r in body), body
    names = fakes(rounded_fake("fast-rounded", []), fake("slow-exact", _slow))
    model, _ = tiny_model()
    tuning.tune(model, tok, kernels=names, say=lambda m: None, rounded=tuning._rounded(rounding))
    assert asked == [1]  # once for the whole model, however many shapes


def test_side_by_side_timing_takes_turns_but_not_with_a_far_slower_candidate():
    calls = {"slow": 0, "fast": 0, "other": 0}

    def counted(name, sleep=0.0):
        def run():
            calls[name] += 1
            time.sleep(sleep)
        return run

    times = tuning._timed_side_by_side([counted("fast"), counted("other")], pairs=4)
    assert calls == {"slow": 0, "fast": 5, "other": 5} and len(times) == 2  # one first call, then 4 turns each
    times = tuning._timed_side_by_side([counted("slow", 0.05), counted("fast")], pairs=4)
    assert calls["slow"] == 1 and calls["fast"] == 6 and times[0] > times[1]  # one call was enough


def test_a_rounded_way_is_timed_side_by_side_with_the_way_it_would_replace(fakes, tok):  # noqa: F811
    # The machine drifts: the rival ran slow while it was timed alone (30 ms a call), and as fast
    # as it is once the rounded way is timed. Timed apart, the rounded way (1 ms) looked 30 times
    # faster; side by side it is the slower one, and is not rounded nor chosen.
    drifting = [True]

    def rival(x, w):
        if drifting[0]:
            time.sleep(0.03)
        return F.linear(x, w)

    def rival_prepare(w, a=None, r=None):
        drifting[0] = True  # each shape's rival is timed alone slow
        return w.detach().clone()

    def rounded_prepare(w, a=None, r=None):
        drifting[0] = False
        return w.detach().clone()

    def rounded_run(x, w):
        time.sleep(0.001)
        return F.linear(x, w)

    asked: list[int] = []
    names = fakes(Kernel("drifting-exact", 1, 2, rival_prepare, rival),
                  Kernel("late-rounded", 3, 1, rounded_prepare, rounded_run, few_rows_only=True, rounded=True))
    model, _ = tiny_model()
    t = tuning.tune(model, tok, kernels=names, say=lambda m: None, rounded=tuning._rounded(lambda: asked.append(1) or {}))
    body = {key: found for key, found in t.measured.items() if not key.endswith("-output")}
    for key, found in body.items():
        mine = next(m for m in found if m["kernel"] == "late-rounded")
        theirs = next(m for m in found if m["kernel"] == "drifting-exact")
        assert "not rounded" in mine["refused"] and mine["few_ms"] > theirs["few_ms"], found
        assert t.choice[key]["few"] == "drifting-exact"
    assert asked == []


def test_a_later_start_reads_the_rounding_only_where_its_choice_uses_it(tmp_path, fakes, tok, monkeypatch):  # noqa: F811
    names = fakes(rounded_fake("fast-rounded", []), fake("slow-exact", _slow))
    monkeypatch.setattr(tuning, "KERNELS", {n: KERNELS[n] for n in names})  # the fakes only
    asked: list[int] = []

    def rounding():
        asked.append(1)
        return {}

    model, _ = tiny_model()
    first = tuning.tune_or_load(model, tok, tmp_path, "tiny", say=lambda m: None, rounding=rounding)
    assert asked == [1] and "fast-rounded" in chosen(first)
    model, _ = tiny_model()
    tuning.tune_or_load(model, tok, tmp_path, "tiny", say=lambda m: None, rounding=rounding)
    assert asked == [1, 1]  # the choice takes it: read again
    saved = next(tmp_path.glob("tiny-*.json"))
    data = json.loads(saved.read_text())
    data["choice"] = {k: {"few": "slow-exact", "many": "slow-exact"} for k in data["choice"]}
    saved.write_text(json.dumps(data))
    model, _ = tiny_model()
    tuning.tune_or_load(model, tok, tmp_path, "tiny", say=lambda m: None, rounding=rounding)
    assert asked == [1, 1]  # a choice without it never asks
    assert any(isinstance(m, TunedLinear) for m in model.modules())
