"""Many writers at once: N simulated writers press Tab against a local tabwrite server.

    python -m bench.load --json                 # starts `python app.py` on 127.0.0.1 itself
    python -m bench.load --url http://127.0.0.1:7860/ --writers 1 5 20 --presses 3

Each writer is a thread with its own gradio_client, "typing" a different text and calling
/suggest after each few words. Traffic goes to 127.0.0.1 only; every loop is bounded in
count and in time. Prints one JSON object: for each N, p50/p95 latency, errors, and
throughput (presses per second).
"""

from __future__ import annotations

import argparse
import json
import os
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
TEXTS = [
    "The morning train was crowded, and",
    "My grandmother's recipe for apple pie starts with",
    "The committee met on Thursday to discuss",
    "我们周末去爬山的时候，",
    "When the power went out, the whole street",
    "The best advice I ever got about writing was",
]
TIME_LIMIT_S = 600  # the whole run stops by then, whatever is left


def start_app() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            time.sleep(1)
    proc.kill()
    raise SystemExit("the app did not start")


def writer(url: str, index: int, presses: int, max_time: float, out: list, stop_at: float) -> None:
    from gradio_client import Client

    client = Client(url, verbose=False)
    text = TEXTS[index % len(TEXTS)] + f" (writer {index})"
    for press in range(presses):
        if time.time() > stop_at:
            return
        text += " and then"
        started = time.perf_counter()
        try:
            suggestions = client.predict(text, max_time=max_time, api_name="/suggest")
            longest = max((len(t.split()) for t in suggestions), default=0)
            out.append(("ok", time.perf_counter() - started, longest))
        except Exception as e:  # counted, not hidden
            out.append((f"error: {type(e).__name__}: {str(e)[:100]}", time.perf_counter() - started, 0))


def run(url: str, writers: int, presses: int, max_time: float) -> dict:
    results: list = []
    stop_at = time.time() + TIME_LIMIT_S
    threads = [
        threading.Thread(target=writer, args=(url, i, presses, max_time, results, stop_at), daemon=True)
        for i in range(writers)
    ]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, stop_at - time.time()))
    wall = time.perf_counter() - started
    ok = [d for status, d, _ in results if status == "ok"]
    words = [w for status, _, w in results if status == "ok"]
    errors = [status for status, _, _ in results if status != "ok"]
    return {
        "writers": writers,
        "presses": len(results),
        "p50_ms": round(1000 * statistics.median(ok)) if ok else None,
        "p95_ms": round(1000 * percentile(ok, 0.95)) if ok else None,
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "throughput_per_s": round(len(ok) / wall, 2),
        # Under load a press may stop at its time budget with shorter suggestions: this shows it.
        "longest_suggestion_words_mean": round(statistics.mean(words), 1) if words else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", help="a running tabwrite on 127.0.0.1 (default: start one)")
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--presses", type=int, default=3, help="Tab presses per writer")
    parser.add_argument("--max-time", type=float, default=4.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.url and urllib.parse.urlparse(args.url).hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit("bench.load only talks to 127.0.0.1")
    proc, url = (None, args.url) if args.url else start_app()
    try:
        # The single writer is the baseline of the ratio: give it enough presses for a stable median.
        runs = [
            run(url, n, max(args.presses, 10) if n == 1 else min(args.presses, 10), args.max_time)
            for n in sorted(set(min(n, 50) for n in args.writers))
        ]
    finally:
        if proc is not None:
            proc.terminate()
    single = next((r["p50_ms"] for r in runs if r["writers"] == 1), None)
    out = {"url": url, "max_time_s": args.max_time, "runs": runs}
    if single:
        out["p95_over_single_p50"] = {str(r["writers"]): round(r["p95_ms"] / single, 2) for r in runs if r["p95_ms"]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
