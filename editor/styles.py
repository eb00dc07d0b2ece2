"""Learned styles ("Learn my style", the API's /personalize): the job that learns one, and where they are kept.

A style is a LoRA adapter of one offered base model, trained on a writer's own text
(models/style.py), and, where it reads the writer's text better, a cache of that text blended
in (models/textcache.py). It is saved under the cache folder, ``<cache>/styles/<id>/`` (the
LoRA matrices, ``style.json``, and with a cache the text as tokens), tied to an owner key that
is stored hashed, as documents' keys are. Its model name is ``<base>+<name>@<id>``: the id is
96 random bits, so the name is what lets a writer (or their API client) use the style, like a
share link, and nobody can guess another writer's; listing and deleting need the owner key.

One style is learned at a time on a server; another request meanwhile is answered BUSY at
once. Each job is bounded: text (the last MAX_CHARS characters are read), time
(MAX_SECONDS, then it stops), and it waits while Tab presses are served. A server reachable
by others learns styles only when its operator says so (app.py --personalize).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import secrets
import shutil
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Callable

from editor.documents import TOKEN, key_hash
from models.core import clean_prompt, dtype_name, give_back_memory
from models.registry import ModelNotFound, cache_root

MIN_CHARS = 2000
MAX_CHARS = int(os.environ.get("TABWRITE_STYLE_MAX_CHARS", 60000))  # a longer text: its last MAX_CHARS characters
MAX_SECONDS = float(os.environ.get("TABWRITE_STYLE_MAX_S", 600))  # a job stops after this long (training and measuring)
TAIL_S = 15.0  # at least this long is left after the training for the job's last stages
# The stages after the training take this many times as long as those before it: they read the
# held-out text as the base model's measure did, and also half as much again (the cache's weight
# is chosen on the training text's last ~1,200 characters), fold the adapter in and write the
# examples. Chinese with a writer pressing Tab (EPYC, 2026-12-07): 18 s before, 32 s after, and
# the job took 294 s of its 280 s plan (23 s after 13 before, without the cache).
AFTER_RATIO = 1.75
MAX_STYLES = int(os.environ.get("TABWRITE_MAX_STYLES", 100))  # on this server
STYLES_PER_OWNER = 8
IN_MEMORY = 2  # learned styles kept loaded (each ~300 MB for Gemma 3 270M: its body in the tuned formats)
EXAMPLES = 3  # held-out sentences shown with the base model's and the style's suggestions
TEXT_FILE = "text.safetensors"  # the writer's text as tokens, for a style that blends a cache of it in
MIN_CACHE_CHECK = 300  # characters of the training text's end read to choose the cache's weight, at least

NAME = re.compile(r"[\w-]{1,32}")  # letters (any script), digits, '_' and '-'
MODEL = re.compile(r"(?P<base>.+)\+(?P<name>[\w-]{1,32})@(?P<id>[A-Za-z0-9_-]{16})")
OFF = "Learning a style is switched off on this server (its operator can turn it on: python app.py --personalize)."
BUSY = "Busy: another style is being learned on this server; try again in a few minutes."
TOO_SHORT = "Too little text to learn a style from: {n} characters; at least {min} are needed (the more, the better)."
BAD_NAME = "The name of a style is 1 to 32 letters, digits, '-' or '_'."
UNKNOWN = "'{model}' is not a style this app has (it may have been deleted)."
FULL = "This server keeps no more styles ({n}); delete one of yours first."
TOO_MANY_YOURS = "You have {n} styles, the most one writer can keep; delete one first."
REMOTE = "Learning a style needs the model in this process (not --backend openai)."


def model_name(base: str, name: str, style_id: str) -> str:
    return f"{base}+{name}@{style_id}"


def parse(model: str) -> dict | None:
    """{"base", "name", "id"} of a style's model name, or None when ``model`` names no style."""
    found = MODEL.fullmatch(model or "")
    return found.groupdict() if found else None


class StyleError(Exception):
    """One line for the writer."""


# ---------------------------------------------------------------- on disk


class StyleStore:
    """The styles on disk: ``<folder>/<id>/adapter.safetensors`` and ``style.json``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._lock = threading.Lock()

    def _dir(self, style_id: str) -> Path | None:
        return self.folder / style_id if TOKEN.fullmatch(style_id or "") else None

    def meta(self, style_id: str) -> dict | None:
        where = self._dir(style_id)
        try:
            return json.loads((where / "style.json").read_text()) if where else None
        except (OSError, ValueError):
            return None

    def state(self, style_id: str) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self._dir(style_id) / "adapter.safetensors"))

    def text_ids(self, style_id: str) -> list[int]:
        """The writer's text as tokens, where the style blends a cache of it in (else [])."""
        from safetensors.torch import load_file

        where = self._dir(style_id) / TEXT_FILE
        return load_file(str(where))["ids"].tolist() if where.is_file() else []

    def _all(self) -> list[dict]:
        if not self.folder.is_dir():
            return []
        return [m for m in (self.meta(p.name) for p in self.folder.iterdir() if p.is_dir()) if m]

    def check_room(self, owner_key: str) -> None:
        """StyleError when the server, or this owner, keeps as many styles as allowed."""
        everything = self._all()
        if len(everything) >= MAX_STYLES:
            raise StyleError(FULL.format(n=MAX_STYLES))
        mine = [m for m in everything if secrets.compare_digest(m["owner"], key_hash(owner_key))]
        if len(mine) >= STYLES_PER_OWNER:
            raise StyleError(TOO_MANY_YOURS.format(n=len(mine)))

    def save(self, owner_key: str, base: str, name: str, state: dict, config: dict, figures: dict,
             text_ids: list[int] = ()) -> dict:
        """Write a new style; its public description (model name included). ``text_ids``: the
        writer's text as tokens, kept only where the style blends a cache of it in."""
        import torch
        from safetensors.torch import save_file

        with self._lock:
            self.check_room(owner_key)
            style_id = secrets.token_urlsafe(12)
            where = self.folder / style_id
            partial = self.folder / f".{style_id}.partial"
            partial.mkdir(parents=True, mode=0o700)
            save_file(state, str(partial / "adapter.safetensors"))
            if text_ids:
                save_file({"ids": torch.tensor(list(text_ids), dtype=torch.int32)}, str(partial / TEXT_FILE))
            meta = {
                "id": style_id, "model": model_name(base, name, style_id), "name": name, "base": base,
                "owner": key_hash(owner_key), "created": time.time(), "config": config, **figures,
            }
            (partial / "style.json").write_text(json.dumps(meta))
            os.replace(partial, where)  # atomic: a style is whole or absent
            return public(meta)

    def mine(self, owner_key: str) -> list[dict]:
        hashed = key_hash(owner_key)
        found = [public(m) for m in self._all() if secrets.compare_digest(m["owner"], hashed)]
        return sorted(found, key=lambda m: m["created"])

    def delete(self, style_id: str, owner_key: str) -> bool:
        meta = self.meta(style_id)
        if meta is None or not secrets.compare_digest(meta["owner"], key_hash(owner_key)):
            return False
        shutil.rmtree(self._dir(style_id), ignore_errors=True)
        return True


def public(meta: dict) -> dict:
    """What a writer is shown of a style (never the owner's hash)."""
    return {k: v for k, v in meta.items() if k not in ("owner", "config")}


# ---------------------------------------------------------------- the styles of a running app


class Styles:
    """Learning styles and serving them, for one SuggestService.

    ``base_engine(name)``: the engine of an offered base model (SuggestService.engine).
    """

    def __init__(self, base_engine: Callable, folder: Path | None = None, enabled: bool = True, config=None):
        self.store = StyleStore(folder or cache_root() / "styles")
        self.enabled = enabled
        self.config = config  # models.style.StyleConfig (None: its defaults)
        self._base_engine = base_engine
        self._engines: OrderedDict[str, object] = OrderedDict()  # style id -> its SuggestionEngine
        self._engines_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._job = threading.Lock()  # held by the one job running
        self.progress = None  # the running job's models.style.Progress, for the page
        self._cancel = threading.Event()
        self._owner = None  # who may cancel the running job from the page (a session id)

    # -- serving

    def engine(self, model: str):
        """The engine of the style ``model`` ("<base>+<name>@<id>"), loaded on first use."""
        found = parse(model)
        with self._engines_lock:  # every press on a style comes here: no disk read for a loaded one
            engine = self._engines.get(found["id"]) if found else None
            if engine is not None and engine.name == model:
                self._engines.move_to_end(found["id"])
                return engine
        meta = self.store.meta(found["id"]) if found else None
        if meta is None or meta["model"] != model:
            raise ModelNotFound(UNKNOWN.format(model="".join(c for c in str(model)[:60] if c.isprintable())))
        with self._load_lock:
            with self._engines_lock:
                if meta["id"] in self._engines:
                    return self._engines[meta["id"]]
            engine = self._make_engine(meta, self.store.state(meta["id"]))
            with self._engines_lock:
                self._engines[meta["id"]] = engine
                while len(self._engines) > IN_MEMORY:
                    self._engines.popitem(last=False)
            return engine

    def _make_engine(self, meta: dict, state: dict):
        from models.engine import SuggestionEngine
        from models.style import StyleConfig, merged
        from models.textcache import TextCache

        base = self._base_engine(meta["base"])
        config = StyleConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
        engine = SuggestionEngine(merged(base.loaded, base.loaded.folder, state, config, meta["model"]))
        weight = float(meta.get("text_cache_weight") or 0.0)
        if weight > 0:
            engine.text_cache = TextCache(self.store.text_ids(meta["id"]), engine.model.config.vocab_size, weight)
        return engine

    def forget(self, style_id: str) -> None:
        with self._engines_lock:
            self._engines.pop(style_id, None)

    # -- learning

    def owned_by(self, owner: str | None) -> bool:
        return owner is not None and owner == self._owner

    def cancel(self, owner: str | None = None) -> bool:
        """Call off the running job (only its own page may, when ``owner`` is given)."""
        if self._job.locked() and (owner is None or owner == self._owner):
            self._cancel.set()
            return True
        return False

    def learn(self, text, name, base: str, owner_key=None, caller_gone=None, owner: str | None = None,
              on_progress: Callable | None = None) -> dict:
        """Learn a style from ``text``; the figures and the new model's name, or {"error": line}. Never raises."""
        if not self.enabled:
            return {"error": OFF}
        try:
            text, name, owner_key = self._checked(text, name, owner_key)
            self.store.check_room(owner_key)
        except StyleError as e:
            return {"error": str(e)}
        if not self._job.acquire(blocking=False):
            return {"error": BUSY}
        self._cancel.clear()
        self._owner = owner
        try:
            return self._learn(text, name, base, owner_key, caller_gone, on_progress)
        except StyleError as e:
            return {"error": str(e)}
        except Exception as e:  # noqa: BLE001 - one line, never a traceback in the page
            return {"error": f"Learning the style failed: {type(e).__name__}: {str(e)[:200]}"}
        finally:
            self.progress, self._owner = None, None
            self._job.release()

    @staticmethod
    def _checked(text, name, owner_key) -> tuple[str, str, str]:
        if not isinstance(text, str):
            raise StyleError(TOO_SHORT.format(n=0, min=MIN_CHARS))
        text = clean_prompt(text[-MAX_CHARS:]).strip()
        if len(text) < MIN_CHARS:
            raise StyleError(TOO_SHORT.format(n=len(text), min=MIN_CHARS))
        name = name.strip() if isinstance(name, str) else ""
        if not NAME.fullmatch(name):
            raise StyleError(BAD_NAME)
        if owner_key in (None, ""):
            owner_key = secrets.token_urlsafe(24)
        elif not isinstance(owner_key, str) or not TOKEN.fullmatch(owner_key):
            raise StyleError("The owner key is not one this app gives out (up to 64 letters, digits, '-' and '_').")
        return text, name, owner_key

    def _learn(self, text: str, name: str, base_name: str, owner_key: str, caller_gone, on_progress) -> dict:
        import gc

        from models import scoring, style
        from models.engine import SuggestionEngine
        from models.textcache import TextCache

        started = time.monotonic()
        base = self._base_engine(base_name)
        if getattr(base, "loaded", None) is None:
            raise StyleError(REMOTE)
        config = self.config or style.StyleConfig()
        train_text, held = style.split(text, config.holdout)

        def say(progress) -> None:
            self.progress = progress
            if on_progress is not None:
                on_progress(progress)

        def should_stop() -> str | None:
            if self._cancel.is_set():
                return "Cancelled."
            if caller_gone is not None and caller_gone():
                return "Cancelled: the caller went away."
            if time.monotonic() - started > MAX_SECONDS:
                return f"Stopped: learning a style may take at most {MAX_SECONDS:.0f} s on this server."
            return None

        def scored(engine, text: str) -> dict:
            """``text`` read by ``engine`` (scoring's answer), unless the job is to stop: asked
            before each window and each chunk of the output layer, as for a visitor gone away,
            so a cancel takes effect within a window, not after the whole read."""
            why = should_stop()
            if why:
                raise StyleError(why)
            answer = scoring.score_local(engine, text, alternatives=0, caller_gone=lambda: should_stop() is not None)
            if "error" in answer:
                raise StyleError(should_stop() or answer["error"])
            return answer

        def bits(engine) -> float:
            return scored(engine, held)["bits_per_char"]

        say(style.Progress("measuring the base model on your held-out text"))
        before = bits(base)
        say(style.Progress("preparing the model for training"))
        model = style.trainable(base.loaded.folder, config)
        _log(f"learning style '{name}' of {base_name}: {len(train_text)} characters, {len(held)} held out")
        if config.precision == "auto":
            chosen, timed = style.measured_precision()
            _log(f"training in {dtype_name(chosen)}: a matmul here took "
                 f"{', '.join(f'{k} {1000 * v:.2f} ms' for k, v in timed.items())} (bf16 where {style.BF16_MARGIN}x as fast)")
        last_said = [0.0]

        def report(progress) -> None:
            say(progress)
            if time.monotonic() - last_said[0] > 10 or progress.done == progress.total:
                last_said[0] = time.monotonic()
                _log(progress.line())

        # The training's time on the clock: what the job's plan leaves once the stages after it
        # (folding the adapter in, choosing the cache's weight, measuring, the examples) have had
        # AFTER_RATIO times as long as those before it (measuring the base model).
        before_s = time.monotonic() - started
        wall = max(0.0, min(config.wall_seconds, config.job_seconds - before_s - max(TAIL_S, AFTER_RATIO * before_s)))
        _log(f"training planned to end within {wall:.0f} s ({before_s:.0f} s of the job's {config.job_seconds:.0f} s spent)")
        try:
            trained = style.train(model, base.tokenizer, train_text, dataclasses.replace(config, wall_seconds=wall), report,
                                  should_stop, style.output_rows(model, base.loaded.model))
        except style.Cancelled as e:
            raise StyleError(str(e)) from None
        trained_at = time.monotonic()
        state = style.lora_state(model)
        del model
        gc.collect()  # the training's mapping of the weights file goes with it
        give_back_memory()
        say(style.Progress("making the adapted model"))
        config_dict = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(config).items()}
        adapted = style.merged(base.loaded, base.loaded.folder, state, config, "pending")
        give_back_memory()
        engine = SuggestionEngine(adapted)
        say(style.Progress("choosing how much to draw on your text"))
        weight, tried = self._cache_weight(engine, train_text, config, scored)
        text_ids = base.tokenizer(train_text, add_special_tokens=False).input_ids if weight > 0 else []
        if weight > 0:
            engine.text_cache = TextCache(text_ids, engine.model.config.vocab_size, weight)
        if tried:
            reads = ", ".join(f"{w}: {n:.4f}" for w, n in tried["nats"].items())
            _log(f"a cache of your text blended in at weight {weight} (the training text's last {tried['chars']} "
                 f"characters read at {reads} nats a token)")
        say(style.Progress("measuring the adapted model on your held-out text"))
        after = bits(engine)
        say(style.Progress("comparing suggestions"))
        examples = self._examples(base, engine, train_text, held)
        figures = {
            "bits_per_char_before": round(before, 4),
            "bits_per_char_after": round(after, 4),
            "perplexity_per_char_before": round(2 ** before, 3),
            "perplexity_per_char_after": round(2 ** after, 3),
            "heldout_chars": len(held),
            "trained_chars": len(train_text) - trained.held_back_chars,
            # When to stop was read on the training text's last characters (never on the
            # held-out part): the steps taken, and those of the adapter kept.
            "held_back_chars": trained.held_back_chars,
            "training_steps": len(trained.losses),
            "kept_step": trained.kept,
            "training_precision": trained.precision,
            "text_cache_weight": weight,
            "seconds": round(time.monotonic() - started, 1),
            "examples": examples,
        }
        meta = self.store.save(owner_key, base_name, name, state, config_dict, figures, text_ids)
        adapted.name = meta["model"]
        with self._engines_lock:
            self._engines[meta["id"]] = engine
            while len(self._engines) > IN_MEMORY:
                self._engines.popitem(last=False)
        _log(f"style {meta['model']} ready: bits/char {before:.3f} -> {after:.3f} on {len(held)} held-out characters "
             f"({figures['seconds']:.0f} s: {before_s:.0f} before the training, {time.monotonic() - trained_at:.0f} after)")
        return dict(meta, owner_key=owner_key)

    @staticmethod
    def _cache_weight(engine, train_text: str, config, scored: Callable) -> tuple[float, dict]:
        """How much of a cache of the writer's text to blend in (models/textcache.py): the
        weight that reads the training text's last part best (``config.validation`` of it, at
        least MIN_CACHE_CHECK characters), the adapted model's probabilities from scoring it, the
        cache's from counting the rest. ``scored(engine, text)``: the job's read of a text.

        Where the training held that part back, the read is fair; where it trained on it too
        (no time for a pass and a half), the adapted model reads it better than it would new
        text, so the weight comes out smaller: on the safe side. Never the held-out text."""
        from models import style
        from models.textcache import TextCache, choose_weight

        if len(train_text) < 2 * MIN_CACHE_CHECK:
            return 0.0, {}
        fit, check = style.split(train_text, max(config.validation, MIN_CACHE_CHECK / len(train_text)))
        probs = [t["prob"] for t in scored(engine, check)["tokens"]]
        ids = engine.tokenizer(check, add_special_tokens=False).input_ids
        if len(ids) != len(probs) or None in probs:
            return 0.0, {}
        cache = TextCache(engine.tokenizer(fit, add_special_tokens=False).input_ids, engine.model.config.vocab_size)
        weight, nats = choose_weight(probs, cache.probabilities(ids))
        return weight, {"chars": len(check), "nats": nats}

    @staticmethod
    def _examples(base, adapted, train_text: str, held: str) -> list[dict]:
        """A few held-out sentence starts, each with the base model's and the style's likeliest continuation."""
        from models.settings import Settings

        settings = replace(Settings(), temperature=0.05, top_k=1, lengths=[16], max_time=4.0)
        sentences = [s for s in re.split(r"(?<=[.!?。！？])\s*", held) if len(s) > 24]
        picks = sentences[:: max(1, len(sentences) // EXAMPLES)][:EXAMPLES]
        out = []
        for sentence in picks:
            cut = sentence[: max(8, len(sentence) // 2)]
            start = held.find(sentence)
            prompt = (train_text + held[:start])[-1500:] + cut
            rows = {}
            for who, engine in (("base", base), ("style", adapted)):
                result = engine.suggest(prompt, settings, seed=0)
                rows[who] = result.texts[0] if result.texts else ""
            out.append({"text": cut, "actual": sentence[len(cut):][:80], **rows})
        return out


def _log(line: str) -> None:
    print(f"[tabwrite] {line}", file=sys.stderr, flush=True)


def bits_gain(meta: dict) -> float | None:
    before, after = meta.get("bits_per_char_before"), meta.get("bits_per_char_after")
    if not before or after is None or not math.isfinite(before):
        return None
    return (after / before - 1) * 100
