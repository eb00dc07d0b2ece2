"""How often a Tab press offers what the writer was about to write, against raw sampling (issue 12).

    python -m bench.quality --json            # ~200 cut points per language, 3 seeds

Held-out English and Chinese passages written for this repo (bench/data/quality_*.txt; the
rules of the engine were developed on bench/data/heldout.txt, not on these) are cut mid-sentence
(bench/cuts.py): the text up to the cut is the prompt, the rest of the paragraph the truth.
Half the English cuts end after a space ("... the "), half right after a word ("... the"),
as a writer presses Tab either way. Side by side in the same run, on the same cut points:

- **engine**: the app's engine as it serves a Tab press (token healing, the likeliest distinct
  openings, then sampling at the writer's settings: T 0.7, top-k 40, top-p 0.95, rows of
  4/12/32 tokens);
- **raw**: plain sampling of the same model as Write With Transformer does it: the prompt as
  it is tokenized, 3 rows sampled at T 0.7, top-k 40, top-p 0.95, each row its length in tokens;
- **distinct_greedy**: the model's three likeliest distinct next words (distinct first words
  among its likeliest first tokens, the prompt as it is tokenized), each completed greedily.

Measures, per language: next-word hit@1 (the first row shown) and hit@3 (any row) in English
(the row's first word equals the truth's, ignoring case); next-two-character hit@3 in Chinese;
ExactMatch, the characters of the truth the best row reproduces exactly (from its start); the
time per press. Seeds vary the sampling (the cut points stay); the spread over seeds and the
standard error over cut points and seeds are reported. ``ceiling``: how often the truth's next
word is among the model's likeliest k words at all (k = 3, 10; word probabilities summed over
spellings, as the engine ranks them, from the 30 likeliest first tokens). ``confidence``: how
often a row's opening is right by the confidence the popup shows for it (its mean token
probability), to measure a "hide rows the model is unsure of" threshold rather than guess it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from bench.cuts import Cut, cut_points
from bench.latency import as_the_app_runs, cpu_description
from editor.service import SuggestService
from models import openings, textcut
from models.batching import BatchKV
from models.engine import _DECODE_CONTEXT, likeliest_openings
from models.registry import DEFAULT_MODEL
from models.settings import Settings, targets
from models.steps import sample

# T 0.7, top-k 40, top-p 0.95, rows of 4/12/32 tokens: the editor's defaults, Write With Transformer's.
# The time budget is lifted: this measures what the rows say, not whether they come in time
# (bench.latency does), and a row cut short by a busy machine would count as a miss.
WWT = Settings(max_time=30.0)
THRESHOLDS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)


# ---------------------------------------------------------------- how a row is judged


def first_word(text: str) -> str:
    match = openings.unit_of(text)
    return openings.unit_key(match[0])


def hit(cut: Cut, row: str) -> bool:
    if cut.language == "en":
        return bool(cut.next_word()) and first_word(row) == openings.unit_key(cut.next_word())
    return row.lstrip().startswith(cut.next_chars(2))


def exact_match(cut: Cut, row: str) -> int:
    """Characters of the truth that ``row`` reproduces exactly, from the start (leading blanks aside)."""
    a, b = row.lstrip(), cut.truth.lstrip()
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ---------------------------------------------------------------- the baselines: the model as it is


@torch.inference_mode()
def plain_rows(engine, prompt: str, settings: Settings, generator: torch.Generator | None, distinct: bool) -> list[str]:
    """Write With Transformer's way (``distinct`` False): 3 rows sampled from the prompt as it
    is tokenized, each its length in tokens. Or (``distinct``) the three likeliest distinct next
    words, each completed greedily to its length. Rows cut back to their last whole word."""
    ids, _ = engine.prompt_ids(prompt, settings.context_tokens)
    wanted = targets(settings)
    with engine.lock:
        cache, logits, _ = engine.prefixes.prefill(ids, engine.device)
        context = ids[-_DECODE_CONTEXT:]
        text_of = lambda row: engine.row_text(context, "", row)  # noqa: E731
        firsts = []
        if distinct:
            seen = []
            for candidate in openings.first_candidates(logits[0], text_of, 30, exclude=engine.ending_ids):
                key = openings.unit_key(candidate.unit)
                if key.strip() and key not in seen:
                    seen.append(key)
                    firsts.append(candidate.ids[0])
                if len(firsts) == len(wanted):
                    break
            firsts += firsts[:1] * (len(wanted) - len(firsts))
        kv = BatchKV(engine.model.config, engine.cache_limit - 1)
        kv.add(cache, len(ids), len(wanted))
        rows: list[list[int]] = [[] for _ in wanted]
        live = list(range(len(wanted)))
        step_logits = logits.expand(len(wanted), -1)
        for step in range(max(wanted)):
            if distinct and step == 0:
                tokens = torch.tensor(firsts)
            elif distinct:
                tokens = step_logits.argmax(dim=-1)
            else:
                tokens, _ = sample(step_logits, settings.temperature, settings.top_k, settings.top_p, generator)
            for row, token in zip(live, tokens.tolist()):
                rows[row].append(token)
            going = [k for k, row in enumerate(live) if len(rows[row]) < wanted[row] and rows[row][-1] not in engine.ending_set]
            live = [live[k] for k in going]
            if not live:
                break
            kv.keep(going)
            step_logits = kv.step(engine.model, tokens[going])
    texts = []
    for row in rows:
        text = text_of([t for t in row if t not in engine.stop_set])
        text = text.split("\n", 1)[0] if text.strip() else ""
        texts.append(textcut.complete_prefix(text) or text)
    return texts


def top_words(engine, prompt: str) -> list[str]:
    """The model's likeliest next words, as the engine ranks openings (healing included), from
    its 30 likeliest first tokens (a press looks at 6)."""
    return [o.unit for o in likeliest_openings(engine, prompt, first=30) if o.unit]


# ---------------------------------------------------------------- the run


def mean_se(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    se = statistics.stdev(values) / math.sqrt(n) if n > 1 else 0.0
    return {"mean": round(mean, 4), "se": round(se, 4)}


def summarise(cuts: list[Cut], rows_by_seed: list[list[list[str]]], seconds: list[float]) -> dict:
    """hit@1/hit@3/ExactMatch over cut points, averaged over seeds, with spread and standard error."""
    per_cut = {"hit@1": [], "hit@3": [], "exact_match": []}
    per_seed = {"hit@1": [], "hit@3": [], "exact_match": []}
    for rows_of_seed in rows_by_seed:
        per_seed["hit@1"].append(sum(hit(c, r[0]) if r else 0 for c, r in zip(cuts, rows_of_seed)) / len(cuts))
        per_seed["hit@3"].append(sum(any(hit(c, x) for x in r[:3]) for c, r in zip(cuts, rows_of_seed)) / len(cuts))
        per_seed["exact_match"].append(sum(max([exact_match(c, x) for x in r[:3]], default=0) for c, r in zip(cuts, rows_of_seed)) / len(cuts))
    for i, cut in enumerate(cuts):
        rows = [seed[i] for seed in rows_by_seed]
        per_cut["hit@1"].append(statistics.mean(float(hit(cut, r[0])) if r else 0.0 for r in rows))
        per_cut["hit@3"].append(statistics.mean(float(any(hit(cut, x) for x in r[:3])) for r in rows))
        per_cut["exact_match"].append(statistics.mean(float(max([exact_match(cut, x) for x in r[:3]], default=0)) for r in rows))
    out = {}
    for name in per_cut:
        out[name] = dict(mean_se(per_cut[name]), seeds=[round(v, 4) for v in per_seed[name]])
    out["_per_cut"] = per_cut  # for the paired comparison below; not printed
    out["ms_per_press"] = round(1000 * statistics.median(seconds)) if seconds else None
    return out


def run_language(service, engine, language: str, per_paragraph: int, seeds: list[int], source: str, log) -> dict:
    cuts = cut_points(language, per_paragraph, source=source)
    if language == "en":  # half the cuts right after a word, half after its space
        cuts = [Cut(c.language, c.paragraph, c.prompt.rstrip(" ") if i % 2 else c.prompt, c.truth if not i % 2 else " " + c.truth) for i, c in enumerate(cuts)]
    result: dict = {"cut_points": len(cuts), "seeds": seeds}
    engine_rows, raw_rows, confidence = [], [], []
    engine_s, raw_s = [], []
    for seed in seeds:
        mine, theirs = [], []
        generator = torch.Generator().manual_seed(seed)
        for n, cut in enumerate(cuts):
            started = time.perf_counter()
            answer = engine.suggest(cut.prompt, WWT, seed=seed * 100003 + n)
            engine_s.append(time.perf_counter() - started)
            mine.append(answer.texts)
            confidence += [(math.exp(s.mean_logprob), hit(cut, s.text)) for s in answer.suggestions if math.isfinite(s.mean_logprob)]
            started = time.perf_counter()
            theirs.append(plain_rows(engine, cut.prompt, WWT, generator, distinct=False))
            raw_s.append(time.perf_counter() - started)
            if n % 25 == 0:
                log(f"{language} seed {seed}: {n}/{len(cuts)} cut points")
        engine_rows.append(mine)
        raw_rows.append(theirs)
    greedy_s, greedy_rows, ceiling = [], [], {3: 0, 10: 0}
    for n, cut in enumerate(cuts):
        started = time.perf_counter()
        greedy_rows.append(plain_rows(engine, cut.prompt, WWT, None, distinct=True))
        greedy_s.append(time.perf_counter() - started)
        words = [openings.unit_key(w) for w in top_words(engine, cut.prompt)]
        if n % 25 == 0:
            log(f"{language} likeliest distinct words, greedily completed, and the ceiling: {n}/{len(cuts)} cut points")
        truth = openings.unit_key(cut.next_word() if language == "en" else cut.next_chars(2))
        for k in ceiling:
            ceiling[k] += truth in words[:k]
    result["engine"] = summarise(cuts, engine_rows, engine_s)
    result["raw"] = summarise(cuts, raw_rows, raw_s)
    result["distinct_greedy"] = summarise(cuts, [greedy_rows], greedy_s)
    result["ceiling"] = {f"top{k}": round(v / len(cuts), 4) for k, v in ceiling.items()}
    if language == "en":  # where the gain comes from: cuts after a space, and right after a word
        for style, keep in (("after_space", 0), ("after_word", 1)):
            index = [i for i in range(len(cuts)) if i % 2 == keep]
            result[f"hit@3_{style}"] = {
                name: round(statistics.mean(float(any(hit(cuts[i], x) for x in seed[i][:3])) for seed in rows for i in index), 4)
                for name, rows in (("engine", engine_rows), ("raw", raw_rows), ("distinct_greedy", [greedy_rows]))
            }
    best = max(("raw", "distinct_greedy"), key=lambda name: result[name]["hit@3"]["mean"])
    # Paired over cut points: each cut's engine hit rate (mean over seeds) minus the better
    # baseline's at the same cut; its standard error says whether the gain is more than noise.
    diffs = [a - b for a, b in zip(result["engine"]["_per_cut"]["hit@3"], result[best]["_per_cut"]["hit@3"])]
    gain = mean_se(diffs)
    result["hit@3_gain_over_best_baseline"] = dict(gain, baseline=best)
    result["hit@3_gain_in_se"] = round(gain["mean"] / max(gain["se"], 1e-9), 2)
    for name in ("engine", "raw", "distinct_greedy"):
        del result[name]["_per_cut"]
    raw_em = result["raw"]["exact_match"]["mean"]
    result["exact_match_ratio_to_raw"] = round(result["engine"]["exact_match"]["mean"] / raw_em, 3) if raw_em else None
    result["confidence"] = [
        {
            "hide_below": t,
            "rows_shown": round(sum(c >= t for c, _ in confidence) / len(confidence), 3),
            "shown_right": round(sum(h for c, h in confidence if c >= t) / max(1, sum(c >= t for c, _ in confidence)), 3),
        }
        for t in THRESHOLDS
    ]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--per-paragraph", type=int, default=5, help="cut points in each of the 40 paragraphs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--source", default="quality", help='"quality" (bench/data/quality_*.txt) or "heldout" (the development text)')
    parser.add_argument("--languages", default="en,zh")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    args = parser.parse_args()
    torch.manual_seed(0)

    def log(line: str) -> None:
        print(f"[bench.quality] {line}", flush=True, file=__import__("sys").stderr)

    service = SuggestService(args.model)
    engine = service.engine()
    seeds = list(range(1, args.seeds + 1))
    report = dict(cpu_description(), model=engine.name, settings=WWT.to_dict(), source=args.source)

    def presses():
        for language in args.languages.split(","):
            report[language] = run_language(service, engine, language, args.per_paragraph, seeds, args.source, log)
        return report

    as_the_app_runs(engine, presses)
    print(json.dumps(report, indent=None if args.json else 2, ensure_ascii=False))


if __name__ == "__main__":
    main()
