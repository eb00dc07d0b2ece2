"""Many writers at once: N simulated writers press Tab against a local tabwrite server.

    python -m bench.load --json                 # starts `python app.py` on 127.0.0.1 itself
    python -m bench.load --url http://127.0.0.1:7860/ --writers 1 5 20 --presses 40
    python -m bench.load --json --writers 1 3 --presses 2 --min-writer-presses 2 --pause 0.5 1   # a smoke run

Each writer is a thread with its own gradio_client, calling the /suggest API (the app's
default settings) on a document of its own. It measures what a writer waits for a Tab, and
how much text comes back, when N writers share the server. Choices, and why:
- Prompts of 200-384 tokens (the app keeps the last 384), windows of bench/data/heldout.txt,
  cut mid-sentence; every third writer writes Chinese. Real documents are that long, and
  prefilling them is a large part of a press; 10-token prompts hide it.
- Writers type: between presses each adds the next few words of the held-out text, so its
  presses share a growing prefix, as the editor's do (the engine's prefix cache gets what it
  would get in use, no more). Past 384 tokens the writer moves to another window, whose
  first press is cold again; first and later presses are reported apart.
- Staggered: writers start at random (seeded) moments over the first --ramp seconds and think
  for a random (seeded) --pause between presses. Writers firing in lockstep all land in one
  batch, which is the engine's best case, not what N people do.
- A press stopped at its time budget is not a success: it either raised the "time limit"
  error (no suggestion at all) or came back, no sooner than the budget, with what was ready
  (shorter or fewer rows). Both count in `budget_stopped`; errors are the other exceptions.
  The returned text is counted in the model's tokens (`tokens_per_row_mean`, `tokens_per_s`),
  so a server that answers fast by answering less shows it; presses per second alone would not.
- p95 and p99 only from enough samples (20 and 100; null below that, with the count), and
  enough presses by default (at least 40 per N) for a p95 that is not just the maximum.
Latency counts every press that did not fail (a budget stop is waited for too). Throughput
is under this offered load (writers think), not the server's capacity. The clients run in
this process, on the same CPUs as the server, as a browser would on a laptop.

With --hostile, the attacker runs in a process of its own, connected before the clock starts
(it ran as threads of this one: building its 25,000-character texts and 100,000-entry lists
took the writers' clients' GIL, and that was counted as the server's slowness); --attacks
picks parts of its loop, to take its cost apart; --attacker-nice lowers its priority (on a
host, its own CPU would be elsewhere).

Traffic goes to 127.0.0.1 only; every loop is bounded in count and in time (TIME_LIMIT_S for
the whole run, shared among the N). Prints one JSON object: the CPU, the settings used, and
for each N the figures below, plus the p95 over the single writer's p50.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

from bench.stats import percentile

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "bench" / "data" / "heldout.txt"
TIME_LIMIT_S = 900  # the whole run stops by then (app start aside), whatever is left
MAX_WRITERS = 50
CHINESE_EVERY = 3  # writers 2, 5, 8, ... write Chinese
# Nearest-rank percentiles below these counts are the maximum or close to it: not reported.
MIN_SAMPLES = {"p95": 20, "p99": 100}
# A sentence (or clause that a writer would not Tab after) ends here: windows are not cut there.
SENTENCE_END = re.compile(r"[.!?:;。！？：；][\"'”’)）」]*$")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


# ---------------------------------------------------------------- counting tokens


def token_counter(model: str):
    """(count(text) -> int, description): the model's tokenizer, else words (and CJK characters).

    The tokenizer is the one saved with the converted model, so nothing is downloaded and the
    counts are the engine's own. Only run outside the timed part: tokenizing steals CPU from
    the server on a small machine.
    """
    try:
        from transformers import AutoTokenizer

        from models.loading import _gguf_cache_dir
        from models.registry import resolve

        source = resolve(model)
        folder = _gguf_cache_dir(source.location) if source.kind == "gguf" else source.location
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        return (lambda text: len(tokenizer.encode(text, add_special_tokens=False))), f"tokenizer of {model} ({folder})"
    except Exception as e:  # no converted model yet, no transformers: still measure, and say how
        words = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\s\u3400-\u9fff\uf900-\ufaff]+")
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        return (lambda text: len(words.findall(text))), f"words and CJK characters, not tokens (tokenizer not loaded: {why})"


# ---------------------------------------------------------------- the writers' documents


def streams() -> dict:
    """Per language, the held-out paragraphs as one ring of typing units, and where sentences start.

    A unit is what a writer adds in one go: an English word (with the blank before it), or a
    Chinese character (a Chinese "word" is two of them).
    """
    paragraphs = [p.strip() for p in HELDOUT.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    out = {}
    for lang, pattern in (("en", r"\s*\S+"), ("zh", r"\s*\S")):
        # A paragraph break also where the ring wraps around (stripped off a window's start).
        text = "".join("\n\n" + p for p in paragraphs if p.isascii() == (lang == "en"))
        units = re.findall(pattern, text)
        starts = [i for i in range(len(units)) if i == 0 or SENTENCE_END.search(units[i - 1])]
        out[lang] = {"units": units, "starts": starts}
    return out


def window_text(units: list[str], start: int, length: int) -> str:
    return "".join(units[(start + k) % len(units)] for k in range(length)).lstrip()


def mid_sentence(units: list[str], start: int, length: int) -> int:
    """``length``, grown until the text ends inside a sentence (not at its end, nor a paragraph's)."""
    for _ in range(len(units)):
        last, following = units[(start + length - 1) % len(units)], units[(start + length) % len(units)]
        if length >= len(units) - 1 or not (SENTENCE_END.search(last) or following.startswith("\n")):
            break
        length += 1
    return length


def open_window(units: list[str], start: int, target: int, count) -> int:
    """The fewest units from ``start`` with at least ``target`` tokens, ending mid-sentence."""
    low, high = 1, len(units) - 1  # token counts grow with the length: bisect
    while low < high:
        middle = (low + high) // 2
        if count(window_text(units, start, middle)) >= target:
            high = middle
        else:
            low = middle + 1
    return mid_sentence(units, start, low)


def plan_writer(lang: str, stream: dict, starts: list[int], presses: int, rng: random.Random, args, count) -> list[dict]:
    """The texts a writer sends, press by press: a window, then the same with a few words typed on."""
    units = stream["units"]
    low, high = args.prompt_tokens
    step = 2 if lang == "zh" else 1
    plan, window = [], None
    for press in range(presses):
        first = window is None
        if not first:
            window = (window[0], mid_sentence(units, window[0], window[1] + step * rng.randint(*args.type_words)))
            tokens = count(window_text(units, *window))
            first = tokens > high or window[1] >= len(units) - 1  # past the context: elsewhere in the document
        if first:
            # Room to type before reaching the top of the range.
            start = starts.pop(0) if len(starts) > 1 else starts[0]
            window = (start, open_window(units, start, rng.randint(low, (low + high) // 2), count))
            tokens = count(window_text(units, *window))
        plan.append({"text": window_text(units, *window), "tokens": tokens, "first": first})
    return plan


# ---------------------------------------------------------------- the server and the run


def start_app(model: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Every simulated writer is a visitor of its own (its X-Forwarded-For address), as N people
    # behind Spaces' proxy are; from 127.0.0.1 alone they would share one visitor's limits.
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", TABWRITE_TRUST_PROXY="1")
    proc = subprocess.Popen(
        [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port), "--model", model],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            time.sleep(1)
    proc.kill()
    raise SystemExit("the app did not start")


def writer(url: str, plan: list[dict], offset: float, pauses: list[float], call: dict, out: list, clock: dict, address: str) -> None:
    """One writer: connect, wait for the start, then press Tab through ``plan``, thinking in between."""
    try:
        from gradio_client import Client

        client = Client(url, verbose=False, headers={"X-Forwarded-For": address})
    except Exception as e:  # counted, not hidden
        out.append({"kind": "error", "error": f"connect: {type(e).__name__}: {str(e)[:100]}"})
        return
    finally:
        clock["ready"].release()
    if not clock["go"].wait(timeout=clock["connect_s"] + 5):
        return
    time.sleep(max(0.0, clock["t0"] + offset - time.perf_counter()))
    for press, (step, pause) in enumerate(zip(plan, pauses)):
        if time.perf_counter() > clock["stop_at"]:
            return
        started = time.perf_counter()
        record = {"press": press, "first": step["first"], "prompt_tokens": step["tokens"]}
        try:
            rows = client.predict(step["text"], **call, api_name="/suggest")
            record.update(kind="ok", rows=[str(r) for r in rows or []])
        except Exception as e:
            message = str(e)
            if "time limit" in message.lower():  # the engine's "Stopped at the 4 s time limit."
                record.update(kind="budget", rows=[])
            elif message.startswith("Busy"):  # refused before any work, at once: a clear "try again"
                record.update(kind="busy", rows=[])
            else:
                record.update(kind="error", error=f"{type(e).__name__}: {message[:100]}")
        ended = time.perf_counter()
        record.update(latency_s=ended - started, end=ended - clock["t0"])
        out.append(record)
        if press + 1 < len(plan):
            time.sleep(max(0.0, min(pause, clock["stop_at"] - time.perf_counter())))


ATTACKER = "198.51.100.9"  # the hostile visitor's address (X-Forwarded-For)


ATTACKS = ("score", "press", "flood", "body", "model", "lengths")


def hostile_visitor(url: str, stop, log: dict, ready=None, go=None, attacks=ATTACKS) -> None:
    """What one hostile visitor does in a loop until ``stop``, with ``log`` counting each attack's
    outcomes (issue 11): ``attacks``, some of ATTACKS. Connected, it sets ``ready`` and waits
    for ``go`` (Events, or None)."""
    import concurrent.futures
    import http.client

    from gradio_client import Client

    def component_call(body: dict) -> int:
        parts = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        try:
            conn.request("POST", "/gradio_api/component_server/", body=json.dumps(body).encode(),
                         headers={"Content-Type": "application/json", "X-Forwarded-For": ATTACKER})
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    client = Client(url, verbose=False, headers={"X-Forwarded-For": ATTACKER})
    with urllib.request.urlopen(url + "config", timeout=30) as response:
        config = json.loads(response.read())
    editor = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "editor")
    parts = urllib.parse.urlsplit(url)
    lock = threading.Lock()
    if ready is not None:
        ready.set()
    if go is not None:
        go.wait(timeout=600)

    def outcome(name: str, fn) -> None:
        try:
            result = fn()
            key = f"{name}: {result}"
        except Exception as e:
            key = f"{name}: {type(e).__name__}: {str(e)[:60]}"
        with lock:
            log[key] = log.get(key, 0) + 1

    def score_big():
        return "scored" if client.predict("word " * 5000, "", api_name="/score").get("perplexity") else "no score"

    def presses():
        return "answered" if client.predict("The history of the printing press begins in", api_name="/suggest") else "empty"

    def flood():
        codes = {component_call({"session_hash": f"flood-{time.perf_counter_ns()}-{k}", "component_id": editor,
                                 "fn_name": "suggest_for_editor", "data": {"text": " "}}) for k in range(200)}
        return f"status {sorted(codes)}"

    def huge_body():
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        conn.putrequest("POST", "/gradio_api/call/score")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(500 * 2**20))
        conn.endheaders()
        status = conn.getresponse().status
        conn.close()
        return f"status {status}"

    def unknown_model():
        return client.predict("Hello", "/etc", api_name="/score")

    def long_lengths():
        return f"{len(client.predict('Hello there', 0.7, 40, 0.95, '4,' * 100_000, 4.0, '', api_name='/suggest'))} rows"

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        while not stop.is_set():
            jobs = [pool.submit(outcome, "score 25k chars", score_big) for _ in range(3) if "score" in attacks]
            jobs += [pool.submit(outcome, "press", presses) for _ in range(8) if "press" in attacks]
            for tag, name, fn in (("flood", "1000 sessions", flood), ("body", "500 MB body", huge_body),
                                  ("model", "model /etc", unknown_model), ("lengths", "100k lengths", long_lengths)):
                if tag in attacks:
                    outcome(name, fn)
            for job in jobs:
                job.result()
            with lock:
                log["loops"] = log.get("loops", 0) + 1
            stop.wait(0.5)


def _attacker_process(url: str, ready, go, stop, out, nice: int, attacks) -> None:
    """The hostile visitor in a process of its own: its client's work (building 25,000-character
    texts and 100,000-entry lists, gradio_client's threads) took the writers' clients' GIL when it
    ran as threads of this one, and that was counted as the server's slowness. It starts (imports,
    connects) before the clock does, as the writers' clients do."""
    if nice:
        os.nice(nice)
    log: dict = {}
    try:
        hostile_visitor(url, stop, log, ready, go, attacks)
    except Exception as e:  # reported with the attacks, never hidden
        log[f"attacker stopped: {type(e).__name__}: {str(e)[:80]}"] = 1
    out.put(log)


def ms(values, q: float | None = None) -> int | None:
    if not values:
        return None
    return round(1000 * (statistics.median(values) if q is None else percentile(values, q)))


def run(url: str, n: int, args, texts: dict, used: set, count, call: dict, stop_at: float, attack_log: dict | None = None) -> dict:
    rng = random.Random(f"{args.seed}:{n}")
    per_writer = max(args.min_writer_presses, math.ceil(args.presses / n))
    langs = ["zh" if i % CHINESE_EVERY == CHINESE_EVERY - 1 else "en" for i in range(n)]
    plans, offsets, pauses = [], [], []
    for lang in ("en", "zh"):
        # Each writer its own sentence starts, none used by an earlier N where there are enough:
        # the server's prefix cache must not answer one run with another's prompts.
        starts = list(texts[lang]["starts"])
        rng.shuffle(starts)
        texts[lang]["pool"] = [s for s in starts if (lang, s) not in used] + [s for s in starts if (lang, s) in used]
    for i, lang in enumerate(langs):
        writer_rng = random.Random(f"{args.seed}:{n}:{i}")
        pool = texts[lang]["pool"]
        mine = pool[langs[:i].count(lang) :: max(1, langs.count(lang))] or pool[:1]  # disjoint among this N's writers
        plans.append(plan_writer(lang, texts[lang], list(mine), per_writer, writer_rng, args, count))
        used.update((lang, s) for s in mine[: sum(p["first"] for p in plans[-1])])
        offsets.append(writer_rng.uniform(0, args.ramp))
        pauses.append([writer_rng.uniform(*args.pause) for _ in range(per_writer)])

    results: list = []
    clock = {"ready": threading.Semaphore(0), "go": threading.Event(), "t0": 0.0, "stop_at": stop_at, "connect_s": 60.0}
    attack = None
    if attack_log is not None:  # with a hostile visitor, whose outcomes are counted in attack_log
        import multiprocessing

        spawn = multiprocessing.get_context("spawn")
        attack_ready, attack_go, attack_stop, attack_out = spawn.Event(), spawn.Event(), spawn.Event(), spawn.Queue()
        attack = spawn.Process(target=_attacker_process, daemon=True,
                               args=(url, attack_ready, attack_go, attack_stop, attack_out, args.attacker_nice, args.attacks))
        attack.start()
        attack_ready.wait(timeout=120)
    threads = [
        threading.Thread(
            target=writer, args=(url, plans[i], offsets[i], pauses[i], call, results, clock, f"10.1.{n}.{i + 1}"), daemon=True
        )
        for i in range(n)
    ]
    for t in threads:
        t.start()
    connect_by = time.time() + clock["connect_s"]
    for _ in range(n):  # every client connected before the clock starts, so connecting is not timed
        if not clock["ready"].acquire(timeout=max(0.1, connect_by - time.time())):
            break
    clock["t0"] = time.perf_counter()
    clock["go"].set()
    if attack is not None:
        attack_go.set()
    for t in threads:
        t.join(timeout=max(1.0, stop_at - time.perf_counter() + args.max_time + 30))
    if attack is not None:
        attack_stop.set()
        try:
            for key, value in attack_out.get(timeout=120).items():
                attack_log[key] = attack_log.get(key, 0) + value
        except Exception:
            attack_log["attacker: no report"] = attack_log.get("attacker: no report", 0) + 1
        attack.join(timeout=30)
        if attack.is_alive():
            attack.kill()

    presses = [r for r in list(results) if "latency_s" in r]
    waited = [r for r in presses if r["kind"] not in ("error", "busy")]
    answered = [r for r in presses if r["kind"] == "ok"]
    no_answer = [r for r in presses if r["kind"] == "budget"]
    busy = [r for r in presses if r["kind"] == "busy"]
    errors = [r["error"] for r in results if r["kind"] == "error"]  # failed connections too
    at_limit = [r for r in answered if r["latency_s"] >= args.max_time]
    row_tokens = [count(row) for r in answered for row in r["rows"]]
    longest = [max((count(row) for row in r["rows"]), default=0) for r in answered]
    wall = max((r["end"] for r in presses), default=0.0)  # from the start to the last answer
    latencies = [r["latency_s"] for r in waited]
    prompt_tokens = [r["prompt_tokens"] for r in presses]
    return {
        "writers": n,
        "writers_zh": langs.count("zh"),
        "presses": len(presses),
        "presses_planned": n * per_writer,
        "stopped_by_time_limit": len(presses) < n * per_writer,
        "wall_s": round(wall, 1),
        "latency_samples": len(latencies),
        "p50_ms": ms(latencies),
        "p95_ms": ms(latencies, 0.95) if len(latencies) >= MIN_SAMPLES["p95"] else None,
        "p99_ms": ms(latencies, 0.99) if len(latencies) >= MIN_SAMPLES["p99"] else None,
        # The first press on a window prefills it all; later ones only the words typed since.
        "first_press_p50_ms": ms([r["latency_s"] for r in waited if r["first"]]),
        "typed_press_p50_ms": ms([r["latency_s"] for r in waited if not r["first"]]),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "budget_stopped": len(no_answer) + len(at_limit),
        "budget_stopped_no_answer": len(no_answer),  # the "time limit" error: nothing was ready
        "budget_stopped_answered": len(at_limit),  # answered no sooner than the budget: cut short there
        # Refused at once with "Busy: ... try again" (admission control): not in the latencies above.
        "busy": len(busy),
        "busy_p50_ms": ms([r["latency_s"] for r in busy]),
        "no_suggestion": len(no_answer) + sum(1 for r in answered if not r["rows"]),  # neither rows nor an early busy
        "fewer_rows_than_asked": sum(len(r["rows"]) < len(call["lengths"].split(",")) for r in answered),
        "tokens_per_row_mean": round(statistics.mean(row_tokens), 1) if row_tokens else None,
        "longest_row_tokens_mean": round(statistics.mean(longest), 1) if longest else None,
        "tokens_per_s": round(sum(row_tokens) / wall, 1) if wall > 0 else None,
        "presses_per_s": round(len(presses) / wall, 2) if wall > 0 else None,
        "prompt_tokens": {"min": min(prompt_tokens), "p50": round(statistics.median(prompt_tokens)), "max": max(prompt_tokens)}
        if prompt_tokens else None,
    }


def main() -> None:
    from models.registry import DEFAULT_MODEL
    from models.settings import Settings

    defaults = Settings()
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", help="a running tabwrite on 127.0.0.1 (default: start one)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model asked for (and whose tokenizer counts)")
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--presses", type=int, default=40, help="Tab presses per N, at least (shared among its writers)")
    parser.add_argument("--min-writer-presses", type=int, default=3, help="presses per writer, at least")
    parser.add_argument(
        "--pause", type=float, nargs=2, default=[1.0, 3.0], metavar=("LO", "HI"), help="thinking time between presses (s)"
    )
    parser.add_argument("--ramp", type=float, default=3.0, help="writers start at random moments within this many seconds")
    parser.add_argument(
        "--prompt-tokens", type=int, nargs=2, default=[200, defaults.context_tokens], metavar=("LO", "HI"),
        help="a window starts with LO to (LO+HI)/2 tokens; past HI the writer moves to another window",
    )
    parser.add_argument(
        "--type-words", type=int, nargs=2, default=[2, 6], metavar=("LO", "HI"), help="words typed between presses"
    )
    parser.add_argument("--max-time", type=float, default=defaults.max_time, help="time budget per press (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT_S, help="the whole run, app start aside (s)")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument(
        "--hostile", action="store_true",
        help="N normal writers (--writers, default 5) twice: alone, then while one visitor attacks (issue 11)",
    )
    parser.add_argument(
        "--attacker-nice", type=int, default=0,
        help="the attacker's client process runs at this niceness (its CPU, on a host, is elsewhere; 0: as the writers')",
    )
    parser.add_argument(
        "--attacks", default=",".join(ATTACKS),
        help=f"with --hostile, what the attacker does in its loop (some of {','.join(ATTACKS)}), to take its cost apart",
    )
    args = parser.parse_args()
    args.attacks = tuple(a for a in ATTACKS if a in args.attacks.split(","))
    args.attacker_nice = max(0, min(args.attacker_nice, 19))
    if args.hostile and args.writers == [1, 5, 20]:
        args.writers = [5]
    if args.url and urllib.parse.urlparse(args.url).hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit("bench.load only talks to 127.0.0.1")
    # Every loop below is bounded by these.
    args.presses = max(1, min(args.presses, 1000))
    args.min_writer_presses = max(1, min(args.min_writer_presses, 100))
    args.pause = sorted(max(0.0, min(p, 60.0)) for p in args.pause)
    args.prompt_tokens = sorted(max(16, min(t, 2048)) for t in args.prompt_tokens)
    args.type_words = sorted(max(1, min(w, 50)) for w in args.type_words)
    args.ramp = max(0.0, min(args.ramp, 60.0))
    writers = sorted(set(max(1, min(n, MAX_WRITERS)) for n in args.writers))

    count, counted_in = token_counter(args.model)
    texts = streams()
    call = {
        "temperature": defaults.temperature, "top_k": defaults.top_k, "top_p": defaults.top_p,
        "lengths": ", ".join(map(str, defaults.lengths)), "max_time": args.max_time, "model": args.model,
    }
    if not args.json:
        print(f"# {args.model}: {writers} writers, {args.presses}+ presses each N, {args.max_time:g} s budget", flush=True)
    proc, url = (None, args.url) if args.url else start_app(args.model)
    runs, used = [], set()
    try:
        stop_all = time.perf_counter() + args.time_limit
        plan = [(n, None) for n in writers]
        attacks: dict = {}
        if args.hostile:  # each N alone, then with the attacker: the same writers' presses, side by side
            plan = [(n, a) for n in writers for a in (None, attacks)]
        for k, (n, attack_log) in enumerate(plan):
            # Each N gets a fair share of what is left, so a slow N cannot starve the next.
            stop_at = time.perf_counter() + (stop_all - time.perf_counter()) / (len(plan) - k)
            runs.append(dict(run(url, n, args, texts, used, count, call, stop_at, attack_log),
                             attacked=attack_log is not None))
            print(f"[bench.load] {n} writers: {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
        peak_rss_mb = None
        if proc is not None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                peak_rss_mb = round(int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024)
            except (OSError, AttributeError):
                pass
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    single = next((r["p50_ms"] for r in runs if r["writers"] == 1 and not r.get("attacked")), None)
    out = {
        "url": url,
        "model": args.model,
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "tokens_counted_as": counted_in,
        "settings": {
            **{k: v for k, v in call.items() if k != "model"},  # what each press asks for
            "presses_per_n_min": args.presses,
            "presses_per_writer_min": args.min_writer_presses,
            "pause_s": args.pause,
            "ramp_s": args.ramp,
            "prompt_tokens": args.prompt_tokens,
            "type_words": args.type_words,
            "chinese_every": CHINESE_EVERY,
            "seed": args.seed,
            "time_limit_s": args.time_limit,
            "percentile_min_samples": MIN_SAMPLES,
        },
        "runs": runs,
    }
    if args.hostile:
        out["attacks"] = attacks  # what the hostile visitor got, by attack and outcome ("loops": rounds done)
        out["attacker"] = {"process": "own", "nice": args.attacker_nice, "attacks": list(args.attacks)}
        out["app_peak_rss_mb"] = peak_rss_mb
        for n in writers:
            calm = next(r for r in runs if r["writers"] == n and not r["attacked"])
            hit = next(r for r in runs if r["writers"] == n and r["attacked"])
            out[f"p95_attacked_over_calm_{n}"] = round(hit["p95_ms"] / calm["p95_ms"], 2) if hit["p95_ms"] and calm["p95_ms"] else None
    if single:
        out["p95_over_single_p50"] = {str(r["writers"]): round(r["p95_ms"] / single, 2) if r["p95_ms"] else None for r in runs}
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main()
