"""Tab-press latency of the suggestion engine against naive `generate`, side by side.

    python -m bench.latency --json            # default model, prints one JSON object
    python -m bench.latency --model smollm2-135m --runs 7

Each run interleaves the compared ways of answering the same Tab press (same prompt,
model and settings), so machine noise hits them alike:
- engine, cold: the engine with its prefix cache emptied (Tab right after pasting text);
- engine, repeat: the same Tab again (prefix already cached, as after a pause or Tab again);
- engine, typed: Tab after typing a few more words onto a cached text (only they are prefilled);
- engine, pre-computed: the editor's path when the writer paused before Tab (the service
  pre-computed the suggestions; the Tab is answered from that result);
- naive: `model.generate(num_return_sequences=3, do_sample=True, ...)` on fp32 weights;
- llama.cpp, when `llama_cpp` is importable (optional: `pip install llama-cpp-python`, a
  ~15-minute source build): the same GGUF, 3 completions of 32 tokens sharing the cached
  prompt (llama-cpp-python's high-level API samples one sequence per call).
Quality: bits per character of bench/data/heldout.txt under fp32 and under the engine's
weights (bf16), to show the speed-ups do not cost model quality.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import threading
import time
from pathlib import Path

import torch

from bench.stats import percentile
from editor.service import SuggestService
from models.registry import DEFAULT_MODEL, resolve
from models.settings import Settings

HELDOUT = Path(__file__).parent / "data" / "heldout.txt"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@torch.inference_mode()
def as_the_app_runs(engine, presses):
    """Run ``presses()`` (calls into the engine) the way app.py serves Tab presses.

    They come from another thread while this, the main thread that loaded the model, is the
    engine's worker (``SuggestionEngine.serve_here``); the baselines run on this thread too.
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
    engine.serve_here(stop)
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def bits_per_char(model, tokenizer, text: str, window: int = 512) -> float:
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window + 1][None, :]
        logits = model(input_ids=chunk[:, :-1]).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return nll / math.log(2) / len(text)


def naive_generate(model, tokenizer, prompt: str, settings: Settings, max_new: int) -> float:
    inputs = tokenizer(prompt, return_tensors="pt")
    started = time.perf_counter()
    model.generate(
        **inputs, do_sample=True, num_return_sequences=3, max_new_tokens=max_new,
        temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
    )
    return time.perf_counter() - started


def llama_cpp_press(llm, prompt: str, settings: Settings, max_new: int) -> float:
    started = time.perf_counter()
    for _ in range(3):  # the prompt is evaluated once; the next calls reuse its KV cache
        llm.create_completion(
            prompt, max_tokens=max_new, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p
        )
    return time.perf_counter() - started


def load_llama_cpp(model: str):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    source = resolve(model)
    if source.kind != "gguf":
        return None
    return Llama(model_path=source.location, n_ctx=1024, n_threads=torch.get_num_threads(), verbose=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    args = parser.parse_args()
    torch.manual_seed(0)

    service = SuggestService(args.model)
    engine = service.engine()
    loaded = engine.loaded
    text = HELDOUT.read_text(encoding="utf-8")
    prompt = text[:900]  # about 200 tokens of English
    # Fixed lengths so every press does the same work: 3 rows, the longest 32 tokens.
    settings = Settings(lengths=[4, 12, 32], max_time=30.0)
    prompt_tokens = len(engine.prompt_ids(prompt, settings.context_tokens)[0])
    service.update_settings("bench", args.model, settings.to_dict())

    as_the_app_runs(engine, lambda: engine.suggest(prompt, settings, seed=0))  # warm-up
    steady_rss = rss_mb()  # the engine as the app holds it, before the baselines are loaded
    fp32 = type(loaded.model).from_pretrained(loaded.model.name_or_path, dtype=torch.float32).eval()
    llm = load_llama_cpp(args.model)
    naive_generate(fp32, loaded.tokenizer, prompt, settings, 32)
    if llm is not None:
        llama_cpp_press(llm, prompt, settings, 32)
    cold, first, repeat, prefetched, naive, per_step, llama = [], [], [], [], [], [], []
    typed, typed_first = [], []

    def engine_presses(run: int) -> None:
        engine.prefixes.clear()  # Tab right after the text changed
        result = engine.suggest(prompt, settings, seed=run)
        cold.append(result.elapsed_s)
        first.append(result.first_ready_s or result.elapsed_s)
        per_step.append(result.elapsed_s / max(1, result.steps))
        repeat.append(engine.suggest(prompt, settings, seed=run + 100).elapsed_s)
        typed_on = engine.suggest(prompt + " and then, a little later,", settings, seed=run + 200)
        typed.append(typed_on.elapsed_s)
        typed_first.append(typed_on.first_ready_s or typed_on.elapsed_s)
        service.suggest_for_session("bench", prompt + f" {run}", prefetch=True)  # during the pause
        started = time.perf_counter()
        answer = service.suggest_for_session("bench", prompt + f" {run}")  # the Tab
        assert answer["from_cache"], answer
        prefetched.append(time.perf_counter() - started)

    for run in range(args.runs):
        as_the_app_runs(engine, lambda: engine_presses(run))
        naive.append(naive_generate(fp32, loaded.tokenizer, prompt, settings, 32))
        if llm is not None:
            llama.append(llama_cpp_press(llm, prompt, settings, 32))

    bpc_fp32 = bits_per_char(fp32, loaded.tokenizer, text)
    bpc_engine = bits_per_char(loaded.model, loaded.tokenizer, text)
    del fp32
    out = {
        "model": loaded.name,
        "device": loaded.device.type,
        "dtype": str(loaded.dtype).split(".")[-1],
        "threads": torch.get_num_threads(),
        "runs": args.runs,
        "prompt_tokens": prompt_tokens,
        "engine_p50_ms": round(1000 * statistics.median(cold)),
        "engine_p90_ms": round(1000 * percentile(cold, 0.9)),
        "first_suggestion_p50_ms": round(1000 * statistics.median(first)),
        "repeat_tab_p50_ms": round(1000 * statistics.median(repeat)),
        "typed_tab_p50_ms": round(1000 * statistics.median(typed)),
        "typed_tab_first_suggestion_p50_ms": round(1000 * statistics.median(typed_first)),
        "prefetched_tab_p50_ms": round(1000 * statistics.median(prefetched), 2),
        "naive_generate_p50_ms": round(1000 * statistics.median(naive)),
        "speedup_vs_naive": round(statistics.median(naive) / statistics.median(cold), 2),
        "ms_per_step": round(1000 * statistics.median(per_step), 1),
        "rss_mb": round(steady_rss),
        "bits_per_char_fp32": round(bpc_fp32, 4),
        "bits_per_char_engine": round(bpc_engine, 4),
        "bits_per_char_change_pct": round(100 * (bpc_engine - bpc_fp32) / bpc_fp32, 2),
    }
    if llama:
        out["llama_cpp_p50_ms"] = round(1000 * statistics.median(llama))
        out["ratio_vs_llama_cpp"] = round(statistics.median(cold) / statistics.median(llama), 2)
    if not args.json:
        print(f"# {loaded.name}: engine vs naive generate, {args.runs} interleaved runs", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    main()
