"""KV caches for many Tab presses at once: prompt prefixes kept for reuse, and one batch for all.

Two things live here, both plain transformers ``DynamicCache`` objects underneath:

- ``PrefixStore`` keeps the batch-1 caches of the last few prompts. A writer who types on
  reuses the cache of what they had typed before, even when other writers' presses came in
  between (a single cache would be overwritten by each of them).
- ``BatchKV`` is the cache of one decoding batch. Its rows may belong to different prompts
  of different lengths: a press that arrives while others are decoding joins the batch at
  the next step (continuous batching). The shorter side is left-padded and masked, and each
  row keeps its own position, the way ``generate()`` runs a left-padded batch. Rows leave
  as soon as they are finished, so the batch only ever holds work still to do.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from models.steps import decode_step, longest_common_prefix, prefill


def _set_layer(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Give a cache layer new tensors (only used while the cache is shorter than any sliding window)."""
    if not layer.is_initialized:
        layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    if hasattr(layer, "cumulative_length"):  # sliding-window layers count what they have seen
        layer.cumulative_length = keys.shape[-2]


_SPARE = 64  # tokens of room added behind a decoding batch's keys and values when it runs out


class GrowingCache(DynamicCache):
    """A DynamicCache whose layers grow into spare room instead of by ``torch.cat``.

    transformers' cache appends each decode step's keys and values with ``torch.cat``, which
    copies the whole cache: with fp32 activations that was 36 copies of ~600 KB a step for
    Gemma at batch 3 (~5 ms of a ~45 ms step). Here a layer's keys and values are views into
    buffers with room for ``_SPARE`` more tokens, and a step writes one token in place; a
    copy happens only when the room is used up or the batch's rows change. Where transformers
    would do more than append (a sliding-window layer about to pass its window) its own
    update runs instead.
    """

    @classmethod
    def of(cls, cache: DynamicCache) -> "GrowingCache":
        grown = cls.__new__(cls)
        grown.__dict__.update(cache.__dict__)
        return grown

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        window = getattr(layer, "sliding_window", None)
        if layer is None or not layer.is_initialized or type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        length, new = layer.keys.shape[-2], key_states.shape[-2]
        if window is not None and length + new > window - 1:  # the window starts to slide: transformers' way
            layer.__dict__.pop("room", None)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        room = layer.__dict__.get("room")
        if room is None or not _fronts(layer.keys, room[0]) or not _fronts(layer.values, room[1]) or room[0].shape[-2] < length + new:
            room = tuple(_with_room(t, length + new + _SPARE) for t in (layer.keys, layer.values))
            layer.room = room
        room[0][..., length : length + new, :] = key_states
        room[1][..., length : length + new, :] = value_states
        layer.keys, layer.values = room[0][..., : length + new, :], room[1][..., : length + new, :]
        if window is not None:
            layer.cumulative_length += new
        return layer.keys, layer.values


def _fronts(view: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether ``view`` is the first tokens of ``buffer`` (so the room behind it is free)."""
    return view.data_ptr() == buffer.data_ptr() and view.shape[:2] == buffer.shape[:2] and view.stride() == buffer.stride()


def _with_room(t: torch.Tensor, capacity: int) -> torch.Tensor:
    buffer = t.new_empty(t.shape[0], t.shape[1], capacity, t.shape[3])
    buffer[..., : t.shape[-2], :] = t
    return buffer


def copy_prefix(cache: DynamicCache, config, length: int) -> DynamicCache:
    """A new cache holding the first ``length`` tokens of ``cache`` (which must fit every sliding window)."""
    new = DynamicCache(config=config)
    for src, dst in zip(cache.layers, new.layers):
        _set_layer(dst, src.keys[..., :length, :].clone(), src.values[..., :length, :].clone())
    return new


class PrefixEntry:
    def __init__(self, ids: list[int], cache: DynamicCache, logits: torch.Tensor):
        self.ids, self.cache, self.logits = ids, cache, logits


def cache_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


class PrefixStore:
    """The batch-1 caches of recent prompts, most recently used last: at most ``size`` of them and
    ``budget_mb`` of keys and values (Gemma 3 270M: ~37 kB a token, ~14 MB for a 384-token prompt).

    Many writers each keep typing on their own text: with one entry per writer, a writer's next
    press prefills only what they typed since. 8 entries served 5 writers; 20 writers need ~20.
    256 MB holds ~18 such prompts: 512 MB raised bench.latency's steady RSS from 1.33 to 2.24 GB
    (it presses many different prompts), past what one process should hold on a small Space.
    """

    def __init__(self, model, config, limit: int, size: int = 64, budget_mb: float = 256):
        self.model, self.config, self.limit, self.size = model, config, limit, size
        self.budget = budget_mb * 2**20
        self._entries: OrderedDict[int, PrefixEntry] = OrderedDict()
        self._keys = iter(range(1 << 62))

    def latest(self) -> PrefixEntry | None:
        return next(reversed(self._entries.values()), None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def reusable(self, ids: list[int]) -> int:
        """How many of ``ids`` a prefill would take from an entry (an estimate when called off the worker)."""
        try:
            entries = list(self._entries.values())
        except RuntimeError:  # changed while copied (the worker prefilled meanwhile)
            return 0
        return max((longest_common_prefix(e.ids, ids) for e in entries), default=0)

    def prefill(self, ids: list[int], device) -> tuple[DynamicCache, torch.Tensor, int]:
        """KV cache and last logits for ``ids``; returns also how many tokens had to be run.

        The entry sharing the longest prefix with ``ids`` is reused: extended in place when the
        writer typed on (its text is a prefix of the new one), copied up to the shared part
        when the text changed further back, so another writer's entry is never cut short.
        """
        best_key, common = None, 0
        for key, entry in self._entries.items():
            c = longest_common_prefix(entry.ids, ids)
            if c > common:
                best_key, common = key, c
        if len(ids) >= self.limit:  # too long to keep (or to crop inside a sliding window)
            cache = DynamicCache(config=self.config)
            return cache, prefill(self.model, torch.tensor([ids], device=device), cache), len(ids)
        if best_key is not None:
            entry = self._entries[best_key]
            self._entries.move_to_end(best_key)
            if common == len(ids) == len(entry.ids):
                return entry.cache, entry.logits, 0
            common = min(common, len(ids) - 1)  # at least one token must run to get logits
            if common < len(entry.ids):
                entry = PrefixEntry(ids[:common], copy_prefix(entry.cache, self.config, common), None)
                best_key = next(self._keys)
                self._entries[best_key] = entry
        else:
            entry, best_key = PrefixEntry([], DynamicCache(config=self.config), None), next(self._keys)
            self._entries[best_key] = entry
        logits = prefill(self.model, torch.tensor([ids[common:]], device=device), entry.cache)
        entry.ids, entry.logits = list(ids), logits
        sizes = {key: cache_bytes(e.cache) for key, e in self._entries.items()}
        total = sum(sizes.values())
        while len(self._entries) > 1 and (len(self._entries) > self.size or total > self.budget):
            key, _ = self._entries.popitem(last=False)
            total -= sizes[key]
        return entry.cache, logits, len(ids) - common


class BatchKV:
    """The KV cache of one decoding batch whose rows may come from different prompts.

    ``limit`` is the longest a padded batch may grow: below a sliding window, its layers
    hold every token, so rows can be padded, selected and trimmed freely. A prompt that
    does not fit starts a batch of its own, which is never padded.
    """

    def __init__(self, config, limit: int):
        self.config, self.limit = config, limit
        self.cache: DynamicCache | None = None
        self.width = 0  # tokens each row has room for (its own plus left padding)
        self.mask: torch.Tensor | None = None  # [rows, width] 1 = a real token
        self.positions: torch.Tensor | None = None  # [rows] position of each row's next token

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def fits(self, length: int, steps: int) -> bool:
        """Whether a prompt of ``length`` tokens can join and run ``steps`` more, padding included."""
        return self.rows == 0 or max(self.width, length) + steps <= self.limit

    def add(self, prefix: DynamicCache, length: int, n: int, steps: int = _SPARE) -> None:
        """``n`` rows that continue the batch-1 ``prefix`` cache of ``length`` tokens (copied, never
        changed), with room for ``steps`` more tokens.

        Below the limit (every layer holds every token) each layer's keys and values are written
        once, into buffers with that room (GrowingCache grows into it): a press's 6 rows on a
        198-token prompt were copied three times before (the prefix, its 6 repeats, then into
        room at the first step: ~43 MB each, freshly mapped memory), 7.7 ms in admission and
        ~10 ms of its first step on an EPYC capped to AVX2.
        """
        device = prefix.layers[0].keys.device
        width = max(self.width, length)
        if width + 1 >= self.limit:  # a long prompt alone, never padded: transformers' cache as it is
            self.cache = GrowingCache.of(copy.deepcopy(prefix))
            self.cache.batch_repeat_interleave(n)
            self.width = length
            self.mask = torch.ones(n, length, dtype=torch.long, device=device)
            self.positions = torch.full((n,), length, dtype=torch.long, device=device)
            return
        old = self.rows
        capacity = width + max(1, steps) + 1
        if self.cache is None:
            self.cache = GrowingCache.of(DynamicCache(config=self.config))
        for dst, src in zip(self.cache.layers, prefix.layers):
            room = []
            for mine, theirs in ((dst.keys if old else None, src.keys), (dst.values if old else None, src.values)):
                buffer = theirs.new_empty(old + n, theirs.shape[1], capacity, theirs.shape[3])
                if old:
                    buffer[:old, :, : width - self.width].zero_()  # padding: masked, but never NaN
                    buffer[:old, :, width - self.width : width] = mine
                buffer[old:, :, : width - length].zero_()
                buffer[old:, :, width - length : width] = theirs  # [1, ...] broadcast to the n rows
                room.append(buffer)
            _set_layer(dst, room[0][..., :width, :], room[1][..., :width, :])
            dst.room = tuple(room)
        new_mask = torch.ones(n, width, dtype=torch.long, device=device)
        new_mask[:, : width - length] = 0
        new_positions = torch.full((n,), length, dtype=torch.long, device=device)
        if old:
            new_mask = torch.cat([torch.nn.functional.pad(self.mask, (width - self.width, 0)), new_mask])
            new_positions = torch.cat([self.positions, new_positions])
        self.mask, self.positions, self.width = new_mask, new_positions, width

    def keep(self, index: list[int]) -> None:
        """Keep only these rows (in this order); drop columns that are now padding in every row."""
        if not index:
            self.cache, self.mask, self.positions, self.width = None, None, None, 0
            return
        if index == list(range(self.rows)):
            return
        select = torch.tensor(index, device=self.mask.device)
        self.mask, self.positions = self.mask[select], self.positions[select]
        real = self.mask.any(dim=0).nonzero()
        lead = int(real[0]) if len(real) else 0
        self.mask, self.width = self.mask[:, lead:], self.width - lead
        if lead == 0 and self.width + 1 >= self.limit:  # a long prompt alone (see add)
            self.cache.batch_select_indices(select)
            return
        if lead == 0 and all(a < b for a, b in zip(index, index[1:])) and self._keep_in_place(index):
            return
        # Padded or not, every layer holds every token: the rows kept are gathered once into
        # buffers with the same room behind them (selecting, then growing into room at the next
        # step, copied them twice).
        for layer in self.cache.layers:
            old = layer.__dict__.get("room")
            spare = max(1, (old[0].shape[-2] if old else layer.keys.shape[-2]) - layer.keys.shape[-2])
            room = []
            for t in (layer.keys, layer.values):
                buffer = t.new_empty(len(index), t.shape[1], self.width + spare, t.shape[3])
                torch.index_select(t[..., lead:, :], 0, select, out=buffer[..., : self.width, :])
                room.append(buffer)
            _set_layer(layer, room[0][..., : self.width, :], room[1][..., : self.width, :])
            layer.room = tuple(room)

    def _keep_in_place(self, index: list[int]) -> bool:
        """``keep`` for rows kept in order with no column dropped: each kept row moves to the front
        of the buffers it is in, which go on with fewer rows. A press's rows leave its batch one
        by one (6 -> 3 -> 2 -> 1); new buffers for each were ~50 MB of fresh memory a press,
        faulted in anew each time once the heap had been given back. False (nothing done) where
        a layer has no buffers with room (a long prompt alone)."""
        rooms = [layer.__dict__.get("room") for layer in self.cache.layers]
        if any(room is None or not _fronts(layer.keys, room[0]) or not _fronts(layer.values, room[1])
               for layer, room in zip(self.cache.layers, rooms)):
            return False
        n = len(index)
        for layer, room in zip(self.cache.layers, rooms):
            for buffer in room:
                for to, source in enumerate(index):  # in order: a row is read before anything lands on it
                    if to != source:
                        buffer[to, :, : self.width].copy_(buffer[source, :, : self.width])
            kept = (room[0][:n], room[1][:n])
            _set_layer(layer, kept[0][..., : self.width, :], kept[1][..., : self.width, :])
            layer.room = kept
        return True

    @torch.inference_mode()
    def step(self, model, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; returns the next-token logits [rows, V]."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        attention = None
        if self.width < self.limit:
            # Every layer holds every token (below any sliding window), so one explicit mask
            # [rows, 1, 1, width] serves them all. Given even when nothing is padded: PyTorch's
            # CPU attention for a single query runs ~15 % faster with a mask than without one.
            attention = self.mask.bool()[:, None, None, :]
        logits = decode_step(model, tokens, self.cache, self.positions, attention)
        self.positions = self.positions + 1
        self.width += 1
        return logits
