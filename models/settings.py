"""What the writer can tune, with the ranges that make sense, and how bad values are handled.

Defaults follow Hugging Face's Write With Transformer: temperature 0.7, top-p 0.95,
top-k 40, and only the last few hundred tokens of the document as context.
Out-of-range values are clamped (and the clamping reported) rather than refused, so a
typo in a settings box never costs the writer a suggestion.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

# (low, high) for each numeric setting.
LIMITS = {
    "temperature": (0.05, 2.0),
    "top_k": (1, 1000),
    "top_p": (0.05, 1.0),
    "max_time": (0.2, 30.0),
    "context_tokens": (16, 2048),
    "num_suggestions": (1, 6),
    "hide_below": (0.0, 0.9),
}
LENGTH_LIMITS = (1, 256)  # tokens for one suggestion


@dataclass
class Settings:
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    # Target lengths in tokens, shortest first: a few words, a phrase, a sentence or more.
    lengths: list[int] = field(default_factory=lambda: [4, 12, 32])
    max_time: float = 4.0  # seconds per Tab press; what is ready by then is returned
    context_tokens: int = 384  # the document is cut to its last N tokens
    num_suggestions: int = 3
    prefetch: bool = True  # pre-compute suggestions while the writer pauses (costs CPU when idle)
    # Hide rows whose confidence (mean token probability, the popup's bar) is below this; 0 shows
    # all. Off by default: on bench.quality (English) 0.3 raises the share of rows that start
    # right from 19 % to 35 % but shows only 22 % of the rows and hides 60 % of the right ones
    # (README, "Quality"): quiet bought with suggestions, which is the writer's choice.
    hide_below: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


MAX_LENGTHS = 8  # values in ``lengths``: more is refused before parsing (a list of 10^7 is work for nothing)


def _shown(value) -> str:
    """``value`` as a note may quote it: short, one line."""
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def parse_lengths(value) -> list[int]:
    """Accept "4, 12, 32", [4, 12, 32] or a single number (at most MAX_LENGTHS of them)."""
    too_long = len(value) > 16 * MAX_LENGTHS if isinstance(value, str) else isinstance(value, (list, tuple)) and len(value) > MAX_LENGTHS
    if too_long:
        raise ValueError("too many lengths")
    if isinstance(value, str):
        parts = [p for p in value.replace(";", ",").replace(" ", ",").split(",") if p.strip()]
        return [int(float(p)) for p in parts]
    if isinstance(value, (int, float)):
        return [int(value)]
    return [int(float(v)) for v in value]


def validate(raw: dict | None) -> tuple[Settings, list[str]]:
    """Build Settings from untrusted input. Returns the settings and messages for anything changed."""
    settings = Settings()
    notes: list[str] = []
    raw = dict(raw or {})
    known = {f.name for f in fields(Settings)}
    unknown = sorted(str(key)[:40] for key in set(raw) - known)
    if unknown:
        notes.append(f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown[:5])}{', …' if len(unknown) > 5 else ''} ignored")
    for key, (low, high) in LIMITS.items():
        if key not in raw or raw[key] is None or raw[key] == "":
            continue
        kind = type(getattr(settings, key))
        try:
            value = float(raw[key])
            if not math.isfinite(value):
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            notes.append(f"{key}: {_shown(raw[key])} is not a number, using {getattr(settings, key)}")
            continue
        clamped = min(max(value, low), high)
        if clamped != value:
            notes.append(f"{key}: {value:g} is out of range [{low:g}, {high:g}], using {clamped:g}")
        setattr(settings, key, kind(round(clamped)) if kind is int else clamped)
    if "prefetch" in raw and raw["prefetch"] is not None:
        settings.prefetch = bool(raw["prefetch"])
    if raw.get("lengths") not in (None, "", []):
        try:
            lengths = parse_lengths(raw["lengths"])
            if not lengths or len(lengths) > MAX_LENGTHS:
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            notes.append(
                f"lengths: {_shown(raw['lengths'])} is not a list of at most {MAX_LENGTHS} numbers, using {settings.lengths}"
            )
        else:
            low, high = LENGTH_LIMITS
            fixed = sorted(min(max(n, low), high) for n in lengths)
            if fixed != sorted(lengths):
                notes.append(f"lengths: each must be in [{low}, {high}] tokens, using {fixed}")
            settings.lengths = fixed
    return settings, notes


def targets(settings: Settings, round_: int = 0) -> list[int]:
    """Token targets for each suggestion of one Tab press, shortest first.

    ``round_`` counts repeated Tab presses on the same text: each round asks for longer
    continuations (doubling), so pressing Tab again gives "more and longer".
    """
    base = settings.lengths
    n = settings.num_suggestions
    # Spread the configured lengths over n suggestions (repeat the longest if fewer given).
    spread = [base[min(i * len(base) // n, len(base) - 1)] for i in range(n)] if n >= len(base) else base[-n:]
    scale = 2 ** max(0, min(round_, 4))
    return sorted(min(t * scale, LENGTH_LIMITS[1]) for t in spread)
