"""llama.cpp as a peer for bench/latency.py: the same Tab press, decoded the way llama.cpp can.

llama-cpp-python's high-level API (``Llama.create_completion``) samples one sequence per
call, so 3 suggestions cost 3 decodes per token. That measures the Python API, not llama.cpp:
a fair peer decodes the rows together, as llama.cpp's own ``batched`` example does. So this
drives the C API through llama-cpp-python's low-level bindings:

    prompt -> sequence 0 (one llama_decode) -> its KV cells shared with sequences 1..n-1
    (llama_memory_seq_cp) -> per step ONE llama_decode of a batch holding the next token
    of every row still running.

``sequential_press`` is the same rows one after another on sequence 0 (the prompt is still
evaluated once), to show what the batching buys.

Both press the way the engine is measured "cold": the KV memory is cleared first, so the
prompt is evaluated from scratch every time. Every row generates exactly the number of
tokens asked (end-of-text tokens are masked out), so the work does not depend on the draw.
"""

from __future__ import annotations

import ctypes
import os
import time

try:
    import llama_cpp
except ImportError:  # optional: pip install llama-cpp-python
    llama_cpp = None


def _ignore_log(level, text, user_data):
    pass


# llama.cpp logs to stderr from C (model loading, context creation); the benchmark prints
# JSON. The ctypes callback must stay referenced while C holds it, hence a module global.
_QUIET = llama_cpp.llama_log_callback(_ignore_log) if llama_cpp else None
_backend_ready = False


def _quiet_backend() -> None:
    global _backend_ready
    # Set again here: importing llama_cpp installs llama-cpp-python's own (printing) logger.
    llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p(0))
    if not _backend_ready:
        llama_cpp.llama_backend_init()
        _backend_ready = True


def _tokenize(vocab, text: str) -> list[int]:
    """``text`` as token ids, with BOS where the model's vocab wants one (Gemma does)."""
    data = text.encode("utf-8")
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    room = len(data) + 2  # a token covers at least one byte, plus BOS/EOS
    ids = (llama_cpp.llama_token * room)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), ids, room, add_bos, False)
    if n < 0:
        raise RuntimeError(f"llama_tokenize failed ({n})")
    return list(ids[:n])


def _detokenize(vocab, tokens: list[int]) -> str:
    out, buf = b"", ctypes.create_string_buffer(256)
    for token in tokens:
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
        if n < 0:
            raise RuntimeError(f"token {token} has a piece longer than {len(buf)} bytes")
        out += buf.raw[:n]
    # A multi-byte character may be cut at the end of a row.
    return out.decode("utf-8", errors="replace")


def _stop_ids(vocab) -> list[int]:
    """Every end-of-generation token (EOS, EOT, <end_of_turn>, ...), to be masked out."""
    return [t for t in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, t)]


def _row_sampler(n_vocab: int, stop_ids: list[int], temperature: float, top_k: int, top_p: float, seed: int):
    """top-k -> temperature -> top-p -> seeded draw, with stop tokens impossible: the engine's
    sampler (models/steps.sample: top-p keeps the smallest set of the *tempered* top-k whose
    mass reaches p).

    The stop tokens get a -inf bias first, so a row never ends early and every press does the
    work it was asked for. min_p is not in the chain (the engine does not use it; llama-cpp-
    python's high-level API adds min_p=0.05 by default).
    """
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    bias = (llama_cpp.llama_logit_bias * len(stop_ids))()
    for entry, token in zip(bias, stop_ids):
        entry.token, entry.bias = token, float("-inf")
    # The sampler copies the bias array; the chain owns (and frees) every sampler added.
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(stop_ids), bias))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(top_k))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(temperature))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(top_p, 1))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain


class LlamaCppBatched:
    """llama.cpp on a GGUF file, decoding several rows together: the prompt is evaluated once
    (sequence 0), its KV cache is shared with the other rows (llama_memory_seq_cp), then each
    step is ONE llama_decode on a batch holding the next token of every row still running."""

    def __init__(self, gguf_path: str, n_ctx: int = 1024, n_threads: int | None = None, max_rows: int = 3):
        _quiet_backend()
        n_threads = n_threads or len(os.sched_getaffinity(0))
        self.n_ctx, self.max_rows = n_ctx, max_rows
        self.model = llama_cpp.llama_model_load_from_file(gguf_path.encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_ctx  # the whole prompt goes in one llama_decode
        params.n_seq_max = max_rows  # one sequence per row
        # One KV pool for all sequences: llama_memory_seq_cp then only tags the prompt's
        # cells with the other rows' ids (the prompt is stored once), and each row may use
        # the whole n_ctx; split pools would copy the prompt into each row's pool.
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = n_threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise RuntimeError("llama.cpp could not create a context")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.stop_ids = _stop_ids(self.vocab)
        # Room for the prompt in one batch; a decode step uses at most max_rows of it.
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, max_rows)

    def _fill(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """Put (token, position, sequence, wants logits) entries into the batch."""
        batch = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.logits[i] = token, pos, logits
            batch.n_seq_id[i], batch.seq_id[i][0] = 1, seq
        batch.n_tokens = len(entries)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        self._fill(entries)
        rc = llama_cpp.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")

    def _start(self, prompt: str, row_tokens: list[int]) -> list[int]:
        """Clear the KV memory (a cold press), tokenize ``prompt`` and evaluate it on sequence 0."""
        if not 1 <= len(row_tokens) <= self.max_rows:
            raise ValueError(f"{len(row_tokens)} rows; this context holds 1 to {self.max_rows}")
        if min(row_tokens) < 1:
            raise ValueError("every row must ask for at least one token")
        # Metadata only (data=False): the cells become free, which is all a cold press needs;
        # zeroing the KV buffers would time a memset the engine does not do.
        llama_cpp.llama_memory_clear(self.memory, False)
        ids = _tokenize(self.vocab, prompt)
        if len(ids) + max(row_tokens) > self.n_ctx:
            raise ValueError(f"{len(ids)} prompt tokens + {max(row_tokens)} new do not fit n_ctx={self.n_ctx}")
        last = len(ids) - 1
        self._decode([(t, p, 0, p == last) for p, t in enumerate(ids)])  # logits of the last token only
        return ids

    def _samplers(self, n_rows: int, temperature: float, top_k: int, top_p: float, seed: int) -> list:
        # Each row its own seed: all rows draw their first token from the same logits, and one
        # seed would make them the same text. Row i gets the same seed in both presses.
        return [
            _row_sampler(self.n_vocab, self.stop_ids, temperature, top_k, top_p, seed * self.max_rows + row)
            for row in range(n_rows)
        ]

    def press(self, prompt: str, row_tokens: list[int], temperature: float, top_k: int, top_p: float, seed: int,
              return_text: bool = False) -> dict:
        """Generate exactly row_tokens[i] tokens for row i, all rows in one batch per step.

        Returns {"elapsed_s", "first_s" (until the row with the fewest tokens has all of them),
        "prompt_tokens", "tokens" (generated count per row)}, and "texts" if ``return_text``.
        """
        started = time.perf_counter()
        samplers = self._samplers(len(row_tokens), temperature, top_k, top_p, seed)
        try:
            ids = self._start(prompt, row_tokens)
            for row in range(1, len(row_tokens)):
                llama_cpp.llama_memory_seq_cp(self.memory, 0, row, -1, -1)
            rows = [[] for _ in row_tokens]
            # Batch index of each running row's logits; after the prompt, all read its last one.
            running = {row: len(ids) - 1 for row in range(len(row_tokens))}
            first_s, fewest = None, min(row_tokens)
            while True:
                for row, idx in running.items():
                    # llama_sampler_sample applies the chain and accepts the token (no separate
                    # llama_sampler_accept, which would accept it twice).
                    rows[row].append(llama_cpp.llama_sampler_sample(samplers[row], self.ctx, idx))
                # A row that has its count drops out: its last token is never decoded.
                running = {row: 0 for row in running if len(rows[row]) < row_tokens[row]}
                if first_s is None and any(len(rows[row]) == fewest for row in range(len(rows))):
                    first_s = time.perf_counter() - started
                if not running:
                    break
                entries = []
                for i, row in enumerate(running):
                    running[row] = i
                    entries.append((rows[row][-1], len(ids) + len(rows[row]) - 1, row, True))
                self._decode(entries)
            elapsed = time.perf_counter() - started
        finally:
            for sampler in samplers:
                llama_cpp.llama_sampler_free(sampler)
        return self._result(elapsed, first_s, ids, rows, return_text)

    def sequential_press(self, prompt: str, row_tokens: list[int], temperature: float, top_k: int, top_p: float,
                         seed: int, return_text: bool = False) -> dict:
        """The same rows one after another on sequence 0, each continuing from the prompt's KV.

        Same sampler (and seeds) as ``press``, same return shape; "first_s" is when the row
        with the fewest tokens has all of them, in the order the rows are given.
        """
        started = time.perf_counter()
        samplers = self._samplers(len(row_tokens), temperature, top_k, top_p, seed)
        try:
            ids = self._start(prompt, row_tokens)
            rows, first_s, fewest = [[] for _ in row_tokens], None, min(row_tokens)
            prompt_idx = len(ids) - 1  # batch index of the prompt's last logits, None once overwritten
            for row, count in enumerate(row_tokens):
                if prompt_idx is None:
                    # Drop the previous row's tokens and the prompt's last token, then evaluate
                    # that one again: its logits (the first draw of every row) were overwritten.
                    if not llama_cpp.llama_memory_seq_rm(self.memory, 0, len(ids) - 1, -1):
                        raise RuntimeError("llama_memory_seq_rm could not remove a row's tokens")
                    self._decode([(ids[-1], len(ids) - 1, 0, True)])
                    prompt_idx = 0
                idx = prompt_idx
                while len(rows[row]) < count:
                    rows[row].append(llama_cpp.llama_sampler_sample(samplers[row], self.ctx, idx))
                    if len(rows[row]) < count:
                        self._decode([(rows[row][-1], len(ids) + len(rows[row]) - 1, 0, True)])
                        idx, prompt_idx = 0, None
                if first_s is None and count == fewest:
                    first_s = time.perf_counter() - started
            elapsed = time.perf_counter() - started
        finally:
            for sampler in samplers:
                llama_cpp.llama_sampler_free(sampler)
        return self._result(elapsed, first_s, ids, rows, return_text)

    def _result(self, elapsed: float, first_s: float, ids: list[int], rows: list[list[int]], return_text: bool) -> dict:
        out = {"elapsed_s": elapsed, "first_s": first_s, "prompt_tokens": len(ids), "tokens": [len(r) for r in rows]}
        if return_text:
            out["texts"] = [_detokenize(self.vocab, r) for r in rows]
        return out

    def close(self) -> None:
        """Free the batch, context and model (the samplers are freed after each press)."""
        if getattr(self, "batch", None) is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            llama_cpp.llama_model_free(self.model)
            self.model = None


def load_llama_cpp_batched(model_spec: str, n_threads: int) -> LlamaCppBatched | None:
    """The batched llama.cpp peer for ``model_spec``, or None without llama_cpp or a GGUF model."""
    if llama_cpp is None:
        return None
    from models.registry import resolve

    source = resolve(model_spec)
    if source.kind != "gguf":
        return None
    return LlamaCppBatched(source.location, n_ctx=1024, n_threads=n_threads)
