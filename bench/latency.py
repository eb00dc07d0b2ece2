"""Tab-press latency of the suggestion engine against its peers on equal work, side by side.

    python -m bench.latency --json            # default model, prints one JSON object
    python -m bench.latency --model smollm2-135m --runs 7

Each run interleaves the compared ways of answering the same Tab press (same ~200-token
prompt, model and settings: 3 rows of 4/12/32 tokens), so machine noise hits them alike:
- engine, cold: the engine with its prefix cache emptied (Tab right after pasting text);
- engine, plain sampling: the same cold press with the rows' distinct openings off (the
  engine before issue 12), to show what choosing them costs;
- engine, repeat: the same Tab again (prefix already cached, as after a pause or Tab again);
- engine, typed: Tab after typing a few more words onto a cached text (only they are prefilled);
- engine, pre-computed: the editor's path when the writer paused before Tab (the service
  pre-computed the suggestions; the Tab is answered from that result);
- llama.cpp on the same GGUF (when `llama_cpp` is importable; tests/requirements.txt builds
  it), batched: the 3 rows decoded together, one llama_decode a step, sharing the prompt's KV
  cache (bench/peers.py); and sequential: the rows one after another;
- naive `model.generate` on fp32 weights, one call per row.
Every peer is cold (its prompt evaluated from scratch) and generates, row by row, exactly as
many tokens as the engine's rows sampled in that run, with the engine's sampler (temperature,
top-k, then top-p; no min_p): the ratios compare equal work.

The JSON names the CPU (`cpu_model`, `cpu_flags`, and the `isa_env` variables that emulate
another kind), and what the engine chose for it (`engine_kernels`: per weight shape, the way
it runs a few rows and many). Quality: bench/fidelity.py on held-out English and Chinese.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

import torch

from bench import fidelity
from bench.peers import load_llama_cpp_batched
from bench.stats import memory_mb, percentile
from editor.service import SuggestService
from models import scheduler
from models.registry import DEFAULT_MODEL
from models.settings import Settings
from models.tuning import cpu_fingerprint, run_exactly, linear_groups

FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def rss_mb() -> float:
    return memory_mb("VmRSS")["VmRSS"]


def cpu_description() -> dict:
    fingerprint = cpu_fingerprint()
    flags = set(fingerprint["flags"])
    return {
        "cpu_model": fingerprint["cpu"],
        "cpu_flags": {f: f in flags for f in FLAGS},
        "isa_env": fingerprint["env"],  # set when emulating another CPU kind (README: Performance)
        "torch_cpu_capability": fingerprint["capability"],
    }


@torch.inference_mode()
def as_the_app_runs(engine, presses):
    """Run ``presses()`` (calls into the engine) the way app.py serves Tab presses.

    They come from another thread while this, the main thread that loaded the model, is the
    engine's worker (``SuggestionEngine.serve``); the peers run on this thread too.
    """
    stop, box = threading.Event(), {}

    def client():
        try:
            box["value"] = presses()
        except BaseException as e:  # noqa: BLE001 - raised again below
            box["error"] = e
        finally:
            stop.set()

    thread = threading.Thread(target=client)
    thread.start()
    engine.serve(stop)
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


@torch.inference_mode()
def naive_generate(model, tokenizer, prompt: str, settings: Settings, row_tokens: list[int], seed: int) -> float:
    """`generate` as a newcomer would call it, once per row, each row exactly its token count."""
    inputs = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(seed)
    started = time.perf_counter()
    for count in row_tokens:
        model.generate(
            **inputs, do_sample=True, max_new_tokens=count, min_new_tokens=count,
            temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
        )
    return time.perf_counter() - started


def ms(values, q: float | None = None) -> int | None:
    if not values:
        return None
    return round(1000 * (statistics.median(values) if q is None else percentile(values, q)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--no-naive", action="store_true", help="skip naive generate (slow: ~10 s a run)")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    args = parser.parse_args()
    torch.manual_seed(0)

    started = time.perf_counter()
    service = SuggestService(args.model)
    engine = service.engine()
    load_s = time.perf_counter() - started
    loaded = engine.loaded
    text = fidelity.HELDOUT.read_text(encoding="utf-8")
    prompt = text[:900]  # about 200 tokens of English
    # Fixed lengths so every press asks for the same: 3 rows, the longest 32 tokens.
    settings = Settings(lengths=[4, 12, 32], max_time=30.0)
    prompt_tokens = len(engine.prompt_ids(prompt, settings.context_tokens)[0])
    service.update_settings("bench", args.model, settings.to_dict())

    as_the_app_runs(engine, lambda: engine.suggest(prompt, settings, seed=0))  # warm-up
    steady_rss = rss_mb()  # the engine as the app holds it, before the peers are loaded
    fp32 = type(loaded.model).from_pretrained(loaded.model.name_or_path, dtype=torch.float32).eval()
    llm = load_llama_cpp_batched(args.model, torch.get_num_threads())
    warm = [4, 12, 32]
    if not args.no_naive:
        naive_generate(fp32, loaded.tokenizer, prompt, settings, [4], 0)
    if llm is not None:
        llm.press(prompt, warm, settings.temperature, settings.top_k, settings.top_p, 0)
    # The engine gives its heap back at once after a press only where its process holds more than
    # TRIM_AT_ONCE_ABOVE_MB (models/scheduler.py); here the process also holds the peers (the fp32
    # model, llama.cpp's), which would put it over that line at every press, also where the app
    # alone stays under it. Given back at once, presses took 536 against 514 ms kept, the first
    # suggestion 292 against 269 (AMD EPYC, 2 cores, 2026-12-08, 30 presses each way,
    # alternating). So the line moves up by what the peers hold: the engine decides as in the app.
    scheduler.TRIM_AT_ONCE_ABOVE_MB += max(0.0, rss_mb() - steady_rss)
    cold, first, per_step, row_tokens = [], [], [], []
    repeat, typed, typed_first, prefetched = [], [], [], []
    plain_cold, plain_first, plain_tokens = [], [], []
    naive, batched, batched_first, sequential, sequential_first, peer_tokens = [], [], [], [], [], []

    def engine_presses(run: int) -> None:
        engine.prefixes.clear()  # Tab right after the text changed
        result = engine.suggest(prompt, settings, seed=run)
        cold.append(result.elapsed_s)
        first.append(result.first_ready_s or result.elapsed_s)
        per_step.append(result.elapsed_s / max(1, result.steps))
        row_tokens.append(list(result.row_tokens))
        # The same cold press with plain sampling (the rows' openings not chosen: before issue 12),
        # to see what choosing the distinct openings costs, side by side.
        engine.prefixes.clear()
        engine.distinct_openings = False
        try:
            plain = engine.suggest(prompt, settings, seed=run)
        finally:
            engine.distinct_openings = True
        plain_cold.append(plain.elapsed_s)
        plain_first.append(plain.first_ready_s or plain.elapsed_s)
        plain_tokens.append(sum(plain.row_tokens))
        repeat.append(engine.suggest(prompt, settings, seed=run + 100).elapsed_s)
        typed_on = engine.suggest(prompt + " and then, a little later,", settings, seed=run + 200)
        typed.append(typed_on.elapsed_s)
        typed_first.append(typed_on.first_ready_s or typed_on.elapsed_s)
        service.suggest_for_session("bench", prompt + f" {run}", prefetch=True)  # during the pause
        tab = time.perf_counter()
        answer = service.suggest_for_session("bench", prompt + f" {run}")  # the Tab
        assert answer["from_cache"], answer
        prefetched.append(time.perf_counter() - tab)

    for run in range(args.runs):
        as_the_app_runs(engine, lambda: engine_presses(run))
        counts = [max(1, n) for n in row_tokens[-1]]
        if llm is not None:
            b = llm.press(prompt, counts, settings.temperature, settings.top_k, settings.top_p, run)
            s = llm.sequential_press(prompt, counts, settings.temperature, settings.top_k, settings.top_p, run)
            batched.append(b["elapsed_s"])
            batched_first.append(b["first_s"])
            sequential.append(s["elapsed_s"])
            sequential_first.append(s["first_s"])
            peer_tokens.append(sum(b["tokens"]))
        if not args.no_naive:
            naive.append(naive_generate(fp32, loaded.tokenizer, prompt, settings, counts, run))
    if llm is not None:
        llm.close()

    # Quality: the same model in fp32 (run through oneDNN where it can: the same numbers, faster).
    run_exactly(linear_groups(fp32))
    quality = {lang: fidelity.compare(loaded.model, fp32, loaded.tokenizer, lang) for lang in ("en", "zh")}
    del fp32
    tuning = loaded.tuning
    out = {
        "model": loaded.name,
        **cpu_description(),
        "threads": torch.get_num_threads(),
        "device": loaded.device.type,
        "engine_weights": loaded.weights,
        "engine_kernels": getattr(tuning, "choice", None),
        "tuning_seconds": getattr(tuning, "seconds", None),  # at this machine's first start (cached since)
        "load_s": round(load_s, 2),
        "runs": args.runs,
        "prompt_tokens": prompt_tokens,
        "engine_tokens_per_press": round(statistics.mean(sum(r) for r in row_tokens), 1),
        "engine_row_tokens_mean": [round(statistics.mean(r[i] for r in row_tokens), 1) for i in range(len(row_tokens[0]))],
        "engine_p50_ms": ms(cold),
        "engine_p90_ms": ms(cold, 0.9),
        "first_suggestion_p50_ms": ms(first),
        "repeat_tab_p50_ms": ms(repeat),
        "typed_tab_p50_ms": ms(typed),
        "typed_tab_first_suggestion_p50_ms": ms(typed_first),
        "prefetched_tab_p50_ms": round(1000 * statistics.median(prefetched), 2),
        "ms_per_step": round(1000 * statistics.median(per_step), 1),
        # The engine with plain sampling in the same runs (no distinct openings, as before issue 12).
        "plain_sampling_p50_ms": ms(plain_cold),
        "plain_sampling_first_p50_ms": ms(plain_first),
        "plain_sampling_tokens_per_press": round(statistics.mean(plain_tokens), 1),
        "rss_mb": round(steady_rss),
    }
    if batched:
        out.update({
            "peer_tokens_per_press": round(statistics.mean(peer_tokens), 1),
            "llama_cpp_batched_p50_ms": ms(batched),
            "llama_cpp_batched_first_p50_ms": ms(batched_first),
            "llama_cpp_sequential_p50_ms": ms(sequential),
            "llama_cpp_sequential_first_p50_ms": ms(sequential_first),
            "ratio_vs_llama_cpp_batched": round(statistics.median(cold) / statistics.median(batched), 2),
            # Each run's engine press over the llama.cpp press that followed it: this machine's
            # slow spells (±25 % between benches) hit both of a pair alike.
            "ratio_vs_llama_cpp_batched_per_run_p50": round(statistics.median(e / b for e, b in zip(cold, batched)), 2),
            "first_ratio_vs_llama_cpp_batched": round(statistics.median(first) / statistics.median(batched_first), 2),
            "ratio_vs_llama_cpp_sequential": round(statistics.median(cold) / statistics.median(sequential), 2),
        })
    if naive:
        out["naive_generate_p50_ms"] = ms(naive)
        out["speedup_vs_naive"] = round(statistics.median(naive) / statistics.median(cold), 2)
        # Each run's naive rows are exactly as long as that run's engine rows: paired, the rows'
        # lengths (which vary from run to run with the sampled text) cancel out.
        out["speedup_vs_naive_per_run_p50"] = round(statistics.median(n / e for n, e in zip(naive, cold)), 2)
    for lang, q in quality.items():
        out.update({f"{k}_{lang}": v for k, v in q.items()})
    if not args.json:
        print(f"# {loaded.name}: engine against its peers, {args.runs} interleaved runs", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    main()
