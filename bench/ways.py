"""One weight format in or out, side by side in one process: what it does to a Tab press.

    python -m bench.ways --json                       # int8-weight (GPTQ-rounded) against the next best
    python -m bench.ways --without int8-weight --runs 15

bench.latency compares the engine with its peers; across two of its runs (two processes) this
machine drifts by ~10 %, more than a format changes a press. Here the engine is loaded once as
this machine's tuning chose (models/tuning.py), and every layer whose decode steps run the way
named by ``--without`` also gets that shape's next best measured way; the presses then alternate
between the two (which goes first alternates too), on the same ~200-token prompt, seeds and
settings as bench.latency's cold press. Reported for each: p50 of the press, of its first
suggestion and of a decode step, the tokens sampled, and the fidelity to fp32 on held-out
English and Chinese (bench/fidelity.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench import fidelity
from bench.latency import as_the_app_runs, cpu_description, ms
from editor.service import SuggestService
from models.batching import BatchKV, PrefixStore
from models.kernels import KERNELS, TunedLinear
from models.registry import DEFAULT_MODEL
from models.settings import Settings
from models.tuning import Measured, choose, shape_key


def swaps(model, tuning, absmax: dict, fp32, without: str) -> dict[str, tuple]:
    """For each TunedLinear whose few rows run ``without``: (its way, the next best way) as
    (name, prepared weight, run) triples, by module name."""
    dense = dict(fp32.named_modules())
    measured = {key: [Measured(**m) for m in found] for key, found in tuning.measured.items()}
    out = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, TunedLinear) or layer.few_name != without:
            continue
        key = shape_key(layer)
        other = choose(measured[key], "few", {without})
        weight = dense[name].weight.detach()
        prepared = KERNELS[other].make(weight, absmax.get(name))
        out[name] = ((layer.few_name, layer.few_weight, layer._few_run), (other, prepared, KERNELS[other].run))
    return out


@torch.inference_mode()
def decode_steps_ms(model, ids: list[int], steps: int = 20) -> float:
    """ms per decode step at batch 3 after ``ids`` (a press's three rows), alone: the press's
    total also holds its prompt and how many tokens the rows happened to sample."""
    store = PrefixStore(model, model.config, 1024)
    cache, _, _ = store.prefill(ids, "cpu")
    batch = BatchKV(model.config, 1024)
    batch.add(cache, len(ids), 3, steps)
    tokens = torch.tensor([ids[-1]] * 3)
    started = time.perf_counter()
    for _ in range(steps):
        tokens = batch.step(model, tokens).argmax(dim=-1)
    return 1000 * (time.perf_counter() - started) / steps


def use(model, layers: dict[str, TunedLinear], table: dict[str, tuple], index: int) -> None:
    for name, ways in table.items():
        layer = layers[name]
        layer.few_name, layer.few_weight, layer._few_run = ways[index]
    model.__dict__.pop("_tabwrite_decode_plan", None)  # it holds the layers' functions: made again


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--without", default="int8-weight", help="the decode-step way to compare against its next best")
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--no-fidelity", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    service = SuggestService(args.model)
    engine = service.engine()
    loaded = engine.loaded
    model = loaded.model
    fp32 = type(model).from_pretrained(loaded.folder, dtype=torch.float32).eval()
    table = swaps(model, loaded.tuning, loaded.absmax, fp32, args.without)
    if not table:
        print(json.dumps({"error": f"this machine's tuning does not run {args.without} in decode steps", **cpu_description()}))
        return
    layers = {n: m for n, m in model.named_modules() if n in table}
    names = [args.without, "+".join(sorted({ways[1][0] for ways in table.values()}))]
    prompt = fidelity.HELDOUT.read_text(encoding="utf-8")[:900]
    settings = Settings(lengths=[4, 12, 32], max_time=30.0)
    found = {i: {"press": [], "first": [], "step": [], "tokens": [], "decode": []} for i in (0, 1)}
    ids = engine.prompt_ids(prompt, settings.context_tokens)[0]

    def presses(run: int) -> None:
        for i in ((0, 1) if run % 2 == 0 else (1, 0)):
            use(model, layers, table, i)
            engine.prefixes.clear()
            result = engine.suggest(prompt, settings, seed=run)
            found[i]["press"].append(result.elapsed_s)
            found[i]["first"].append(result.first_ready_s or result.elapsed_s)
            found[i]["step"].append(result.elapsed_s / max(1, result.steps))
            found[i]["tokens"].append(sum(result.row_tokens))

    for i in (0, 1):  # warm-up, each way
        use(model, layers, table, i)
        as_the_app_runs(engine, lambda: engine.suggest(prompt, settings, seed=0))
    started = time.perf_counter()
    for run in range(args.runs):
        as_the_app_runs(engine, lambda: presses(run))
        for i in ((1, 0) if run % 2 == 0 else (0, 1)):  # on this thread, the engine's, as it decodes
            use(model, layers, table, i)
            found[i]["decode"].append(decode_steps_ms(model, ids))
    out = {**cpu_description(), "model": args.model, "runs": args.runs, "layers_swapped": len(table), "ways": names}
    for i, name in enumerate(names):
        f = found[i]
        out[name] = {
            "press_p50_ms": ms(f["press"]), "first_suggestion_p50_ms": ms(f["first"]),
            "press_ms_per_step_p50": round(1000 * statistics.median(f["step"]), 1),  # the prompt included
            "decode_step_p50_ms": round(statistics.median(f["decode"]), 2),  # batch 3, alone
            "tokens_per_press": round(statistics.mean(f["tokens"]), 1),
            "press_ms_per_token_p50": round(1000 * statistics.median(p / t for p, t in zip(f["press"], f["tokens"])), 1),
        }
        if not args.no_fidelity:
            use(model, layers, table, i)
            for language in ("en", "zh"):
                c = fidelity.compare(model, fp32, loaded.tokenizer, language)
                out[name][f"press_bits_per_char_change_pct_{language}"] = c["press_bits_per_char_change_pct"]
                out[name][f"press_next_token_tv_distance_{language}"] = c["press_next_token_tv_distance"]
    use(model, layers, table, 0)
    out["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
