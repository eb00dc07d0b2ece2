"""How faithful the engine's weights are to fp32, on held-out English and Chinese text.

The engine runs each matmul in a format chosen for the machine (models/tuning.py): prompts
one way ("many" rows), decode steps another ("few" rows). So the held-out text is read both
ways the engine reads it, and compared with the same model in fp32 (the GGUF's exact values):

- bits per character, read whole (a prompt; also what the perplexity view shows), and read
  as a Tab press: the first half of a paragraph as the prompt, the rest a few tokens at a
  time through the KV cache, as decode steps;
- the next-token distribution the suggestions are drawn from (temperature 0.7, top-k 40,
  top-p 0.95: the editor's defaults) after every prefix of every paragraph: the mean total
  variation distance from fp32's (0: the same draws; 1: nothing in common), and how often
  the most likely next token is the same.

The texts are bench/data/heldout.txt, split into English (ASCII) and Chinese paragraphs;
nothing here is tuned on them (the tuning reads models/probe.txt).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from models.settings import Settings
from models.steps import sampling_distribution, total_variation
from models.tuning import FEW_ROWS, token_logits

HELDOUT = Path(__file__).parent / "data" / "heldout.txt"


def heldout(language: str) -> list[str]:
    """The held-out paragraphs of one language: "en" (ASCII) or "zh"."""
    paragraphs = [p.strip() for p in HELDOUT.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return [p for p in paragraphs if p.isascii() == (language == "en")]


def distribution(logits: torch.Tensor, settings: Settings):
    return sampling_distribution(logits, settings.temperature, settings.top_k, settings.top_p)


@torch.inference_mode()
def compare(engine_model, reference_model, tokenizer, language: str, settings: Settings | None = None) -> dict:
    """Bits/char (whole and as a press) and next-token fidelity of ``engine_model`` against ``reference_model``."""
    settings = settings or Settings()
    nll = {"fp32": 0.0, "whole": 0.0, "press_fp32": 0.0, "press": 0.0}
    chars = press_chars = 0
    tv, same, positions, press_tv, press_positions = 0.0, 0, 0, 0.0, 0
    for text in heldout(language):
        ids = tokenizer(text, return_tensors="pt").input_ids
        if ids.shape[1] < 2 * FEW_ROWS:
            continue
        ref_logits = reference_model(input_ids=ids).logits[0, :-1].float()
        eng_logits = engine_model(input_ids=ids).logits[0, :-1].float()
        targets = ids[0, 1:]
        ref_nll = torch.nn.functional.cross_entropy(ref_logits, targets, reduction="none")
        nll["fp32"] += float(ref_nll.sum())
        nll["whole"] += float(torch.nn.functional.cross_entropy(eng_logits, targets, reduction="sum"))
        chars += len(text)
        half = ids.shape[1] // 2
        press_logits = token_logits(engine_model, ids, prompt=half)[half - 1 :]
        nll["press"] += float(torch.nn.functional.cross_entropy(press_logits, targets[half - 1 :], reduction="sum"))
        nll["press_fp32"] += float(ref_nll[half - 1 :].sum())
        # The characters the press part covers, for its bits/char: those of its tokens.
        press_chars += len(tokenizer.decode(ids[0, half:]))
        p, vocab = distribution(ref_logits, settings), ref_logits.shape[-1]
        tv += float(total_variation(p, distribution(eng_logits, settings), vocab).sum())
        later = (p[0][half - 1 :], p[1][half - 1 :])
        press_tv += float(total_variation(later, distribution(press_logits, settings), vocab).sum())
        same += int((ref_logits.argmax(-1) == eng_logits.argmax(-1)).sum())
        positions += ref_logits.shape[0]
        press_positions += press_logits.shape[0]
    bits = {k: v / math.log(2) / max(1, press_chars if k.startswith("press") else chars) for k, v in nll.items()}
    return {
        "bits_per_char_fp32": round(bits["fp32"], 4),
        "bits_per_char_engine": round(bits["whole"], 4),
        "bits_per_char_change_pct": round(100 * (bits["whole"] / bits["fp32"] - 1), 2),
        "press_bits_per_char_change_pct": round(100 * (bits["press"] / bits["press_fp32"] - 1), 2),
        # After a prompt (its last position) and after decode steps (the press part).
        "next_token_tv_distance": round(tv / max(1, positions), 4),
        "press_next_token_tv_distance": round(press_tv / max(1, press_positions), 4),
        "next_token_top1_same": round(same / max(1, positions), 4),
        "positions": positions,
        "chars": chars,
    }
