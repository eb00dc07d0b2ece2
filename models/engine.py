"""The suggestion engine: one Tab press -> several sampled continuations of increasing length.

The loop is written out by hand (in the spirit of gpt-fast's generate.py) instead of calling
``model.generate(num_return_sequences=3)``, because on a 2-core CPU that is 3-4x slower:
- the prompt is prefilled once, as a batch of one, and its KV cache is kept: the next
  Tab press on the same (or extended) text only prefills the tokens that are new;
- the continuations are sampled together as one batch that shares that prefix;
- sampling looks at the top-k logits only (a full softmax over Gemma's 262k-token
  vocabulary costs ~24 ms a step here);
- each row stops on its own at its target length (on a word boundary), at end of text
  or at a newline; the press stops when its time budget is spent or it is cancelled.
"""

from __future__ import annotations

import bisect
import copy
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache

from models import textcut
from models.loading import LoadedModel
from models.settings import Settings, targets

# How many prompt tokens are decoded alongside a continuation to turn it into text
# (SentencePiece drops a leading space when a piece is decoded on its own).
_DECODE_CONTEXT = 6
_MAX_PROMPT_CHARS_PER_TOKEN = 12  # only this many chars per context token are tokenized


def _hard_cap(target: int) -> int:
    """Tokens after which a row stops even mid-word (then cut back to a boundary)."""
    return target + max(4, target // 2)


class EngineError(Exception):
    """A suggestion request failed in a way the user should be told about (one line)."""


@dataclass
class Suggestion:
    text: str
    tokens: int
    mean_logprob: float  # per token; how sure the model was (0 is certain)


@dataclass
class SuggestResult:
    suggestions: list[Suggestion] = field(default_factory=list)
    message: str = ""  # for the user, when something is worth saying (empty text, time up, ...)
    prompt_tokens: int = 0
    new_prompt_tokens: int = 0  # tokens prefilled for this press (the rest came from the cache)
    elapsed_s: float = 0.0
    steps: int = 0
    first_ready_s: float | None = None  # when the first suggestion was final (for streaming / benchmarks)
    timed_out: bool = False
    cancelled: bool = False
    truncated: bool = False  # the document was longer than the context window

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.suggestions]


# ---------------------------------------------------------------- model steps (plain functions)


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Run the prompt tokens through the model, filling ``cache``. Returns last-position logits [B, V]."""
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :]


@torch.inference_mode()
def decode_step(model, tokens: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """One token for each row: tokens [B] -> next-token logits [B, V]."""
    out = model(input_ids=tokens[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :]


@torch.inference_mode()
def sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from the top-k (then top-p) of ``logits`` [B, V].

    Returns (tokens [B], log-probabilities [B] of those tokens under the untempered model).
    """
    logits = logits.float()
    k = max(1, min(int(top_k), logits.shape[-1]))
    top_vals, top_idx = torch.topk(logits, k, dim=-1)
    probs = torch.softmax(top_vals / max(temperature, 1e-5), dim=-1)
    if top_p < 1.0:
        # Keep the smallest set of tokens whose mass reaches top_p (always at least one).
        cumulative = probs.cumsum(dim=-1)
        probs = probs.masked_fill(cumulative - probs > top_p, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(probs, 1, generator=generator)
    tokens = top_idx.gather(-1, choice).squeeze(-1)
    chosen = top_vals.gather(-1, choice).squeeze(-1)
    logprobs = chosen - torch.logsumexp(logits, dim=-1)
    return tokens, logprobs


def forbid_unlikely_stop(logits: torch.Tensor, rows: list[int], stop_ids: torch.Tensor) -> torch.Tensor:
    """Stop tokens made impossible in ``rows`` unless one of them is the model's first choice.

    A row that has said nothing yet and samples a rare end-of-text token would come back
    empty, and the writer would see two suggestions instead of three; a model that is sure
    the text ends here (its top token is a stop token) is still allowed to say so.
    """
    index = torch.tensor(rows, device=logits.device)
    picked = logits.index_select(0, index)
    stop_best = picked.index_select(1, stop_ids).max(dim=-1).values
    unlikely = stop_best < picked.max(dim=-1).values
    if bool(unlikely.any()):
        logits = logits.clone()
        masked_rows = index[unlikely]
        logits[masked_rows[:, None], stop_ids[None, :]] = float("-inf")
    return logits


# ---------------------------------------------------------------- tokens <-> text helpers


class VocabIndex:
    """Token pieces sorted as strings, to find every token that starts with a given piece.

    Used for token healing: the prompt's last token is taken back and the first sampled
    token must start with it, so "I went to the " or "The quick bro" continue the way the
    model would have tokenized them, instead of after an unusual split.
    """

    def __init__(self, tokenizer):
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        special = set(getattr(tokenizer, "all_special_ids", []) or []) | control_token_ids(tokenizer)
        entries = [
            (p, i)
            for i, p in enumerate(pieces)
            if isinstance(p, str) and p and i not in special and not (p.startswith("<0x") and p.endswith(">"))
        ]
        entries.sort()
        self.pieces = [p for p, _ in entries]
        self.ids = [i for _, i in entries]
        self.piece_of = {i: p for p, i in entries}

    def starting_with(self, piece: str) -> list[int]:
        lo = bisect.bisect_left(self.pieces, piece)
        hi = bisect.bisect_left(self.pieces, piece + "\U0010ffff")
        return self.ids[lo:hi]


def control_token_ids(tokenizer) -> set[int]:
    """Added tokens that look like markup (<...>, [...]) rather than text; byte tokens excluded."""
    found = set()
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        content = str(getattr(token, "content", token))
        if (content[:1], content[-1:]) in (("<", ">"), ("[", "]")) and not content.startswith("<0x"):
            found.add(int(token_id))
    return found


def longest_common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def clean_prompt(text: str) -> str:
    """What the model sees of the writer's text: valid UTF-8, no control characters."""
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates -> '?'
    return textcut.clean_control(text)


# ---------------------------------------------------------------- the engine


class SuggestionEngine:
    """Holds a loaded model, its prefix KV cache, and a lock (one forward pass at a time)."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.lock = threading.Lock()
        self.vocab = VocabIndex(self.tokenizer)
        eos = {self.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        eos.update(getattr(self.tokenizer, "all_special_ids", []) or [])
        # Markup tokens such as Gemma's <start_of_image> are not "special" to the tokenizer but
        # end the text all the same; a suggestion must never show them.
        eos.update(control_token_ids(self.tokenizer))
        self.stop_ids = torch.tensor(sorted(i for i in eos if i is not None), device=self.device)
        bos = self.tokenizer.bos_token_id
        probe = self.tokenizer("a").input_ids
        self.bos_id = bos if bos is not None and probe and probe[0] == bos else None
        window = getattr(self.model.config, "sliding_window", None)
        self.cache_limit = min(loaded.context_length, window or loaded.context_length)
        # The prefix cache: token ids and the batch-1 KV cache that holds them.
        self._prefix_ids: list[int] = []
        self._prefix_cache: DynamicCache | None = None
        self._prefix_logits: torch.Tensor | None = None

    @property
    def name(self) -> str:
        return self.loaded.name

    # -- prompt

    def prompt_ids(self, text: str, context_tokens: int) -> tuple[list[int], bool]:
        """Token ids the model sees: the end of the document, at most ``context_tokens`` long.

        The window's start moves in steps of a quarter window rather than one token at a
        time, so that while the writer types the start stays put and the cached prefix can
        be reused.
        """
        context_tokens = max(8, min(context_tokens, self.loaded.context_length - 260))
        max_chars = context_tokens * _MAX_PROMPT_CHARS_PER_TOKEN
        cut_chars = len(text) > max_chars
        if cut_chars:
            # The character cut moves in quarter steps too: cutting at len(text) - max_chars
            # would shift the tokens (and so the window) on every keystroke.
            step_chars = max(1, max_chars // 4)
            text = text[math.ceil((len(text) - max_chars) / step_chars) * step_chars :]
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if cut_chars and ids:
            ids = ids[1:]  # the first token may be a piece of a word cut in half
        truncated = cut_chars
        if len(ids) > context_tokens:
            step = max(1, context_tokens // 4)
            start = math.ceil((len(ids) - context_tokens) / step) * step
            ids = ids[start:]
            truncated = True
        if self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids, truncated

    def _prefill_cached(self, ids: list[int]) -> tuple[DynamicCache, torch.Tensor, int]:
        """KV cache and last logits for ``ids``, reusing the longest cached common prefix."""
        common = longest_common_prefix(self._prefix_ids, ids)
        cache = self._prefix_cache
        if cache is not None and common == len(ids) == len(self._prefix_ids):
            return cache, self._prefix_logits, 0
        if cache is None or common == 0 or len(ids) >= self.cache_limit:
            cache, common = DynamicCache(config=self.model.config), 0
        else:
            common = min(common, len(ids) - 1)  # at least one token must run to get logits
            try:
                cache.crop(common - len(self._prefix_ids)) if common < len(self._prefix_ids) else None
            except (RuntimeError, ValueError):
                cache, common = DynamicCache(config=self.model.config), 0
        new = torch.tensor([ids[common:]], device=self.device)
        logits = prefill(self.model, new, cache)
        self._prefix_ids, self._prefix_cache, self._prefix_logits = list(ids), cache, logits
        return cache, logits, len(ids) - common

    def _row_text(self, context: list[int], healed: str, row: list[int]) -> str:
        base = self.tokenizer.decode(context, skip_special_tokens=True)
        full = self.tokenizer.decode(context + row, skip_special_tokens=True)
        text = full[len(base):] if full.startswith(base) else self.tokenizer.decode(row, skip_special_tokens=True)
        if healed:
            # The first token re-typed the healed piece, which is already in the document.
            text = text[len(healed):] if text.startswith(healed) else text
        # A byte piece that never completes a character leaves U+FFFD inside the text, not only at its end.
        return textcut.clean_control(textcut.utf8_safe(text))

    # -- one Tab press

    def suggest(
        self,
        text: str,
        settings: Settings,
        round_: int = 0,
        is_cancelled: Callable[[], bool] = lambda: False,
        seed: int | None = None,
        on_update: Callable[[list[Suggestion]], None] | None = None,
    ) -> SuggestResult:
        started = time.perf_counter()
        result = SuggestResult()
        text = clean_prompt(text or "")
        if not text.strip():
            result.message = "Type a few words first, then press Tab."
            return result
        wanted = targets(settings, round_)
        with self.lock:
            # Time spent waiting for another writer's request counts against this budget too.
            deadline = started + settings.max_time
            if is_cancelled():
                result.cancelled = True
                return result
            try:
                self._generate(text, settings, wanted, deadline, is_cancelled, seed, on_update, result)
            except torch.OutOfMemoryError as e:  # type: ignore[attr-defined]
                self._prefix_ids, self._prefix_cache = [], None
                raise EngineError("the model ran out of memory; try a shorter context or a smaller model") from e
        result.elapsed_s = time.perf_counter() - started
        if not result.suggestions and not result.message and not result.cancelled:
            result.message = "The model had nothing to add here; try Tab again or write a little more."
        return result

    def _generate(self, text, settings, wanted, deadline, is_cancelled, seed, on_update, result):
        started = deadline - settings.max_time
        ids, result.truncated = self.prompt_ids(text, settings.context_tokens)
        result.prompt_tokens = len(ids)
        # Token healing: take the last token back when it is an ordinary piece.
        healed_piece, healed_text = None, ""
        last = ids[-1]
        if len(ids) > 1 and last in self.vocab.piece_of:
            healed_piece = self.vocab.piece_of[last]
            context = ids[-_DECODE_CONTEXT - 1 : -1]
            healed_text = self._row_text(context, "", [last])
            if not healed_text:
                healed_piece = None
        if healed_piece is not None:
            ids = ids[:-1]
        context = ids[-_DECODE_CONTEXT:]

        cache, logits, result.new_prompt_tokens = self._prefill_cached(ids)
        n = len(wanted)
        cache = copy.deepcopy(cache)
        cache.batch_repeat_interleave(n)
        logits = logits.expand(n, -1).clone()
        if healed_piece is not None:
            allowed = torch.tensor(self.vocab.starting_with(healed_piece), device=self.device)
            masked = torch.full_like(logits, float("-inf"))
            masked[:, allowed] = logits[:, allowed]
            logits = masked

        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
        rows: list[list[int]] = [[] for _ in range(n)]
        logp = [0.0] * n
        texts = [""] * n
        finals: list[str | None] = [None] * n
        max_steps = _hard_cap(max(wanted))
        # Every step feeds one token: stay inside the model's positions (GPT-2 has no more).
        max_steps = max(1, min(max_steps, self.loaded.context_length - len(ids)))
        for step in range(max_steps):
            silent = [r for r in range(n) if finals[r] is None and not texts[r].strip()]
            if silent:
                logits = forbid_unlikely_stop(logits, silent, self.stop_ids)
            tokens, logprobs = sample(logits, settings.temperature, settings.top_k, settings.top_p, generator)
            is_stop = torch.isin(tokens, self.stop_ids).tolist()
            token_list, logprob_list = tokens.tolist(), logprobs.tolist()
            finished_now = False
            for r in range(n):
                if finals[r] is not None:
                    continue
                if is_stop[r]:
                    finals[r], finished_now = texts[r], True
                    continue
                rows[r].append(token_list[r])
                logp[r] += logprob_list[r]
                previous, texts[r] = texts[r], self._row_text(context, healed_text, rows[r])
                finals[r] = self._finished(previous, texts[r], len(rows[r]), wanted[r])
                if finals[r] is not None and len(rows[r]) < _hard_cap(wanted[r]) and any(
                    q != r and finals[q] is not None and finals[q].strip() == finals[r].strip() for q in range(n)
                ):
                    finals[r] = None  # the same as another suggestion: go on until it says something else
                finished_now = finished_now or finals[r] is not None
            result.steps = step + 1
            if result.first_ready_s is None and any(f is not None for f in finals):
                result.first_ready_s = time.perf_counter() - started
            if on_update is not None and finished_now:
                on_update(self._collect(finals, rows, logp))  # for streaming: rows done so far
            if all(f is not None for f in finals):
                break
            if is_cancelled():
                result.cancelled = True
                break
            # Stop early enough that the next step (about as long as the last one) fits the budget.
            if time.perf_counter() >= deadline:
                result.timed_out = True
                break
            logits = decode_step(self.model, tokens, cache)
        for r in range(n):
            if finals[r] is None:
                finals[r] = textcut.complete_prefix(texts[r]) or texts[r]
        result.suggestions = self._collect(finals, rows, logp)
        if result.timed_out:
            result.message = f"Stopped at the {settings.max_time:g} s time limit."

    @staticmethod
    def _collect(finals, rows, logp) -> list[Suggestion]:
        """The finished, non-empty rows as suggestions, shortest first."""
        found = [
            Suggestion(f.rstrip(" \t"), len(rows[r]), logp[r] / max(1, len(rows[r])))  # no trailing blanks
            for r, f in enumerate(finals)
            if f is not None and f.strip()
        ]
        return sorted(found, key=lambda s: len(s.text))

    @staticmethod
    def _finished(previous: str, text: str, count: int, target: int) -> str | None:
        """The row's final text if it should stop now, else None."""
        newline = text.find("\n", len(text) - len(text.lstrip()))
        if newline > 0 and text[:newline].strip():
            return text[:newline].rstrip()  # a suggestion stays on the writer's line
        if count >= target and textcut.starts_new_unit(previous, text[len(previous):]):
            return textcut.complete_prefix(text)
        if count >= _hard_cap(target):
            return textcut.complete_prefix(text) or text
        return None
