"""Choosing how each matmul runs on this machine (models/tuning.py), on a tiny random Llama.

Fake ways are added to models.kernels.KERNELS for the tests: a slower exact one, a fast wrong
one, a fast one that is only slightly off, one that cannot be prepared on this CPU. The real
ways are exercised too, and once under an emulated AVX2 CPU in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from models import tuning
from models.kernels import KERNELS, Kernel, TunedLinear
from tests.unit.test_engine_logic import build_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    tok = build_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    return transformers.LlamaForCausalLM(config).eval(), tok


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _exact(x, w):
    return F.linear(x, w)


def _slow(x, w):
    time.sleep(0.02)  # far slower than a 64-wide matmul, even on a busy machine
    return F.linear(x, w)


def fake(name: str, run, precision: int = 0, prepare=None, available=lambda: True) -> Kernel:
    return Kernel(name, precision, 4, prepare or (lambda w, a=None: w.detach().clone()), run, available)


@pytest.fixture
def fakes(monkeypatch):
    """Register fake ways for one test."""
    def add(*kernels: Kernel) -> list[str]:
        for k in kernels:
            monkeypatch.setitem(KERNELS, k.name, k)
        return [k.name for k in kernels]
    return add


def chosen(t: tuning.Tuning) -> set[str]:
    return {c[r] for c in t.choice.values() for r in ("few", "many")}


def refusals(t: tuning.Tuning, name: str) -> list[str]:
    return [m["refused"] for found in t.measured.values() for m in found if m["kernel"] == name]


def test_a_slower_way_is_never_chosen(fakes):
    model, tok = tiny_model()
    names = fakes(fake("slow-exact", _slow))
    t = tuning.tune(model, tok, kernels=names + ["fp32"], say=lambda m: None)
    assert chosen(t) == {"fp32"}, json.dumps(t.choice)
    slow = [m for found in t.measured.values() for m in found if m["kernel"] == "slow-exact"]
    assert slow and all(not m["refused"] and m["few_ms"] > 1.0 for m in slow)


def test_the_timings_cache_flush_buffer_is_not_kept_once_the_choice_is_made(fakes):
    model, tok = tiny_model()
    names = fakes(fake("slow-exact", _slow))
    tuning._flush_cache()  # as the timing does: tens of MB, twice the CPU's last-level cache
    assert tuning._flush_buffer is not None
    tuning.tune(model, tok, kernels=names + ["fp32"], say=lambda m: None)
    assert tuning._flush_buffer is None


def test_a_fast_way_that_gives_wrong_numbers_is_refused(fakes):
    model, tok = tiny_model()
    names = fakes(fake("fast-wrong", lambda x, w: 1.5 * F.linear(x, w), precision=1), fake("slow-exact", _slow))
    t = tuning.tune(model, tok, kernels=names, say=lambda m: None)
    assert chosen(t) == {"slow-exact"}
    assert all("differs from fp32" in r for r in refusals(t, "fast-wrong"))


def test_a_way_slightly_off_in_each_layer_but_too_far_in_all_is_dropped_by_the_probe_check(fakes, monkeypatch):
    # 0.2 % off per layer passes the per-layer checks; with the whole-model limits made strict,
    # the probe text check must catch it and fall back to the exact way.
    monkeypatch.setattr(tuning, "PROBE_TOLERANCE_PCT", 1e-6)
    monkeypatch.setattr(tuning, "PROBE_TV", 1e-9)
    names = fakes(fake("off", lambda x, w: 1.002 * F.linear(x, w), precision=3), fake("slow-exact", _slow))
    model, tok = tiny_model()
    said: list[str] = []
    t = tuning.tune(model, tok, kernels=names, say=said.append)
    assert chosen(t) == {"slow-exact"}
    assert any("not using off" in s for s in said)
    assert not any(refusals(t, "off"))  # it passed the per-layer checks; the probe check dropped it
    assert all(layer.few_name == "slow-exact" for layer in model.modules() if isinstance(layer, TunedLinear))


def test_a_way_too_rough_for_decoding_runs_prompts_only(fakes):
    # 1 % off per layer: more than decode steps allow (FEW_TOLERANCE), less than prompts do.
    names = fakes(fake("rough", lambda x, w: 1.01 * F.linear(x, w), precision=4), fake("slow-exact", _slow))
    model, tok = tiny_model()
    t = tuning.tune(model, tok, kernels=names, say=lambda m: None)
    for key, c in t.choice.items():
        assert c["few"] == "slow-exact"
        assert c["many"] == ("slow-exact" if key.endswith("-output") else "rough")
    assert any("decode steps" in r for r in refusals(t, "rough"))  # the output layer: decode steps only


def test_a_way_this_cpu_cannot_prepare_or_run_is_refused_and_tuning_goes_on(fakes):
    def cannot(w, a=None):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx512bw, avx512vl and avx512dq")

    names = fakes(fake("no-prepare", _exact, prepare=cannot), fake("no-build", _exact, available=lambda: False))
    model, tok = tiny_model()
    t = tuning.tune(model, tok, kernels=names + ["fp32"], say=lambda m: None)
    assert chosen(t) == {"fp32"}, json.dumps(t.choice)
    assert all("avx512bw" in r for r in refusals(t, "no-prepare"))
    assert all("not available" in r for r in refusals(t, "no-build"))


def tune_with_the_real_ways() -> tuple[tuning.Tuning, float]:
    """Tune a tiny model with every real way; returns the choice and how far its logits moved."""
    model, tok = tiny_model()
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        t = tuning.tune(model, tok, say=lambda m: None)
        after = model(input_ids=ids).logits
    return t, float((after - before).norm() / before.norm())


def test_the_real_ways_choose_something_faithful():
    t, error = tune_with_the_real_ways()
    assert t.probe["worst_change_pct"] <= tuning.PROBE_TOLERANCE_PCT or chosen(t) <= {"fp32", "fp32-onednn"}
    assert error < 0.05
    assert "(decoding)" in t.describe()


def counted(monkeypatch, name: str) -> list[int]:
    """``tuning.<name>`` left as it is, each call also noted in the list returned."""
    calls: list[int] = []
    real = getattr(tuning, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tuning, name, counting)
    return calls


def test_the_choice_is_remembered_for_this_machine_and_made_again_on_another(tmp_path, monkeypatch, tok):
    runs = counted(monkeypatch, "tune")
    model, _ = tiny_model()
    first = tuning.tune_or_load(model, tok, tmp_path, "tiny", say=lambda m: None)
    saved = list(tmp_path.glob("tiny-*.json"))
    assert len(runs) == 1 and len(saved) == 1
    assert json.loads(saved[0].read_text())["fingerprint"] == tuning.cpu_fingerprint()
    again, _ = tiny_model()
    second = tuning.tune_or_load(again, tok, tmp_path, "tiny", say=lambda m: None)
    assert len(runs) == 1 and second.choice == first.choice  # the same machine: nothing measured
    assert any(isinstance(m, TunedLinear) for m in again.modules())
    # Another CPU (or the same one emulating another kind) measures again and keeps its own choice.
    other = dict(tuning.cpu_fingerprint(), flags=["sse4_2"])
    monkeypatch.setattr(tuning, "cpu_fingerprint", lambda: other)
    third, _ = tiny_model()
    tuning.tune_or_load(third, tok, tmp_path, "tiny", say=lambda m: None)
    assert len(runs) == 2 and len(list(tmp_path.glob("tiny-*.json"))) == 2


def test_the_probe_read_is_the_models_made_once_and_taken_by_every_machines_choice(tmp_path, monkeypatch, tok):
    reads = counted(monkeypatch, "read_probe")
    model, _ = tiny_model()
    first = tuning.tune_or_load(model, tok, tmp_path, "tiny", say=lambda m: None)
    saved = tuning.probe_path(tmp_path, "tiny")
    assert reads == [1] and saved.is_file()
    first_ranges = {n: first.absmax[id(m)] for n, m in model.named_modules() if id(m) in first.absmax}
    # Another CPU measures again, on the probe read the model made before: nothing read in fp32.
    other = dict(tuning.cpu_fingerprint(), flags=["sse4_2"])
    monkeypatch.setattr(tuning, "cpu_fingerprint", lambda: other)
    again, _ = tiny_model()
    second = tuning.tune_or_load(again, tok, tmp_path, "tiny", say=lambda m: None)
    assert reads == [1] and len(list(tmp_path.glob("tiny-*.json"))) == 2
    second_ranges = {n: second.absmax[id(m)] for n, m in again.named_modules() if id(m) in second.absmax}
    assert first_ranges.keys() == second_ranges.keys() and all(torch.equal(first_ranges[n], second_ranges[n]) for n in first_ranges)


def test_a_saved_probe_read_is_the_same_read_and_only_its_own_models(tmp_path, tok):
    model, _ = tiny_model()
    read = tuning.read_probe(model, tok)
    path = tmp_path / "p.pt"
    tuning.save_probe(read, model, path)
    same, _ = tiny_model()  # the same weights in another model object (another process's)
    loaded = tuning.load_probe(same, tok, path)
    assert loaded is not None
    assert all(torch.equal(a, b) for a, b in zip(read.reference, loaded.reference))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(read.drawn, loaded.drawn))
    assert read.inputs.keys() == loaded.inputs.keys() and all(torch.equal(read.inputs[k], loaded.inputs[k]) for k in read.inputs)
    names = {id(m): n for n, m in model.named_modules()}
    by_name = {names[k]: v for k, v in read.absmax.items()}
    assert {n: loaded.absmax[id(m)] for n, m in same.named_modules() if id(m) in loaded.absmax}.keys() == by_name.keys()
    # Another model's shapes, or a damaged file: not taken (read again by load_or_read_probe).
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    assert tuning.load_probe(transformers.LlamaForCausalLM(config).eval(), tok, path) is None
    path.write_bytes(b"damaged")
    assert tuning.load_probe(same, tok, path) is None
    # The tuning's own read of the same model checks the same numbers as the saved one.
    made = tuning.load_or_read_probe(same, tok, tmp_path, "other-key")
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(read.reference, made.reference))


def test_the_fingerprint_names_the_cpu_the_torch_and_what_caps_the_isa(monkeypatch):
    plain = tuning.cpu_fingerprint()
    assert plain["cpu"] and plain["torch"] == torch.__version__ and plain["tuner"] == tuning.TUNING_VERSION
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    capped = tuning.cpu_fingerprint()
    assert capped["env"]["ONEDNN_MAX_CPU_ISA"] == "AVX2" and tuning._digest(capped) != tuning._digest(plain)


def test_a_smaller_format_is_taken_where_the_weights_would_not_fit(monkeypatch):
    model, _ = tiny_model()
    groups = tuning.linear_groups(model)
    measured = {
        g.key: [tuning.Measured("fp32", few_ms=1.0, many_ms=1.0, batch_ms=1.0 if g.single else None),
                tuning.Measured("int8-weight", few_ms=2.0, many_ms=3.0, batch_ms=2.0 if g.single else None)]
        for g in groups
    }
    fastest = {g.key: {"few": "fp32", "many": "fp32"} for g in groups}
    monkeypatch.setattr(tuning, "WEIGHTS_BUDGET_MB", tuning.weight_mb(groups, fastest) / 2)
    fitted = tuning.within_budget(groups, measured, fastest)
    assert tuning.weight_mb(groups, fitted) <= tuning.WEIGHTS_BUDGET_MB
    assert "int8-weight" in {c["few"] for c in fitted.values()}


def test_prompts_take_the_decode_steps_way_where_it_is_as_fast_and_hold_no_second_copy():
    model, _ = tiny_model()
    groups = tuning.linear_groups(model)
    # fp32 is the more precise and within SPEED_TIE for prompts; fp16 is the faster for decode steps.
    measured = {g.key: [tuning.Measured("fp32", few_ms=2.0, many_ms=10.0, batch_ms=2.0 if g.single else None),
                        tuning.Measured("fp16-fbgemm", few_ms=1.0, many_ms=10.5, batch_ms=1.0 if g.single else None)]
                for g in groups}
    assert tuning.choose(measured[groups[0].key], "many") == "fp32"  # alone, the tie goes to the more precise
    choice = tuning.choice_without(groups, measured, set())
    assert all(c == {"few": "fp16-fbgemm", "many": "fp16-fbgemm"} for c in choice.values()), choice
    # Clearly faster for prompts (beyond SPEED_TIE), the other way is still taken.
    for g in groups:
        measured[g.key][0].many_ms = 5.0
    choice = tuning.choice_without(groups, measured, set())
    assert all(c["many"] == ("fp16-fbgemm" if key.endswith("-output") else "fp32") for key, c in choice.items()), choice


SCRIPT = """
import json
from tests.unit.test_tuning import tune_with_the_real_ways
t, error = tune_with_the_real_ways()
print(json.dumps({"choice": t.choice, "refused": {m["kernel"]: m["refused"] for f in t.measured.values() for m in f},
                  "error": error}))
"""


def test_under_an_emulated_avx2_cpu_every_way_falls_back_cleanly():
    # ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN's bf16 packing raise ("bf16 path needs ... avx512bw"):
    # the way is refused, the others measured, and the model still computes the same thing.
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2",
               FBGEMM_ENABLE_INSTRUCTIONS="AVX2", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["refused"]["bf16-onednn"], "oneDNN bf16 must be refused under an AVX2 cap"
    assert "bf16-onednn" not in {c[r] for c in result["choice"].values() for r in ("few", "many")}
    assert result["error"] < 0.05


def test_a_way_too_loose_in_one_shape_is_left_out_of_that_shape_only(fakes, monkeypatch):
    # Off only where the keys and values (32x64 here) are read as a prompt, exact elsewhere: with
    # the whole-model limits strict, the probe check must drop it from that one shape and use
    # only, not from the model (as int8 prompts' keys and values under an AVX2 cap).
    monkeypatch.setattr(tuning, "PROBE_TOLERANCE_PCT", 1e-6)
    monkeypatch.setattr(tuning, "PROBE_TV", 1e-9)
    monkeypatch.setattr(tuning, "SHAPE_TRIALS", 100)  # every one-shape change, whatever their order

    def off_in_kv_prompts(x, w):
        y = F.linear(x, w)
        return 1.002 * y if w.shape == (32, 64) and x.shape[0] > tuning.FEW_ROWS else y

    names = fakes(fake("off-kv", off_in_kv_prompts, precision=3), fake("slow-exact", _slow))
    model, tok = tiny_model()
    said: list[str] = []
    t = tuning.tune(model, tok, kernels=names, say=said.append)
    assert t.choice["32x64"] == {"few": "off-kv", "many": "slow-exact"}, json.dumps(t.choice)
    assert all(c == {"few": "off-kv", "many": "off-kv"} for k, c in t.choice.items() if k != "32x64"), json.dumps(t.choice)
    assert any("not using off-kv for 32x64 (prompts)" in s for s in said), said
    assert t.probe["worst_change_pct"] <= 1e-6


def test_one_shape_changes_come_loosest_first_and_within_the_weights_budget(monkeypatch):
    model, _ = tiny_model()
    groups = tuning.linear_groups(model)
    measured = {
        g.key: [tuning.Measured("fp32", few_ms=2.0, many_ms=1.2 * len(g.layers), batch_ms=2.0 if g.single else None),
                tuning.Measured("int8-smooth", many_ms=1.0, batch_ms=None),
                tuning.Measured("fp16-fbgemm", few_ms=1.0, many_ms=1.5 * len(g.layers), batch_ms=1.0 if g.single else None)]
        for g in groups
    }
    choice = {g.key: {"few": "fp16-fbgemm", "many": "fp16-fbgemm" if g.single else "int8-smooth"} for g in groups}
    for n, g in enumerate(groups):  # int8's layer error: largest in the last shape
        next(m for m in measured[g.key] if m.kernel == "int8-smooth").error = 0.01 * (n + 1)
    swaps = tuning.shape_swaps(groups, measured, choice)
    assert len(swaps) == 2 * len(groups) - 1  # each group's few and many; the output's once
    assert swaps[0][2] == f"int8-smooth for {groups[-1].key} (prompts)"  # the loosest first
    prompts = [c for c, _, what in swaps if what.startswith("int8-smooth")]
    assert len(prompts) == len(groups) - 1 and [w for _, _, w in swaps[: len(prompts)]] == [
        f"int8-smooth for {g.key} (prompts)" for g in reversed(groups) if not g.single]
    for cost, trial, what in swaps:
        changed = [(k, r) for k in choice for r in ("few", "many") if trial[k][r] != choice[k][r]]
        assert changed and len({k for k, _ in changed}) == 1 and what.split(" for ")[1].startswith(changed[0][0])
    # Prompts in fp32 beside fp16 decoding hold more than int8 prompts do: no room for that.
    monkeypatch.setattr(tuning, "WEIGHTS_BUDGET_MB", tuning.weight_mb(groups, choice))
    assert all("(prompts)" not in what for _, _, what in tuning.shape_swaps(groups, measured, choice))


def test_a_way_far_slower_on_one_call_is_checked_but_neither_made_whole_nor_timed(fakes):
    # A way for prompts only whose one call takes many times the best so far (int8-smooth's
    # `_int_mm` on an AVX2-only CPU: 30-60x fp16): one layer of each shape is made and checked,
    # and its time is that one call's, scaled to the group.
    made, calls = [], []

    def prepare(w, a=None):
        made.append(tuple(w.shape))
        return w.detach().clone()

    def run(x, w):
        calls.append(x.shape[0])
        return _slow(x, w)

    slow = Kernel("slow-prompts", 4, 4, prepare, run, many_rows_only=True)
    names = fakes(slow)
    model, tok = tiny_model()
    t = tuning.tune(model, tok, kernels=["fp32"] + names, say=lambda m: None)
    assert chosen(t) == {"fp32"}, json.dumps(t.choice)
    found = [m for f in t.measured.values() for m in f if m["kernel"] == "slow-prompts"]
    shapes = [key for key in t.measured if not key.endswith("-output")]  # the output layer: refused, prompts only
    timed = [m for m in found if not m["refused"]]
    assert len(timed) == len(shapes)
    assert all(m["error"] is not None and m["error"] < 1e-5 and m["many_ms"] > 1.0 for m in timed)  # checked; the one call's time
    assert len(made) == len(shapes)  # one layer of each shape, not the rest of its group
    assert calls.count(tuning.TIMED_MANY) == len(shapes)  # one call at a prompt's rows, then no timing
