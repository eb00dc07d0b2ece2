"""Learning a writer's style on a CPU: a LoRA adapter (peft) trained on their own text.

The steps, as plain functions:

- ``split``: the writer's text, less its last ~10 % (held out: the before/after figures are
  measured there, on text the adapter never saw);
- ``trainable``: the model in fp32 from its converted folder (memory-mapped: the weights are
  file pages, not copies) with LoRA matrices on every Linear of the body;
- ``train``: windows of the text, AdamW on the LoRA matrices only, for as many passes (up to
  two) as a slice held back from the end of the training text says help (``held_back``);
  the adapter kept is the one that read that slice best. The loss makes
  the full vocabulary's logits half a window and ``chunk`` output rows at a time
  (``head_loss``), so a window never holds its whole 256 x 262144 logits (256 MiB, and as
  much again for their gradient), and it reads those rows from the serving model's resident
  copy where that copy is exact (``OutputRows``); the matmuls run in bf16 where this CPU
  runs bf16 much faster than fp32 (``precision``, measured), in fp32 elsewhere;
- ``merged``: the trained matrices folded into the body's weights (W + s·B·A), and those
  weights made into the formats this machine's tuning chose for the base model
  (models/tuning.py); the embedding and output layer, which LoRA does not touch (62 % of
  Gemma 3 270M's weights), are the base model's own objects, shared, not copied. The result
  is a model of its own, with its own engine, queue and prefix caches (so a cached prompt
  of the base model is never read by the adapted one).

Tab presses keep priority: before every layer, forwards and backwards, the training waits
while any model's queue has presses to serve (models/scheduler.py FOREGROUND), and stops
there when cancelled or past its time. On 2 cores a layer of a 256-token window is ~50 ms
of work in fp32 (~20 in bf16), so a press waits at most about that long for the training to
step aside.

Measured (bench/personalize.py, README): which settings and what gain.
"""

from __future__ import annotations

import functools
import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from models.core import dtype_name
from models.scheduler import FOREGROUND


@dataclass(frozen=True)
class StyleConfig:
    rank: int = 16
    alpha: int = 32  # LoRA's scale is alpha / rank
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lr: float = 5e-4  # held-out bits/char after one epoch, English: -3.1 % (5e-4), -1.7 % (1e-3), -1.5 % (2e-3)
    window: int = 256  # tokens a training step reads
    # Passes over the text at most. How many help depends on the text, so a slice of it held
    # back decides (``validation``): with the rate's cosine planned over three passes, bits/char
    # on the held-out end of "A Scandal in Bohemia" were best after one pass and 4 % worse than
    # the base model's after three, while on text the base model cannot have read (this
    # project's README) they were 12-13 % lower after one to two (2026-12-07, EPYC). Stopped
    # where the held-back slice read best, the held-out text came out 0 and 0.6 % worse than
    # at its own best. Planned over two passes, as the job reads them: -2.4 and -11.5 % (one
    # pass: -2.0 and -9.2 %). Three passes planned were worse than two once the steps were fast
    # enough for all of them (bf16, alone, held-out read by the training model, 2026-12-07): a
    # run stopped early keeps an adapter from a rate still high. Doyle -3.46 (kept at step 16
    # of 32) against -3.47 % (32 of 34), the README -10.9 (60 of 60) against -12.0 % (40 of 40).
    epochs: int = 2
    # The end of the training text held back to choose when to stop (checked every half pass,
    # stopped after two checks without a better figure, the best adapter kept); 0: no slice,
    # ``epochs`` passes. Where the slice would be under ``min_validation`` characters (texts
    # under ~17,000), none is held back and the training makes one pass: on each text above,
    # one pass read the held-out part better than the base model.
    validation: float = 0.06
    min_validation: int = 1000
    patience: int = 2
    holdout: float = 0.1  # the last part of the text kept out of training, for the before/after figures
    # Output rows read at once by the loss (head_loss): 8192 rows are 21 MiB in fp32.
    chunk: int = 8192
    # Each decoder layer's activations are made again in the backward pass instead of kept
    # (gradient checkpointing): a 256-token window's training step held 1591 MB anonymous with
    # the serving model, 1228-1287 so (3.08-3.29 against 2.80 s a step). With a writer pressing
    # Tab the job's peak RSS was 3061 MB without it, over the 3 GB the issue allows.
    checkpoint: bool = True
    seed: int = 0
    # Training's own time (waits for Tab presses aside), at most: after two steps the run is
    # planned to fit, so 20,000 characters of Chinese (~17,000 tokens here, ~3 s a window of
    # 256 on 2 cores) still end within the app's five minutes.
    train_seconds: float = 200.0
    # ... and its time on the clock, waits included, at most: a writer pressing Tab all along
    # (bench/personalize.py: a press every 0.3 s) leaves the training a quarter of the CPU,
    # and a run planned by its own time alone then ran past the job's 600 s and was lost.
    # The plan is redone after every step, so the training ends with fewer steps instead.
    # (editor/styles.py sets it for each job from job_seconds.)
    wall_seconds: float = 400.0
    # A job, click to adapted suggestions, is planned to take at most this long: the training
    # gets what the stages around it leave. With 400 s of training the Chinese job took 438 s
    # with a writer pressing Tab all along (2026-12-07), ~38 s of it measuring, preparing, folding
    # the adapter in and comparing suggestions, before and after the training.
    job_seconds: float = 280.0
    # The training's matmuls in fp32, or in bf16 where this CPU runs them at least
    # ``BF16_MARGIN`` times as fast ("auto": measured once a process, ``precision``). A
    # 256-token window of Gemma, forward and backward, with the rows as the job reads them
    # (EPYC with avx512_bf16, 2026-12-07): 2.83 s in fp32, 1.15 s in bf16, the loss within
    # 0.004 nats and the adapter's gradient the same direction (cosine 1.000). Without native
    # bf16 it is emulated: capped to AVX-512 without bf16, a matmul as fast as fp32 at best;
    # capped to AVX2, 30x slower.
    precision: str = "auto"  # "auto", "fp32" or "bf16"


class Cancelled(Exception):
    """The job was called off, or ran past its time (the message says which)."""


@dataclass
class Progress:
    """How far a job is, for the page and the terminal. Replaced whole, never changed in place."""

    stage: str = "starting"
    done: int = 0  # training steps done
    total: int = 0
    loss: float = float("nan")
    eta_s: float | None = None
    paused_s: float = 0.0  # time the training stood aside for Tab presses
    started: float = field(default_factory=time.monotonic)
    held_back_bits: float | None = None  # the best bits/char on the held-back slice so far

    def line(self) -> str:
        if self.stage != "training" or not self.total:
            return self.stage
        eta = f", about {self.eta_s:.0f} s left" if self.eta_s is not None else ""
        figures = [f"loss {self.loss:.2f}"] if math.isfinite(self.loss) else []
        if self.held_back_bits is not None:
            figures.append(f"held-back text {self.held_back_bits:.3f} bits/char")
        said = f" ({', '.join(figures)})" if figures else ""
        return f"training: step {self.done}/{self.total}{said}{eta}"


# ---------------------------------------------------------------- the text


def split(text: str, holdout: float) -> tuple[str, str]:
    """(train, held out): the last ``holdout`` of the text, cut where a paragraph or sentence
    ends near that point (so neither part starts mid-word)."""
    target = int(len(text) * (1 - holdout))
    if holdout <= 0 or target <= 0:
        return text, ""
    window = text[max(0, target - 400): target + 400]
    ends = [m.end() for m in re.finditer(r"\n+|[.!?。！？…」”\"]\s*", window)]
    if ends:
        best = min(ends, key=lambda e: abs(max(0, target - 400) + e - target))
        target = max(0, target - 400) + best
    return text[:target], text[target:]


def windows(tokenizer, text: str, size: int) -> list[list[int]]:
    """The text's tokens in windows of ``size`` (each read after the model's BOS, as a document starts)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return [ids[i:i + size] for i in range(0, len(ids), size) if len(ids[i:i + size]) >= 8]


# ---------------------------------------------------------------- the training's precision

BF16_MARGIN = 1.5  # bf16 is taken only this much faster: it rounds each product's inputs to 8 bits


def choose_precision(seconds: dict[torch.dtype, float], margin: float = BF16_MARGIN) -> torch.dtype:
    """fp32, unless another precision timed ``margin`` times as fast (a missing or failed one: inf)."""
    fastest = min(seconds, key=seconds.get)
    return fastest if seconds[fastest] * margin <= seconds[torch.float32] else torch.float32


def _matmul_seconds(dtype: torch.dtype) -> float:
    """A training step's largest matmuls in miniature: 128 positions by 2048 output rows of
    width 640, forwards and for the input's gradient, timed as the tuning times a way
    (``tuning.seconds_per_call``: the median after a first call; one whose first call takes
    over ~50 ms, emulated where fp32 takes ~1.5, is not timed further)."""
    from models.tuning import seconds_per_call

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(128, 640, generator=generator).to(dtype)
    w = torch.randn(2048, 640, generator=generator).to(dtype)
    g = torch.randn(128, 2048, generator=generator).to(dtype)
    FOREGROUND.wait_idle(2.0)  # not while a Tab press takes the cores (the first job may start amid presses)
    return seconds_per_call(lambda: (x @ w.T, g @ w), give_up_s=0.05)


@functools.cache
def measured_precision() -> tuple[torch.dtype, dict[str, float]]:
    """The precision this process's CPU trains fastest in, and what was timed (seconds): ~0.1 s."""
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        try:
            seconds[dtype] = _matmul_seconds(dtype)
        except RuntimeError:  # no kernel for it here
            seconds[dtype] = math.inf
    return choose_precision(seconds), {dtype_name(d): t for d, t in seconds.items()}


def precision(config: StyleConfig) -> torch.dtype:
    if config.precision == "auto":
        return measured_precision()[0]
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[config.precision]


# ---------------------------------------------------------------- the model being trained


def trainable(folder: str, config: StyleConfig) -> nn.Module:
    """The model in fp32 from ``folder`` (its weights memory-mapped), LoRA on the body's Linears.

    Its weights are pages of the converted model's file, shared with the page cache and with
    the serving model's fp32 embedding (a view of the same file), not copies: RSS counts them
    (~1.1 GB once the output layer has been read), but they are clean pages the system can
    drop and read again.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.train()
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(config.targets), lora_dropout=0.0, bias="none")
    model = get_peft_model(model, lora)
    if config.checkpoint:
        _inner(model).activation_checkpointing_enable({"use_reentrant": False})
    return model


def _inner(model: nn.Module) -> nn.Module:
    """The causal LM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _yield_hooks(model: nn.Module, pause: Callable[[], None]) -> list:
    """Call ``pause`` before every decoder layer, forwards and backwards."""
    handles = []

    def before(module, args):
        pause()

    def after(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(lambda grad: (pause(), grad)[1])

    for layer in _inner(model).model.layers:
        handles.append(layer.register_forward_pre_hook(before))
        handles.append(layer.register_forward_hook(after))
    return handles


@dataclass
class OutputRows:
    """The output layer's weight, read as fp32 rows by the training's loss.

    Gemma's output layer is its Q8_0 token embedding, and the serving model already holds it
    exactly as block int8 (kernels.Screen.exact, 178 MB, resident). Read from there, the
    training never touches the fp32 copy in the mapped file (671 MB of file pages the job's peak
    RSS counted), and reads 168 MB of int8 four times a step (each half window twice) instead
    of 671 MB of fp32 sixteen times. Where the copy is not exact (another model's format), the
    fp32 weight is read instead."""

    weight: torch.Tensor  # fp32 [vocab, hidden]: the training model's own (mapped) weight
    copy: object | None = None  # kernels.BlockInt8 holding the same values, resident

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    def span(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.copy.span(start, stop, dtype) if self.copy is not None else self.weight[start:stop].to(dtype)

    def at(self, index: torch.Tensor) -> torch.Tensor:
        return self.copy.rows(index) if self.copy is not None else self.weight.index_select(0, index).float()


def output_rows(model: nn.Module, serving: nn.Module | None = None) -> OutputRows:
    """The training model's output rows, from ``serving``'s resident exact copy where it has one
    (checked on a sample of rows: equal bit for bit, or not used)."""
    weight = _inner(model).get_output_embeddings().weight.detach()
    head = serving.get_output_embeddings() if serving is not None and hasattr(serving, "get_output_embeddings") else None
    copy = getattr(getattr(head, "few_weight", None), "exact", None)
    if copy is None or tuple(copy.q.shape) != tuple(weight.shape):
        return OutputRows(weight)
    sample = torch.cat([torch.arange(min(64, weight.shape[0])), torch.randint(0, weight.shape[0], (64,),
                        generator=torch.Generator().manual_seed(0))])
    if not torch.equal(copy.rows(sample), weight.index_select(0, sample).float()):
        return OutputRows(weight)
    return OutputRows(weight, copy)


def head_loss(hidden: torch.Tensor, targets: torch.Tensor, rows: OutputRows, chunk: int,
              pause: Callable[[], None], positions: int = 128, gradient: bool = True,
              dtype: torch.dtype = torch.float32) -> tuple[float, torch.Tensor | None]:
    """Mean cross-entropy of ``hidden`` [T, d] against ``targets`` [T] through the output layer,
    and (unless not ``gradient``: None) its gradient with respect to ``hidden``: the same as
    F.cross_entropy on the full logits, summed in another order.

    ``positions`` at a time, the output rows are read ``chunk`` at a time, twice: once for the
    logits (kept: 128 positions x 262144 are 128 MiB) and each position's log-normaliser, once
    for the softmax's share of the gradient. Made again instead of kept, the logits cost half
    as much again of the step's largest matmul. Gemma, a 256-token window with the serving
    model beside it (EPYC, 2026-12-07): 256 positions at a time held 1542 MB anonymous at 2.80 s
    a step, 128 held 1346 at 2.97 s (the 32-position chunks of full logits before: 1228-1287 MB
    anonymous, but 1142 MB of the mapped file against 525, at 3.08-3.29 s).

    ``dtype`` bf16: the products of the rows and ``hidden`` in bf16, the softmax and the sums
    in fp32 (``precision``)."""
    grad = torch.empty_like(hidden) if gradient else None
    loss = 0.0
    spans = [(start, min(start + chunk, rows.vocab)) for start in range(0, rows.vocab, chunk)]
    for first in range(0, hidden.shape[0], positions):
        h = hidden[first:first + positions]
        low = h.to(dtype)
        top = torch.full((h.shape[0],), float("-inf"))
        total = torch.zeros(h.shape[0])
        parts = []
        for start, stop in spans:
            pause()
            part = (low @ rows.span(start, stop, dtype).T).float()
            high = torch.maximum(top, part.amax(dim=1))
            total = total * torch.exp(top - high) + torch.exp(part - high[:, None]).sum(dim=1)
            top = high
            if gradient:
                parts.append(part)
        normaliser = top + torch.log(total)
        wanted = rows.at(targets[first:first + positions])
        loss += float((normaliser - (h * wanted).sum(dim=1)).sum())
        if not gradient:
            continue
        g = -wanted
        for (start, stop), part in zip(spans, parts):
            pause()
            g.add_(part.sub_(normaliser[:, None]).exp_().to(dtype) @ rows.span(start, stop, dtype))
        grad[first:first + positions] = g
        del parts
    return loss / hidden.shape[0], grad.div_(hidden.shape[0]) if gradient else None


def window_loss(model: nn.Module, bos: int | None, window: list[int], chunk: int, pause: Callable[[], None],
                rows: OutputRows | None = None, backward: bool = True, dtype: torch.dtype = torch.float32) -> float:
    """Forward and (unless not ``backward``) backward of one window; returns its mean loss
    (nats per token).

    The body runs once; the loss and its gradient with respect to the last hidden states come
    from ``head_loss`` (``rows``: the output layer's, by default the model's own), and the
    body's backward takes that gradient. ``dtype`` bf16: the body's matmuls and attention in
    bf16 (autocast; the LoRA matrices and their gradients stay fp32), and the loss's as above.
    """
    inner = _inner(model)
    ids = torch.tensor([([bos] if bos is not None else []) + window])
    with torch.set_grad_enabled(backward), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        hidden = inner.model(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
    with torch.no_grad():
        loss, grad = head_loss(hidden.detach().float(), ids[0, 1:], rows or output_rows(model), chunk, pause,
                               gradient=backward, dtype=dtype)
    if backward:
        hidden.backward(grad.to(hidden.dtype))
    return loss


def held_back(text: str, config: StyleConfig) -> tuple[str, str]:
    """(what is trained on, the slice held back to choose when to stop): the end of ``text``,
    or nothing where it would be under ``config.min_validation`` characters."""
    fit, slice_ = split(text, config.validation)
    return (fit, slice_) if len(slice_) >= config.min_validation else (text, "")


@dataclass
class Trained:
    losses: list[float]  # each step's
    kept: int  # the steps the kept adapter had taken
    checks: list[tuple[int, float]]  # (step, bits/char on the held-back slice)
    held_back_chars: int
    precision: str  # of the training's matmuls: "float32" or "bfloat16"


def train(
    model: nn.Module, tokenizer, text: str, config: StyleConfig,
    report: Callable[[Progress], None] = lambda p: None, should_stop: Callable[[], str | None] = lambda: None,
    rows: OutputRows | None = None,
) -> Trained:
    """Train the LoRA matrices on ``text``: passes over its windows, shuffled, as many as the
    slice held back from its end reads better for (``held_back``; checked every half pass, up
    to ``config.epochs``), and the adapter that read it best kept. Without a slice (``config.
    validation`` 0: ``config.epochs`` passes; a text too short for one: a single pass). Where
    the pace of the first two steps leaves no time for a pass and a half, the slice is trained
    on too and never read, two passes at most.

    ``should_stop()`` returns why to stop (cancelled, out of time) or None; it is asked before
    every layer, with the wait for Tab presses. ``rows``: where the loss reads the output layer
    (``output_rows``).
    """
    torch.manual_seed(config.seed)
    epochs = config.epochs
    if config.validation > 0:
        text, check_text = held_back(text, config)
        epochs = epochs if check_text else 1
    else:
        check_text = ""
    parts = windows(tokenizer, text, config.window)
    if not parts:
        raise ValueError("the text is too short to learn from")
    checking = windows(tokenizer, check_text, config.window) if check_text else []
    every = max(1, len(parts) // 2) if checking else 0
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    dtype = precision(config)
    full = total = epochs * len(parts)
    progress = Progress("training", 0, total)
    report(progress)
    waited = 0.0

    def pause() -> None:
        nonlocal waited
        if FOREGROUND.busy():
            began = time.monotonic()
            while not FOREGROUND.wait_idle(0.1):
                if should_stop():
                    break
            waited += time.monotonic() - began
        why = should_stop()
        if why:
            raise Cancelled(why)

    rows = rows or output_rows(model)
    hooks = _yield_hooks(model, pause)
    losses: list[float] = []
    bos = tokenizer.bos_token_id
    checks: list[tuple[int, float]] = []
    best, kept, since_best = math.inf, 0, 0
    best_state: list[torch.Tensor] | None = None

    def check(step: int) -> None:
        """Read the held-back slice; keep the adapter where it reads best."""
        nonlocal best, kept, since_best, best_state
        nats = sum(window_loss(model, bos, w, config.chunk, pause, rows, backward=False, dtype=dtype) * len(w)
                   for w in checking)
        bits = nats / math.log(2) / len(check_text)
        checks.append((step, round(bits, 4)))
        if bits < best:
            best, kept, since_best = bits, step, 0
            best_state = [p.detach().clone() for p in params]
        else:
            since_best += 1

    started = time.monotonic()
    try:
        step = 0
        if checking:
            check(0)  # the base model: an adapter that reads the slice worse is not kept
        while step < total:
            if step % len(parts) == 0:
                order = torch.randperm(len(parts)).tolist()
            warm = min(1.0, (step + 1) / 5)  # a short warm-up, then cosine to zero over the run
            for group in optimizer.param_groups:
                group["lr"] = config.lr * warm * 0.5 * (1 + math.cos(math.pi * step / total))
            losses.append(window_loss(model, bos, parts[order[step % len(parts)]], config.chunk, pause, rows, dtype=dtype))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.monotonic() - started
            working = elapsed - waited
            if step >= 2:
                # Planned again after every step, up or down, at the pace so far: to fit the
                # training's own time, and to end on the clock in time. (Planned once down and
                # never up, a Chinese job whose first steps were slow under a writer's presses
                # stopped after 15 steps at 217 s of a 280 s plan.)
                by_work = int(config.train_seconds / (working / step))
                by_clock = step + int(max(0.0, config.wall_seconds - elapsed) / (elapsed / step))
                total = max(2, step, min(full, by_work, by_clock))
            if step == 2 and checking and total < len(parts) + every:
                # No time for a pass and a half (Chinese with a writer pressing Tab: 24 steps of
                # 64 windows), so little to choose: the slice is trained on too, and no time goes
                # to reading it (held back there, it cost 2.67 -> 1.95 % of the gain and 17 s,
                # 2026-12-07). Two passes at most then, should the pace pick up: two never read
                # the held-out text worse than one (above).
                added = list(range(len(parts), len(parts) + len(checking)))
                rest = order[step:] + added
                order = order[:step] + [rest[i] for i in torch.randperm(len(rest)).tolist()]
                parts, checking, check_text, best_state = parts + checking, [], "", None
                full = min(epochs, 2) * len(parts)
                total = max(2, step, min(full, by_work, by_clock))
            if checking and (step % every == 0 or step == total):
                check(step)
                if since_best >= config.patience:
                    total = step  # no better for a whole pass: more passes would read it worse still
            eta = elapsed / step * (total - step)
            report(Progress("training", step, total, losses[-1], eta, waited, progress.started,
                            held_back_bits=best if checking else None))
        if best_state is not None and kept != step:
            with torch.no_grad():
                for p, saved in zip(params, best_state):
                    p.copy_(saved)
    finally:
        for handle in hooks:
            handle.remove()
    return Trained(losses, kept if checking else len(losses), checks if checking else [], len(check_text),
                   dtype_name(dtype))


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained LoRA matrices, by the module they belong to, as saved on disk."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}


# ---------------------------------------------------------------- the adapted model


def deltas(state: dict[str, torch.Tensor], config: StyleConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Each adapted Linear's weight change, scale · B · A, by module name
    ("model.layers.0.self_attn.q_proj"), one at a time (all at once they are the body's size)."""
    scale = config.alpha / config.rank
    for key, a in state.items():
        if ".lora_A." not in key:
            continue
        b = state[key.replace(".lora_A.", ".lora_B.")]
        name = key.split(".lora_A.")[0]
        name = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
        yield name, scale * (b.float() @ a.float())


def merged(base, folder: str, state: dict[str, torch.Tensor], config: StyleConfig, name: str):
    """A LoadedModel for the base model with the adapter folded in (see the module's docstring).

    ``base``: the base model's LoadedModel (its tokenizer, embedding, output layer and tuning
    are used); ``folder``: its fp32 weights; ``state``: the LoRA matrices.

    One layer at a time: its weight changed, made into the format the base model's tuning
    chose, and the changed fp32 weight let go. All the changes and all the changed weights at
    once were twice the body's fp32 size (~800 MB for Gemma 3 270M): the job's peak RSS was
    here, 3302 MB with a writer pressing Tab (anonymous 2706; EPYC, 2026-12-07).
    """
    from transformers import AutoModelForCausalLM

    from models import tuning
    from models.fastnorm import fuse_norms
    from models.loading import LoadedModel

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    # The embedding and the output layer are unchanged: the base model's own, not a copy.
    model.model.embed_tokens = base.model.model.embed_tokens
    model.lm_head = base.model.lm_head
    model.to(base.device).eval()
    fuse_norms(model)
    choice = tuning.unrounded(base.tuning) if base.tuning is not None else None  # GPTQ's rounding is the base weights'
    for module_name, change in deltas(state, config):
        parent_name, _, attr = module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, attr)
        if type(layer) is not nn.Linear:
            continue
        # A new tensor: the loaded weight is a view of the mapped file and stays untouched.
        layer.weight = nn.Parameter(layer.weight.detach() + change, requires_grad=False)
        del change
        if choice is not None:
            group = tuning.Group(tuning.shape_key(layer), [(parent, attr, layer)], False)
            absmax = {id(layer): base.absmax[module_name]} if module_name in base.absmax else {}
            tuning.apply([group], {group.key: choice[group.key]}, absmax)
            del group
        del layer
    return LoadedModel(name, model, base.tokenizer, base.device, base.dtype, base.context_length, base.weights, base.tuning,
                       folder=folder, absmax=base.absmax)
