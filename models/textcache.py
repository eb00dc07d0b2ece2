"""A cache of the writer's own text, blended with the model's next-token probabilities.

Smart Compose blends a per-user model with the global one; a cache language model (Kuhn and
De Mori, 1990) does it with counts of the text already written. Here: the writer's text as
tokens, counted as n-grams (up to 3 tokens of context, Witten-Bell interpolated down to the
text's unigrams), and the model's distribution p blended with the cache's q as

    (1 - weight) * p + weight * q

where ``weight`` is chosen on text the cache did not count (``choose_weight``). A learned
style (editor/styles.py) carries one, next to its LoRA adapter: the adapter learns the voice,
the cache the names and phrases a writer uses again. Measured 2026-12-07 (the held-out 10 %,
read alone in 256-token windows; the LoRA job alone; the cache of the rest of the text):

    | held-out bits/char vs base | adapter | cache (weight 0.1) | both  |
    | this README's prose        | -12.0 % | -9.0 %             | -15.4 % |
    | Hong Lou Meng, ch. 1-3     | -6.3 %  | -4.5 %             | -8.3 %  |
    | A Scandal in Bohemia       | -3.4 %  | +0.1 %             | -2.5 %  |

and read in context (after 512 tokens of the text before), as the editor reads: the README's
prose -4.0 % (adapter) against -7.0 % (both), Hong Lou Meng -3.0 against -4.6 %. Doyle's story
is one the model has read: the cache only hurts there, and the weight chosen is 0.

Only the tokens the text uses are touched (a few thousand of Gemma's 262,144): the model's
logits elsewhere keep their values, so the blend costs one log-sum-exp over the vocabulary
and a few thousand values a row (``blend``).
"""

from __future__ import annotations

import bisect
import math

import torch

ORDER = 3  # tokens of context, at most
WEIGHTS = (0.0, 0.03, 0.05, 0.1, 0.15, 0.2, 0.3)  # tried by choose_weight


class TextCache:
    """N-gram counts of ``ids`` (a writer's text as tokens), and the weight they are blended with.

    Each order's contexts are packed into one int (their token ids side by side, ``bits`` each)
    and kept sorted, with their followers' counts, and found by bisection: 30,000 tokens (three
    of the bench's texts) took 0.1 s to count and 2.1 MB, and a row's distribution ~16 us
    (EPYC, 2026-12-07); blending it into 3 rows of Gemma's logits 0.49 ms, of which the
    log-sum-exp over 262,144 logits is 0.32 (capped to AVX2: 0.52 and 0.33), beside a decode
    step of ~20 ms (~25 capped): ~2 % of a step.
    """

    def __init__(self, ids: list[int], vocab: int, weight: float = 0.0, order: int = ORDER):
        self.ids = list(ids)
        self.vocab = int(vocab)
        self.weight = float(weight)
        self.bits = max(1, (self.vocab - 1).bit_length())
        self.order = max(0, min(order, 62 // self.bits))  # a context's key must fit in 63 bits
        seq = torch.tensor(self.ids, dtype=torch.long)
        tokens, counts = torch.unique(seq, return_counts=True) if len(self.ids) else (seq, seq)
        self.tokens = tokens  # the text's vocabulary, sorted: every distribution is over these
        self.unigram = (counts.double() / max(1, len(self.ids))).float()
        self.levels = [self._level(seq, n) for n in range(1, self.order + 1)]

    def _key(self, context: torch.Tensor) -> torch.Tensor:
        key = torch.zeros(context.shape[:-1], dtype=torch.long)
        for j in range(context.shape[-1]):
            key = (key << self.bits) | context[..., j]
        return key

    def _level(self, seq: torch.Tensor, n: int) -> dict | None:
        """The followers of every context of ``n`` tokens: the contexts' keys sorted (a Python
        list, for bisect), each with where its followers are, their share of its count, and
        how far its counts are trusted (Witten-Bell: count / (count + kinds of follower))."""
        if seq.numel() <= n:
            return None
        contexts = seq.unfold(0, n, 1)[:-1]  # contexts[i] = seq[i : i + n], followed by seq[i + n]
        pairs = torch.stack([self._key(contexts), seq[n:]], dim=1)
        pairs, counts = torch.unique(pairs, dim=0, return_counts=True)  # sorted by context, then follower
        keys, kinds = torch.unique_consecutive(pairs[:, 0], return_counts=True)
        owner = torch.repeat_interleave(torch.arange(len(keys)), kinds)
        totals = torch.zeros(len(keys), dtype=torch.double).index_add_(0, owner, counts.double())
        return {"keys": keys.tolist(), "ends": kinds.cumsum(0).tolist(), "kinds": kinds.tolist(),
                "seen": (totals / (totals + kinds)).tolist(),
                "where": torch.searchsorted(self.tokens, pairs[:, 1].contiguous()),
                "share": (counts.double() / totals[owner]).float()}

    def distribution(self, context: list[int]) -> torch.Tensor:
        """q(next token | context) over ``self.tokens`` (fp32, sums to 1): each order's relative
        counts, interpolated Witten-Bell style down to the unigrams, as far as the context was
        seen in the text."""
        q = self.unigram.clone()
        key = 0
        for n, level in enumerate(self.levels, start=1):
            if level is None or len(context) < n:
                break
            key |= context[-n] << (self.bits * (n - 1))  # the same packing as _key
            j = bisect.bisect_left(level["keys"], key)
            if j >= len(level["keys"]) or level["keys"][j] != key:
                break  # never seen: no longer context was either
            stop = level["ends"][j]
            start, seen = stop - level["kinds"][j], level["seen"][j]
            q.mul_(1.0 - seen).index_add_(0, level["where"][start:stop], level["share"][start:stop], alpha=seen)
        return q

    def probability(self, context: list[int], token: int) -> float:
        """q(token | context); 0 for a token the text never uses."""
        j = int(torch.searchsorted(self.tokens, torch.tensor(token)))
        if j >= len(self.tokens) or int(self.tokens[j]) != token:
            return 0.0
        return float(self.distribution(context)[j])

    def blend(self, logits: torch.Tensor, contexts: list[list[int]]) -> torch.Tensor:
        """Logits [B, V] of (1 - weight) * softmax(logits) + weight * q(. | contexts[b]), up to a
        constant per row (sampling and log-softmax do not see it): a new tensor, fp32.

        Tokens outside the text's vocabulary keep their logits; for the text's tokens,
        log(exp(l) + weight / (1 - weight) * Z * q) with Z the row's normaliser. A logit of -inf
        (a token masked before the blend) takes only the cache's share."""
        logits = logits.float()
        if self.weight <= 0.0 or not len(self.tokens):
            return logits
        lse = torch.logsumexp(logits, dim=-1, keepdim=True) + math.log(self.weight / (1.0 - self.weight))
        q = torch.stack([self.distribution(c) for c in contexts])
        mixed = torch.logaddexp(logits.index_select(1, self.tokens), lse + q.log())
        return logits.index_copy(1, self.tokens, mixed)

    def probabilities(self, ids: list[int], before: list[int] = ()) -> list[float]:
        """q of each of ``ids`` after the ones before it (and ``before``): the cache's read of a text."""
        seq = list(before) + list(ids)
        start = len(before)
        return [self.probability(seq[max(0, i - self.order): i], seq[i]) for i in range(start, len(seq))]


def choose_weight(model: list[float], cache: list[float], weights=WEIGHTS) -> tuple[float, dict[float, float]]:
    """The weight whose blend reads a text best, from each token's probability under the model
    and under a cache that did not count that text: (weight, {weight: nats per token}). 0 (no
    blend) unless a blend reads it better."""
    nats = {}
    for w in weights:
        total = 0.0
        for p, q in zip(model, cache):
            total -= math.log(max((1.0 - w) * p + w * q, 1e-300))
        nats[w] = total / max(1, len(model))
    best = min(weights, key=lambda w: (nats[w], w))
    return best, nats
