"""One cold Tab press through the running app, next to the engine in-process (bench/latency.py).

    python -m bench.app --json                  # default model, 7 presses per path, one JSON object
    python -m bench.app --runs 3 --no-browser   # the API only (no Chromium)
    python -m bench.app --json --greedy         # top-k 1: every press paired with the engine's on equal work

bench/latency.py times the engine in this process ("engine, cold"). A writer waits for more:
the press goes through HTTP, Gradio and, in the editor, the page. This bench times the same
cold press each way, on the same prompt and settings, and gives the ratios to the engine:
- engine_in_process: as bench/latency.py does: `as_the_app_runs` (this, the main thread that
  loaded the model, is the engine's worker, as in app.py), prefix cache emptied before each
  press, `engine.suggest(prompt, settings, seed=run)`, timed by `result.elapsed_s` (all three
  rows final) and `result.first_ready_s` (the first one);
- api_suggest: the /suggest API of a running `python app.py`, through gradio_client, timed
  around the call (it answers all the rows at once: no first-suggestion time);
- api_suggest_http: the same API through its plain HTTP protocol (what `curl` does: POST
  /gradio_api/call/suggest, then read the answer's event stream as it comes), alternating
  press by press with gradio_client's;
- browser: the editor in Debian Chromium (Playwright): Tab in the text area until the answer
  is in the popup (the status line shows "<model> (<device>) · <elapsed_ms> ms"), and until
  the first row is shown. Times are taken in the page (performance.now at the keydown, a
  MutationObserver on the editor; the wait resolves in the page, nothing polls it), so
  Playwright's own round trips are not counted. `server_elapsed` is that elapsed_ms:
  SuggestService.suggest_for_session's own clock, the press inside the app, no transport;
- browser_spinner_still: the same, interleaved with those presses, but with the popup's busy
  spinner (editor.css, tw-spin) not animating: what drawing it costs a press.
Every press is cold: each prompt is the same ~200 tokens (bench/data/heldout.txt[:900], as in
bench/latency.py) behind a different first token ("A. ", "B. ", ...), so the app's prefix
cache, which outlives a press, can reuse nothing of an earlier one. Settings as in
bench/latency.py: rows of 4/12/32 tokens, max_time 30 (never reached), temperature 0.7,
top-k 40, top-p 0.95; in the browser the same through the settings panel, with "Pre-compute
while I pause" off (else the Tab is answered from the pause's result). Each path has one
unmeasured press first (first-use costs). Rows end near their targets where a word or a
sentence does, so a press's work varies with what is sampled (the app's paths take no seed):
`tokens_per_press` and `longest_row_tokens` say whether the paths did equal work, and
`ms_per_longest_row_token_p50` evens it out, roughly (the `per_token_ratio_*`). With so much
spread, a few presses cannot tell 10 % apart; --greedy (top-k 1) can: a prompt's rows are then
the same on every path, the engine presses every path's prompts too, and `paired_*` compares
each press with the engine's on the same prompt (`same_rows_as_engine` checks it was the same
work). Greedy rows are not the editor's, but a step costs the same.
`cpu_ms_per_press_p50` is the CPU used during a press by the app's process, the browser's
processes and this one: on 2 cores that the engine keeps busy, the others' CPU is time the
engine waited for.

The phases run one after another, never at once: on 2 cores, two things timed together would
time each other. The app (phases B, C) is stopped before the engine is loaded here (phase D),
so the paths are not interleaved: drift of the machine between phases shows as noise.

Expected differences, and the figures that isolate them:
- api: a queued Gradio event: gradio_client posts to the queue, then reads the answer from a
  server-sent event stream (its reader sleeps 50 ms when it finds nothing: a press ends in steps
  of 50 ms). `floor_p50_ms` is that alone: a press on blank text, which the engine answers
  without running the model. A fixed cost, not a share of the press. api_suggest_http reads the
  same stream without sleeping: its floor is the app's own (Gradio's queue, HTTP, JSON).
- browser: the editor calls a server function (not queued; one POST answered from Gradio's
  thread pool) whose clock gives `server_elapsed`. While it runs, the page polls
  suggestion_progress, each poll waiting on the server until a row more is ready (editor.js
  followProgress): the first row shows a round trip after it was ready, and each poll is a
  request the server answers (Python, under the GIL) while the engine decodes. Chromium runs
  on the same 2 cores, as a local app's browser does. `floor_p50_ms`: a Tab on an empty text.
- no worker-thread difference: app.py serves presses on its main thread
  (`engine.serve()`), the thread that loaded the model, and phase D does the same.
So: server_elapsed - engine is the engine inside the app, browser - server_elapsed is the
transport and the page, and api - engine should be about the api's floor.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from bench.load import cpu_model

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "bench" / "data" / "heldout.txt"
CHROMIUM = os.environ.get("TABWRITE_CHROMIUM", "/usr/bin/chromium")
# As tests/browser/conftest.py launches it.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# A different first token for every press of the app: one token each (checked: prompt_tokens_range).
LEADS = [f"{c}. " for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"]
MAX_RUNS = (len(LEADS) - 3) // 4  # the two API clients and the browser need runs + 1 each, the still spinner runs
LENGTHS = [4, 12, 32]
CALL = {"temperature": 0.7, "top_k": 40, "top_p": 0.95, "lengths": ", ".join(map(str, LENGTHS)), "max_time": 30.0}
PRESS_TIMEOUT_S = 90  # a press takes 1-2 s here; max_time is 30
TICK = os.sysconf("SC_CLK_TCK")
STATUS_MS = re.compile(r"·\s*(\d+)\s*ms")

# In the page: the moment of the Tab keydown (capture phase, before editor.js handles it) and
# the moments the editor's DOM first shows a row, three rows, and the answer (the status line
# gets "... ms" and the popup stops being busy; editor.js does these in one task on the answer).
# And a style sheet, off unless asked for, that stops the popup's busy spinner from spinning.
INSTALL_PROBE = """() => {
  const root = document.querySelector('#editor');
  const area = root.querySelector('textarea');
  const status = root.querySelector('.tw-status');
  const busy = root.querySelector('.tw-popup-status');
  const rec = window.__twBench = {tab: null, first: null, three: null, done: null, resolve: null};
  const still = document.createElement('style');
  still.id = 'tw-bench-still';
  still.textContent = '#editor .tw-popup-status.tw-busy::before { animation: none !important; }';
  document.head.appendChild(still);
  still.sheet.disabled = true;
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Tab' && e.target === area) rec.tab = performance.now();
  }, true);
  new MutationObserver(() => {
    if (rec.tab === null) return;
    const now = performance.now();
    const n = root.querySelectorAll('[role=option]').length;
    if (n >= 1 && rec.first === null) rec.first = now;
    if (n >= 3 && rec.three === null) rec.three = now;
    if (rec.done === null && / ms/.test(status.textContent) && !busy.classList.contains('tw-busy')) {
      rec.done = now;
      if (rec.resolve) rec.resolve();
    }
  }).observe(root, {subtree: true, childList: true, attributes: true, characterData: true});
}"""
# Before each press: forget the last one, blank the status line (it still says "... ms"), and
# let the spinner spin or not.
RESET_PROBE = """(still) => {
  Object.assign(window.__twBench, {tab: null, first: null, three: null, done: null, resolve: null});
  document.querySelector('#editor .tw-status').textContent = '';
  document.getElementById('tw-bench-still').sheet.disabled = !still;
}"""
WAIT_PROBE = """(timeout) => new Promise((resolve) => {
  const rec = window.__twBench;
  if (rec.done !== null) return resolve();
  rec.resolve = resolve;
  setTimeout(resolve, timeout);
})"""
READ_PROBE = """() => ({
  ...window.__twBench,
  status: document.querySelector('#editor .tw-status').textContent,
  options: [...document.querySelectorAll('#editor [role=option] .tw-option-text')].map((e) => e.textContent),
})"""


def log(message: str) -> None:
    print(f"[bench.app] {message}", file=sys.stderr, flush=True)


def ms(values) -> int | None:
    return round(statistics.median(values)) if values else None


def ratio(a, b) -> float | None:
    return round(a / b, 2) if a and b else None


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: [state, ppid, ...]; utime and stime at 11 and 12."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_s(pids) -> float:
    """CPU seconds (user + system, all threads) used so far by the processes ``pids``."""
    total = 0
    for pid in pids:
        fields = stat_fields(pid)
        total += int(fields[11]) + int(fields[12]) if fields else 0
    return total / TICK


def descendants(root: int, but: int) -> list[int]:
    """The processes below ``root`` (Playwright's driver, Chromium's), except ``but`` and those below it."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        fields = stat_fields(int(name)) if name.isdigit() else None
        if fields:
            children.setdefault(int(fields[1]), []).append(int(name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child != but:
                out.append(child)
                todo.append(child)
    return out


class CpuMeter:
    """CPU milliseconds of the app, the browser's processes and this one, press by press.

    Where a press's wall time goes when the engine (which keeps both cores busy) has to share
    them: CPU the others use in that time is CPU the engine's threads waited for.
    """

    def __init__(self, app: subprocess.Popen | None):
        self.app = app
        self.presses: list[dict] = []

    def _now(self) -> dict:
        browser = descendants(os.getpid(), self.app.pid) if self.app else []
        return {
            "app": cpu_s([self.app.pid]) if self.app else 0.0,
            "browser": cpu_s(browser),
            "bench": time.process_time(),
        }

    def start(self) -> None:
        self._started = self._now()

    def stop(self) -> None:
        now = self._now()
        self.presses.append({k: 1000 * (now[k] - self._started[k]) for k in now})

    def p50(self) -> dict:
        return {k: ms([p[k] for p in self.presses]) for k in ("app", "browser", "bench")}


def prompts(text: str, first: int, count: int) -> list[str]:
    return [LEADS[first + k] + text for k in range(count)]


# ---------------------------------------------------------------- phase A: the app


def start_app(model: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    """`python app.py` on 127.0.0.1 and a free port (as tests/serving.running_app); its log in ``workdir``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
        TABWRITE_DB=str(workdir / "documents.sqlite3"),  # the writer's own documents stay untouched
    )
    log_path = workdir / "app.log"
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "app.py", "--model", model, "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 300  # a first start converts the model
    while proc.poll() is None and time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    stop_app(proc)
    raise SystemExit(f"the app did not start:\n{log_path.read_text()[-2000:]}")


def stop_app(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- phase B: /suggest


class HttpSuggest:
    """/suggest over Gradio's documented HTTP protocol, as `curl` calls it: POST
    /gradio_api/call/suggest gives an event id, GET /gradio_api/call/suggest/<id> streams the
    answer as server-sent events. Read as it comes, with no polling: what the app costs."""

    def __init__(self, url: str):
        parts = urllib.parse.urlparse(url)
        self.host, self.port = parts.hostname, parts.port

    def predict(self, text: str, call: dict) -> list[str]:
        order = ("temperature", "top_k", "top_p", "lengths", "max_time", "model")
        body = json.dumps({"data": [text, *(call.get(k, "") for k in order), ""]})
        conn = http.client.HTTPConnection(self.host, self.port, timeout=PRESS_TIMEOUT_S)
        try:
            conn.request("POST", "/gradio_api/call/suggest", body, {"Content-Type": "application/json"})
            event = json.loads(conn.getresponse().read())["event_id"]
            conn.request("GET", f"/gradio_api/call/suggest/{event}")
            answer = conn.getresponse()
            kind = ""
            while line := answer.readline():
                line = line.decode().strip()
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:") and kind in ("complete", "error"):
                    data = json.loads(line[5:])
                    if kind == "error":
                        raise RuntimeError(str(data)[:100])
                    return [str(r) for r in data[0] or []]
            raise RuntimeError("the answer's stream ended without one")
        finally:
            conn.close()


def api_presses(url: str, app: subprocess.Popen, call: dict, warm: str, texts: list[str], http_texts: list[str]) -> tuple[dict, dict]:
    """/suggest through gradio_client (``texts``) and through plain HTTP (``http_texts``), alternating."""
    from gradio_client import Client

    client = Client(url, verbose=False)  # connecting is not part of a press
    client.predict(warm, **call, api_name="/suggest")
    plain = HttpSuggest(url)
    ways = {
        "client": lambda text: client.predict(text, **call, api_name="/suggest"),
        "http": lambda text: plain.predict(text, call),
    }
    prompts_of = {"client": texts, "http": http_texts}
    outs = {way: {"times_ms": [], "floor_ms": [], "prompts": [], "rows": [], "errors": [], "cpu": CpuMeter(app)} for way in ways}

    def press(way: str, text: str) -> None:
        out, fn = outs[way], ways[way]
        out["cpu"].start()
        started = time.perf_counter()
        try:
            answer = fn(text)
        except Exception as e:  # counted, not hidden
            out["errors"].append(f"{type(e).__name__}: {str(e)[:100]}")
            return
        out["times_ms"].append(1000 * (time.perf_counter() - started))
        out["cpu"].stop()
        out["prompts"].append(text)
        out["rows"].append([str(r) for r in answer or []])

    for run in range(min(len(texts), len(http_texts))):
        # Alternating which goes first, so that drift of the machine hits both alike.
        for way in (("client", "http") if run % 2 == 0 else ("http", "client")):
            press(way, prompts_of[way][run])
    for way, fn in ways.items():
        for _ in texts:
            # Blank text: the engine answers "Type a few words first" without the model, and the
            # API raises it as an error: the round trip of a press, and nothing else.
            started = time.perf_counter()
            try:
                fn(" ")
            except Exception:
                pass
            outs[way]["floor_ms"].append(1000 * (time.perf_counter() - started))
    client.close()
    return outs["client"], outs["http"]


# ---------------------------------------------------------------- phase C: the browser


def browser_presses(url: str, app: subprocess.Popen, call: dict, warm: str, texts: list[str], still_texts: list[str]) -> dict:
    """The editor's Tab, ``texts``; interleaved with the same with its busy spinner not spinning, ``still_texts``."""
    from playwright.sync_api import sync_playwright

    area = "#editor textarea"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
            page.goto(url)
            page.wait_for_selector(area, timeout=60_000)
            page.wait_for_selector("#settings-status :text('ready')", timeout=120_000)
            # Pre-compute off first: the max-time change that follows sends every setting again,
            # so once its status line is shown, both are the session's settings.
            page.get_by_label("Pre-compute while I pause").uncheck()
            lengths = page.get_by_label("Suggestion lengths (tokens)")
            if lengths.input_value().replace(" ", "") != call["lengths"].replace(" ", ""):
                lengths.fill(call["lengths"])
                lengths.press("Enter")
            if call["top_k"] != CALL["top_k"]:  # --greedy; the panel's default is CALL's
                box = page.locator('input[aria-label="number input for Top-k"]')
                box.fill(str(call["top_k"]))
                box.press("Enter")
            box = page.locator('input[aria-label="number input for Max time per Tab (s)"]')
            box.fill(f"{call['max_time']:g}")
            box.press("Enter")
            # Temperature and top-p are left at the panel's defaults: the status line shows they
            # are the call's too.
            shown = (
                f"Temperature {call['temperature']:g} · top-k {call['top_k']} · top-p {call['top_p']:g}"
                f" · lengths {'/'.join(map(str, LENGTHS))} · ≤ {call['max_time']:g} s per Tab"
            )
            page.wait_for_selector(f"#settings-status :text('{shown}')", timeout=30_000)
            settings_line = page.inner_text("#settings-status")
            page.evaluate(INSTALL_PROBE)

            def press(text: str, meter: CpuMeter | None = None, still: bool = False) -> dict:
                page.keyboard.press("Escape")  # close the last popup
                page.click(area)
                page.keyboard.press("Control+a")
                if text:
                    page.keyboard.insert_text(text)  # as pasted: one input event
                else:
                    page.keyboard.press("Delete")
                page.wait_for_timeout(200)  # the page idle before the Tab
                page.evaluate(RESET_PROBE, still)
                if meter:
                    meter.start()
                page.keyboard.press("Tab")
                # Resolved by the page itself when the answer is shown: no polling from here.
                page.evaluate(WAIT_PROBE, PRESS_TIMEOUT_S * 1000)
                if meter:
                    meter.stop()
                return dict(page.evaluate(READ_PROBE), prompt=text)

            press(warm)
            spinning, still = CpuMeter(app), CpuMeter(app)
            records, still_records = [], []
            for run, (text, still_text) in enumerate(zip(texts, still_texts)):
                # Alternating which goes first, so that drift of the machine hits both alike.
                if run % 2 == 0:
                    records.append(press(text, spinning))
                    still_records.append(press(still_text, still, still=True))
                else:
                    still_records.append(press(still_text, still, still=True))
                    records.append(press(text, spinning))
            floors = [press("") for _ in texts]  # "Type a few words first", without the model
        finally:
            browser.close()
    return {
        "spinning": tally(records, spinning), "still": tally(still_records, still),
        "floor_ms": [r["done"] - r["tab"] for r in floors if r["done"] is not None],
        "floor_server_ms": [int(m.group(1)) for r in floors if (m := STATUS_MS.search(r["status"]))],
        "settings_line": settings_line,
    }


def tally(records: list[dict], cpu: CpuMeter) -> dict:
    out = {"times_ms": [], "first_ms": [], "server_ms": [], "prompts": [], "rows": [], "errors": [], "cpu": cpu}
    for r in records:
        server = STATUS_MS.search(r["status"])
        if r["done"] is None or "pre-computed" in r["status"] or server is None:
            out["errors"].append(f"status line: {r['status'][:100]!r}")
            continue
        out["times_ms"].append(r["done"] - r["tab"])
        out["first_ms"].append((r["first"] if r["first"] is not None else r["done"]) - r["tab"])
        out["server_ms"].append(int(server.group(1)))
        out["prompts"].append(r["prompt"])
        out["rows"].append(r["options"])
    return out


# ---------------------------------------------------------------- phase D: the engine here


def engine_presses(model: str, call: dict, warm: str, texts: list[str]) -> tuple[dict, object]:
    """bench/latency.py's "engine, cold", on the same prompts as the app's presses."""
    import torch

    from bench.latency import as_the_app_runs
    from editor.service import SuggestService
    from models.settings import Settings

    torch.manual_seed(0)
    engine = SuggestService(model).engine()
    settings = Settings(
        lengths=list(LENGTHS), max_time=call["max_time"], temperature=call["temperature"],
        top_k=call["top_k"], top_p=call["top_p"],
    )
    as_the_app_runs(engine, lambda: engine.suggest(warm, settings, seed=0))
    out = {"times_ms": [], "first_ms": [], "row_tokens": [], "steps": [], "prompts": [], "rows": [], "cpu": CpuMeter(None)}

    def one(run: int, text: str) -> None:
        engine.prefixes.clear()  # Tab right after the text changed
        out["cpu"].start()
        result = engine.suggest(text, settings, seed=run)
        out["cpu"].stop()
        out["times_ms"].append(1000 * result.elapsed_s)
        out["first_ms"].append(1000 * (result.first_ready_s or result.elapsed_s))
        out["row_tokens"].append(sum(result.row_tokens))
        out["steps"].append(result.steps)
        out["prompts"].append(text)
        out["rows"].append(result.texts)

    for run, text in enumerate(texts):
        as_the_app_runs(engine, lambda: one(run, text))
    return out, engine


# ---------------------------------------------------------------- the run


def summary(run: dict, engine, first: bool = True, server: bool = False) -> dict:
    """A path's figures: p50s of its presses (all rows shown; the first row; the app's own clock)."""
    counts = [[len(engine.tokenizer(t, add_special_tokens=False).input_ids) for t in r] for r in run["rows"]]
    longest = [max(c, default=0) for c in counts]
    out = {
        "p50_ms": ms(run["times_ms"]),
        "first_p50_ms": ms(run["first_ms"]) if first else None,
        "server_elapsed_p50_ms": ms(run["server_ms"]) if server else None,
        # Rows end near their targets where a word or sentence does: the work varies with what is
        # sampled (from 400 to 1600 ms a press here). Their text, re-tokenized the same way on
        # every path, says whether the work was equal. The rows decode together, one token each
        # a step, so a press takes about prefill + (its longest row's tokens) steps: ms per
        # token of the longest row evens the work out, roughly (the prefill is in every press).
        "tokens_per_press": round(statistics.mean(map(sum, counts)), 1) if counts else None,
        "longest_row_tokens": round(statistics.mean(longest), 1) if longest else None,
        "ms_per_longest_row_token_p50": round(statistics.median(t / max(1, n) for t, n in zip(run["times_ms"], longest)), 1)
        if longest else None,
        # CPU used during a press by the app's process, the browser's processes and this one.
        "cpu_ms_per_press_p50": run["cpu"].p50(),
        "ms": [round(t) for t in run["times_ms"]],
    }
    if server:
        out["server_elapsed_ms"] = run["server_ms"]
    if "errors" in run:
        out["errors"] = run["errors"]
    return out


def pick(run: dict, prompts: list[str]) -> dict:
    """The presses of ``run`` on ``prompts`` only."""
    keep = [i for i, p in enumerate(run["prompts"]) if p in prompts]
    cpu = CpuMeter(None)
    cpu.presses = [run["cpu"].presses[i] for i in keep]
    pressed = ("times_ms", "first_ms", "row_tokens", "steps", "prompts", "rows")  # one entry a press
    return {k: [v[i] for i in keep] if k in pressed else v for k, v in run.items()} | {"cpu": cpu}


def paired(run: dict, engine_run: dict) -> dict:
    """--greedy: each press against the engine's on the same prompt, whose rows are then the same."""
    at = {p: i for i, p in enumerate(engine_run["prompts"])}
    pairs = [(i, at[p]) for i, p in enumerate(run["prompts"]) if p in at]
    same = [
        [t.lstrip(" \t") for t in run["rows"][i]] == [t.lstrip(" \t") for t in engine_run["rows"][j]] for i, j in pairs
    ]
    out = {
        "paired_ratio_p50": round(statistics.median(run["times_ms"][i] / engine_run["times_ms"][j] for i, j in pairs), 2),
        "paired_extra_ms_p50": ms([run["times_ms"][i] - engine_run["times_ms"][j] for i, j in pairs]),
        "same_rows_as_engine": f"{sum(same)}/{len(same)}",
    }
    if run.get("server_ms"):
        out["paired_server_elapsed_extra_ms_p50"] = ms([run["server_ms"][i] - engine_run["times_ms"][j] for i, j in pairs])
    if run.get("first_ms"):
        out["paired_first_extra_ms_p50"] = ms([run["first_ms"][i] - engine_run["first_ms"][j] for i, j in pairs])
    return out


def main() -> None:
    from models.registry import DEFAULT_MODEL
    from models.settings import Settings

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--runs", type=int, default=7, help=f"presses per path (at most {MAX_RUNS})")
    parser.add_argument("--no-browser", action="store_true", help="skip the browser (phase C)")
    parser.add_argument(
        "--greedy", action="store_true",
        help="top-k 1: each prompt's rows are then the same on every path, and the engine also presses "
        "every path's prompts, so each press is compared with the engine's on the same work (paired_*)",
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    args = parser.parse_args()
    runs = max(1, min(args.runs, MAX_RUNS))
    text = HELDOUT.read_text(encoding="utf-8")[:900]  # about 200 tokens of English
    api_warm, *api_texts = prompts(text, 0, runs + 1)
    browser_warm, *browser_texts = prompts(text, runs + 1, runs + 1)
    still_texts = prompts(text, 2 * runs + 2, runs)
    http_texts = prompts(text, 3 * runs + 2, runs)
    call = dict(CALL, top_k=1) if args.greedy else dict(CALL)

    browser_skip = "--no-browser" if args.no_browser else None
    if browser_skip is None and not (shutil.which(CHROMIUM) or os.path.exists(CHROMIUM)):
        browser_skip = f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)"
    if browser_skip is None:
        try:
            import playwright.sync_api  # noqa: F401 - only whether it is there
        except ImportError:
            browser_skip = "playwright is not installed (tests/requirements.txt)"

    with tempfile.TemporaryDirectory(prefix="bench-app-") as workdir:
        log(f"phase A: starting app.py --model {args.model}")
        started = time.perf_counter()
        proc, url = start_app(args.model, Path(workdir))
        app_start_s = time.perf_counter() - started
        try:
            log(f"phase B: /suggest, {runs} presses at {url}")
            api, api_http = api_presses(url, proc, dict(call, model=args.model), api_warm, api_texts, http_texts)
            browser = None
            if browser_skip is None:
                log(f"phase C: Chromium, {runs} presses, and {runs} with the spinner still")
                try:
                    browser = browser_presses(url, proc, call, browser_warm, browser_texts, still_texts)
                except Exception as e:  # the other paths still count; say why this one is missing
                    browser_skip = f"{type(e).__name__}: {str(e).strip()[:300]}"
        finally:
            stop_app(proc)
    # With --greedy, on every path's prompts too: the pairs of presses on equal work.
    engine_texts = api_texts + (http_texts if args.greedy else []) + (browser_texts + still_texts if args.greedy and browser else [])
    log(f"phase D: the engine in this process, {len(engine_texts)} presses")
    engine_all, engine = engine_presses(args.model, call, api_warm, engine_texts)
    engine_run = pick(engine_all, api_texts)  # its figures: as many presses as the other paths

    context = Settings().context_tokens  # the app's default, which no path changes
    prompt_tokens = [len(engine.prompt_ids(t, context)[0]) for t in api_texts + http_texts + browser_texts + still_texts]
    engine_out = summary(engine_run, engine)
    engine_out["sampled_tokens_per_press"] = round(statistics.mean(engine_run["row_tokens"]), 1)
    engine_out["steps_per_press"] = round(statistics.mean(engine_run["steps"]), 1)  # vs longest_row_tokens
    api_out = summary(api, engine, first=False)  # the API answers all rows at once, with no clock of the app's
    api_out["floor_p50_ms"] = ms(api["floor_ms"])
    http_out = summary(api_http, engine, first=False)
    http_out["floor_p50_ms"] = ms(api_http["floor_ms"])
    out = {
        "model": engine.name,
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "runs": runs,
        "prompt_tokens": round(statistics.median(prompt_tokens)),
        "prompt_tokens_range": [min(prompt_tokens), max(prompt_tokens)],
        "settings": call,
        "app_start_s": round(app_start_s, 1),
        "engine_in_process": engine_out,
        "api_suggest": api_out,
        "api_suggest_http": http_out,
    }
    if browser is None:
        out["browser"] = {"skipped": browser_skip}
    else:
        out["browser"] = summary(browser["spinning"], engine, server=True)
        out["browser"].update({
            "floor_p50_ms": ms(browser["floor_ms"]),
            "floor_server_elapsed_p50_ms": ms(browser["floor_server_ms"]),
            "settings_line": browser["settings_line"],
        })
        # The same presses with the popup's busy spinner (editor.css tw-spin) not animating.
        out["browser_spinner_still"] = summary(browser["still"], engine, server=True)
    engine_p50, engine_first = engine_out["p50_ms"], engine_out["first_p50_ms"]
    out["ratio_api_vs_engine"] = ratio(api_out["p50_ms"], engine_p50)
    out["ratio_api_http_vs_engine"] = ratio(http_out["p50_ms"], engine_p50)
    for name in ("browser", "browser_spinner_still"):
        path = out.get(name, {})
        out[f"ratio_{name}_vs_engine"] = ratio(path.get("p50_ms"), engine_p50)
        out[f"ratio_{name}_server_elapsed_vs_engine"] = ratio(path.get("server_elapsed_p50_ms"), engine_p50)
        out[f"first_ratio_{name}_vs_engine"] = ratio(path.get("first_p50_ms"), engine_first)
    per_token = engine_out["ms_per_longest_row_token_p50"]
    out["per_token_ratio_api_vs_engine"] = ratio(api_out["ms_per_longest_row_token_p50"], per_token)
    out["per_token_ratio_api_http_vs_engine"] = ratio(http_out["ms_per_longest_row_token_p50"], per_token)
    for name in ("browser", "browser_spinner_still"):
        out[f"per_token_ratio_{name}_vs_engine"] = ratio(out.get(name, {}).get("ms_per_longest_row_token_p50"), per_token)
    if args.greedy:
        out["api_suggest"].update(paired(api, engine_all))
        out["api_suggest_http"].update(paired(api_http, engine_all))
        if browser is not None:
            out["browser"].update(paired(browser["spinning"], engine_all))
            out["browser_spinner_still"].update(paired(browser["still"], engine_all))
    if not args.json:
        print(f"# {engine.name}: one cold Tab press, engine in-process / /suggest API / browser, {runs} each", flush=True)
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    main()
