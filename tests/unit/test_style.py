"""Learning a style (models/style.py, editor/styles.py) on a tiny random-weight Llama.

The real model is exercised in tests/integration/test_styles.py; here the training loop,
cancelling, yielding to Tab presses, the adapter on disk and the adapted model's own caches.
"""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch
import transformers

from editor.styles import BAD_NAME, BUSY, OFF, Styles, StyleStore, parse
from models import style
from models.engine import SuggestionEngine
from models.loading import LoadedModel
from models.scheduler import FOREGROUND
from models.settings import Settings
from tests.unit.test_engine_logic import CORPUS, build_tokenizer

# validation 0: ``epochs`` passes, nothing held back (the held-back slice has tests of its own);
# fp32 whatever the CPU (bf16 has tests of its own)
CONFIG = style.StyleConfig(rank=8, alpha=16, lr=3e-2, window=32, epochs=1, chunk=16, validation=0.0, precision="fp32")
TEXT = " ".join(CORPUS[:4] * 8)  # English, repetitive: a tiny model can learn it fast


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def folder(tok, tmp_path_factory):
    """A tiny Llama saved as a transformers folder, as the app keeps a converted model."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        # Weights of 0.02 cap a random model's logits near uniform (|h| 8 x |row| 0.16) whatever its
        # body does; the output layer is frozen in training, so the adapter could lower nothing.
        initializer_range=0.3,
    )
    where = tmp_path_factory.mktemp("tiny")
    transformers.LlamaForCausalLM(config).save_pretrained(where)
    tok.save_pretrained(where)
    return str(where)


def base_engine(tok, folder) -> SuggestionEngine:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return SuggestionEngine(LoadedModel("tiny", model, tok, torch.device("cpu"), torch.float32, 512, folder=folder))


def test_split_holds_out_the_end_at_a_sentence():
    text = "First sentence here. " * 50 + "The end is held out."
    train, held = style.split(text, 0.1)
    assert train + held == text
    assert 0.05 < len(held) / len(text) < 0.2
    assert held[0] != " " and train.endswith(" ")  # cut after a sentence's end, not inside a word


def test_training_lowers_the_loss(tok, folder):
    config = style.StyleConfig(**{**vars(CONFIG), "epochs": 6})
    model = style.trainable(folder, config)
    losses = style.train(model, tok, "the quick brown fox jumps " * 40, config).losses  # a text a tiny model can learn
    per_epoch = len(losses) // 6
    assert sum(losses[-per_epoch:]) / per_epoch < 0.7 * sum(losses[:per_epoch]) / per_epoch
    # Only the LoRA matrices were trained.
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)


def test_the_loss_by_output_rows_is_cross_entropy_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g)
    targets = torch.randint(0, 50, (7,), generator=g)
    want = torch.nn.functional.cross_entropy(hidden @ weight.T, targets)
    want.backward()
    for positions, groups in ((256, 1), (3, 3)):  # all 7 positions at once, or 3 at a time
        pauses = []
        loss, grad = style.head_loss(hidden.detach(), targets, style.OutputRows(weight), 16, lambda: pauses.append(1), positions)
        assert abs(loss - float(want.detach())) < 1e-5 and torch.allclose(grad, hidden.grad, atol=1e-6)
        assert len(pauses) == groups * 2 * 4  # a chance to step aside for a press before every 16 rows, twice
        alone, none = style.head_loss(hidden.detach(), targets, style.OutputRows(weight), 16, lambda: None, positions, gradient=False)
        assert alone == loss and none is None  # the loss alone: the same figure


def test_the_precision_is_chosen_by_measurement():
    fp32, bf16 = torch.float32, torch.bfloat16
    assert style.choose_precision({fp32: 1.0, bf16: 2.0}) is fp32  # slower (emulated): never
    assert style.choose_precision({fp32: 1.0, bf16: 0.8}) is fp32  # faster, but not by the margin
    assert style.choose_precision({fp32: 1.0, bf16: 0.5}) is bf16
    assert style.choose_precision({fp32: 1.0, bf16: math.inf}) is fp32  # no kernel for it
    chosen, timed = style.measured_precision()  # this machine: whichever its own timings say
    assert chosen is style.choose_precision({fp32: timed["float32"], bf16: timed["bfloat16"]})
    assert style.precision(style.StyleConfig(precision="auto")) is chosen
    assert style.precision(CONFIG) is fp32 and style.precision(style.StyleConfig(precision="bf16")) is bf16


def test_the_loss_in_bf16_follows_fp32(tok, folder):
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(7, 16, generator=g), torch.randn(50, 16, generator=g)
    targets = torch.randint(0, 50, (7,), generator=g)
    exact = style.head_loss(hidden, targets, style.OutputRows(weight), 16, lambda: None)
    low = style.head_loss(hidden, targets, style.OutputRows(weight), 16, lambda: None, dtype=torch.bfloat16)
    assert abs(low[0] - exact[0]) < 0.02 * exact[0] and low[1].dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(low[1].flatten(), exact[1].flatten(), dim=0) > 0.999
    # A window of the tiny model, forward and backward: the adapter's gradient points the same way.
    model = style.trainable(folder, CONFIG)
    with torch.no_grad():  # B starts at zero; nonzero, A has a gradient too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    window = style.windows(tok, TEXT, CONFIG.window)[0]
    losses, grads = [], []
    for dtype in (torch.float32, torch.bfloat16):
        losses.append(style.window_loss(model, tok.bos_token_id, window, CONFIG.chunk, lambda: None, dtype=dtype))
        grads.append(torch.cat([p.grad.flatten() for p in params]))
        assert all(p.grad.dtype == torch.float32 for p in params)  # the LoRA matrices stay fp32
        model.zero_grad(set_to_none=True)
    assert abs(losses[1] - losses[0]) < 0.02 * losses[0]
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


def test_training_in_bf16_lowers_the_loss(tok, folder):
    config = style.StyleConfig(**{**vars(CONFIG), "epochs": 6, "precision": "bf16"})
    model = style.trainable(folder, config)
    trained = style.train(model, tok, "the quick brown fox jumps " * 40, config)
    per_epoch = len(trained.losses) // 6
    assert trained.precision == "bfloat16"
    assert sum(trained.losses[-per_epoch:]) < 0.7 * sum(trained.losses[:per_epoch])


def test_the_loss_reads_the_serving_models_copy_only_where_it_is_exact(tok, folder):
    from models.kernels import Screen, block_int8

    class Serving(torch.nn.Module):  # the serving model's output layer, as tuning leaves it
        def __init__(self, exact):
            super().__init__()
            self.head = type("Head", (), {"few_weight": Screen([], exact, False)})()

        def get_output_embeddings(self):
            return self.head

    model = style.trainable(folder, CONFIG)
    weight = style._inner(model).get_output_embeddings().weight
    assert style.output_rows(model, Serving(block_int8(weight.detach()))).copy is None  # random fp32: not exact
    with torch.no_grad():  # weights a Q8_0 block format holds exactly, as Gemma's embedding
        weight.copy_(block_int8(weight.detach()).span(0, weight.shape[0]))
    copy = block_int8(weight.detach())
    rows = style.output_rows(model, Serving(copy))
    assert rows.copy is copy and torch.equal(rows.span(3, 9), weight[3:9]) and style.output_rows(model).copy is None
    window = style.windows(tok, TEXT, CONFIG.window)[0]
    losses = [style.window_loss(model, tok.bos_token_id, window, CONFIG.chunk, lambda: None, r)
              for r in (rows, style.OutputRows(weight.detach()))]
    assert abs(losses[0] - losses[1]) < 1e-5


def test_training_with_checkpoints_gives_the_same_gradients(tok, folder):
    grads = []
    for checkpoint in (False, True):
        config = style.StyleConfig(**{**vars(CONFIG), "checkpoint": checkpoint})
        torch.manual_seed(1)
        model = style.trainable(folder, config)
        window = style.windows(tok, TEXT, config.window)[0]
        style.window_loss(model, tok.bos_token_id, window, config.chunk, lambda: None)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        # LoRA's B starts at zero: only B has a gradient before a step, and it must be the same
        assert any(float(g.abs().sum()) > 0 for g in grads[-1].values())
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4) for n in grads[0])


def test_training_ends_on_the_clock_with_fewer_steps_rather_than_running_over(tok, folder):
    # Waits for Tab presses count on the clock: the plan shrinks to what fits, never past it.
    config = style.StyleConfig(**{**vars(CONFIG), "epochs": 3})
    full = style.train(style.trainable(folder, config), tok, TEXT, config).losses
    assert len(full) == 3 * len(style.windows(tok, TEXT, config.window)) > 2
    out_of_time = style.StyleConfig(**{**vars(config), "wall_seconds": 0.0})
    progress = []
    cut = style.train(style.trainable(folder, out_of_time), tok, TEXT, out_of_time, report=progress.append).losses
    assert len(cut) == 2 and progress[-1].done == progress[-1].total == 2


def test_the_plan_grows_again_when_the_steps_get_faster(tok, folder):
    # The first steps are slow (a writer pressing Tab: 2 s of waits), the rest fast: planned at
    # the first pace the run would stop after ~5 steps with most of its time unused.
    config = style.StyleConfig(**{**vars(CONFIG), "epochs": 20, "wall_seconds": 6.0})
    progress = []

    def report(p):
        progress.append(p)
        if p.done == 1:
            time.sleep(2.0)

    started = time.monotonic()
    losses = style.train(style.trainable(folder, config), tok, TEXT, config, report=report).losses
    assert min(p.total for p in progress if p.done >= 2) <= 5  # planned down at first...
    assert len(losses) >= 7 and progress[-1].done == progress[-1].total  # ...and up again
    assert time.monotonic() - started < config.wall_seconds + 2.0


def held_back_bits(model, tok, text: str, config) -> float:
    """Bits per character of ``text`` as the training's checks read it."""
    windows = style.windows(tok, text, config.window)
    nats = sum(style.window_loss(model, tok.bos_token_id, w, config.chunk, lambda: None, backward=False) * len(w) for w in windows)
    return nats / math.log(2) / len(text)


def test_passes_are_chosen_on_a_slice_held_back_and_the_best_adapter_kept(tok, folder):
    config = style.StyleConfig(**{**vars(CONFIG), "epochs": 4, "validation": 0.25, "min_validation": 100})
    fit, slice_ = style.held_back(TEXT, config)
    assert fit + slice_ == TEXT and len(slice_) >= 100
    torch.manual_seed(0)
    model = style.trainable(folder, config)
    progress = []
    trained = style.train(model, tok, TEXT, config, report=progress.append)
    half = len(style.windows(tok, fit, config.window)) // 2
    assert len({p.started for p in progress}) == 1  # one job's clock, for the ETA
    assert abs(progress[-1].held_back_bits - min(b for _, b in trained.checks)) < 1e-4
    assert "held-back text" in progress[-1].line() and "nan" not in progress[0].line()
    assert trained.held_back_chars == len(slice_)
    steps = [s for s, _ in trained.checks]
    assert steps[0] == 0 and all(s % half == 0 for s in steps[1:-1]) and steps[-1] == len(trained.losses)
    best = min(trained.checks, key=lambda c: c[1])
    assert trained.kept == best[0] > 0  # a repetitive text: training helped
    assert abs(held_back_bits(model, tok, slice_, config) - best[1]) < 1e-3  # the model left is the one kept


def test_passes_stop_when_the_held_back_slice_reads_no_better_for_a_whole_pass(tok, folder):
    # A rate far too high: the slice reads better for a while, then worse.
    config = style.StyleConfig(**{**vars(CONFIG), "epochs": 6, "lr": 10.0, "validation": 0.25, "min_validation": 100})
    fit, slice_ = style.held_back(TEXT, config)
    half = len(style.windows(tok, fit, config.window)) // 2
    torch.manual_seed(0)  # LoRA's A matrices: the same start whatever ran before
    model = style.trainable(folder, config)
    trained = style.train(model, tok, TEXT, config)
    best = min(trained.checks, key=lambda c: c[1])
    assert trained.kept == best[0] > 0
    assert [s for s, _ in trained.checks[-config.patience:]] == [best[0] + half * (i + 1) for i in range(config.patience)]
    assert len(trained.losses) == best[0] + config.patience * half < 6 * 2 * half  # stopped, not six passes
    assert abs(held_back_bits(model, tok, slice_, config) - best[1]) < 1e-3  # the best one kept, not the last
    # Never better than the base model (nothing learned): the base is what is kept.
    still = style.StyleConfig(**{**vars(config), "lr": 0.0})
    model = style.trainable(folder, still)
    trained = style.train(model, tok, TEXT, still)
    assert trained.kept == 0 and len(trained.checks) == 1 + config.patience
    assert all(float(p.detach().abs().max()) == 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_with_time_for_one_pass_only_the_slice_is_trained_on_not_held_back(tok, folder):
    config = style.StyleConfig(**{**vars(CONFIG), "epochs": 4, "validation": 0.25, "min_validation": 100, "train_seconds": 0.0})
    progress = []
    trained = style.train(style.trainable(folder, config), tok, TEXT, config, report=progress.append)
    assert len(trained.losses) == 2 and trained.held_back_chars == 0 and trained.checks == [] and trained.kept == 2
    assert "held-back" not in progress[-1].line()


def test_a_text_too_short_to_hold_a_slice_back_gets_one_pass(tok, folder):
    config = style.StyleConfig(**{**vars(CONFIG), "epochs": 3, "validation": 0.06})  # min_validation: 1000 characters
    assert style.held_back(TEXT, config) == (TEXT, "")
    trained = style.train(style.trainable(folder, config), tok, TEXT, config)
    assert len(trained.losses) == len(style.windows(tok, TEXT, config.window)) and trained.checks == []


def test_cancel_stops_between_layers(tok, folder):
    model = style.trainable(folder, CONFIG)
    steps = []
    with pytest.raises(style.Cancelled, match="Cancelled"):
        style.train(model, tok, TEXT, CONFIG, report=lambda p: steps.append(p.done),
                    should_stop=lambda: "Cancelled." if len(steps) >= 2 else None)
    assert steps[-1] == 1  # the second step's report never came: stopped inside it


def test_training_waits_while_presses_are_served(tok, folder):
    model = style.trainable(folder, CONFIG)
    steps, queue = [], object()
    FOREGROUND.mark(queue, True)  # a queue with presses to serve
    job = threading.Thread(target=style.train, args=(model, tok, TEXT, CONFIG, lambda p: steps.append(p)))
    try:
        job.start()
        time.sleep(1.0)
        assert [p.done for p in steps] == [0]  # started, and not one step while presses are served
    finally:
        FOREGROUND.mark(queue, False)
    job.join(timeout=60)
    assert not job.is_alive() and steps[-1].done == steps[-1].total > 0
    assert steps[-1].paused_s >= 0.5


def test_adapter_round_trips_through_disk_and_merges_exactly(tok, folder, tmp_path):
    model = style.trainable(folder, CONFIG)
    style.train(model, tok, TEXT, CONFIG)
    state = style.lora_state(model)
    store = StyleStore(tmp_path)
    meta = store.save("k" * 32, "tiny", "mine", state, {"rank": CONFIG.rank}, {"bits_per_char_after": 1.0})
    assert parse(meta["model"]) == {"base": "tiny", "name": "mine", "id": meta["id"]}
    assert store.text_ids(meta["id"]) == []  # no cache blended in: the writer's text is not kept
    cached = store.save("k" * 32, "tiny", "cached", state, {"rank": CONFIG.rank}, {"text_cache_weight": 0.1}, [5, 7, 300])
    assert store.text_ids(cached["id"]) == [5, 7, 300] and store.delete(cached["id"], "k" * 32)
    again = store.state(meta["id"])
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    # The merged model gives the adapter's logits (W + s·B·A), from the state read back.
    base = base_engine(tok, folder)
    adapted = style.merged(base.loaded, folder, again, CONFIG, meta["model"])
    ids = torch.tensor([tok(TEXT[:200]).input_ids])
    with torch.no_grad():
        want = model.eval()(input_ids=ids).logits
        got = adapted.model(input_ids=ids).logits
        plain = base.model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-2)  # it did learn something
    # Embedding and output layer are the base model's own objects, not copies.
    assert adapted.model.model.embed_tokens is base.model.model.embed_tokens
    assert adapted.model.lm_head is base.model.lm_head
    # Listing and deleting need the owner key.
    assert [m["model"] for m in store.mine("k" * 32)] == [meta["model"]] and store.mine("x" * 32) == []
    assert not store.delete(meta["id"], "x" * 32) and store.delete(meta["id"], "k" * 32)
    assert store.meta(meta["id"]) is None


def test_an_adapted_model_runs_each_layer_as_the_tuned_base_chose(tok, folder):
    from models import tuning
    from models.fastnorm import fuse_norms
    from models.kernels import TunedLinear

    model = style.trainable(folder, CONFIG)
    style.train(model, tok, TEXT, CONFIG)
    state = style.lora_state(model)
    base_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    fuse_norms(base_model)
    linears = {n: m for n, m in base_model.named_modules() if type(m) is torch.nn.Linear}
    tuned = tuning.tune(base_model, tok, say=lambda m: None)
    absmax = {n: tuned.absmax[id(m)] for n, m in linears.items() if id(m) in tuned.absmax}
    base = LoadedModel("tiny", base_model, tok, torch.device("cpu"), torch.float32, 512, tuned.describe(), tuned, folder, absmax)
    adapted = style.merged(base, folder, state, CONFIG, "tiny+mine")
    body = {n: m for n, m in adapted.model.named_modules() if n.startswith("model.layers.") and isinstance(m, (TunedLinear, torch.nn.Linear))}
    assert body and all(type(m) is TunedLinear for m in body.values())  # no fp32 Linear left behind
    choice = tuning.unrounded(tuned)
    for m in body.values():
        want = choice[tuning.shape_key(m)]
        assert (m.few_name, m.many_name) == (want["few"], want["many"])
    ids = torch.tensor([tok(TEXT[:200]).input_ids])
    with torch.no_grad():
        exact = model.eval()(input_ids=ids).logits
        got = adapted.model(input_ids=ids).logits
        plain = base.model(input_ids=ids).logits
    assert float((got - exact).norm() / exact.norm()) < 0.05  # the formats' error, not the adapter's lost
    assert float((got - exact).norm()) < 0.5 * float((plain - exact).norm())


def test_learn_end_to_end_and_prefix_caches_apart(tok, folder, tmp_path):
    base = base_engine(tok, folder)
    styles = Styles(lambda name: base, tmp_path, config=CONFIG)
    text = "\n".join(CORPUS[:4] * 12)
    answer = styles.learn(text, "mine", "tiny")
    assert "error" not in answer, answer
    assert answer["model"].startswith("tiny+mine@") and answer["heldout_chars"] > 0
    assert answer["bits_per_char_after"] != answer["bits_per_char_before"]
    assert len(answer["examples"]) >= 1 and {"text", "actual", "base", "style"} <= set(answer["examples"][0])
    adapted = styles.engine(answer["model"])
    assert adapted is styles.engine(answer["model"])  # kept loaded: switching back is instant
    # The text repeats itself: a cache of it reads the training text's end better than the model
    # alone, so one is blended in; saved with the style, and loaded with it again.
    weight = answer["text_cache_weight"]
    assert weight > 0 and adapted.text_cache is not None and adapted.text_cache.weight == weight
    styles.forget(parse(answer["model"])["id"])
    again = styles.engine(answer["model"])
    assert again is not adapted and again.text_cache.weight == weight
    assert again.text_cache.ids == adapted.text_cache.ids == tok(style.split(text, CONFIG.holdout)[0], add_special_tokens=False).input_ids
    # Each model its own prefix caches: the base model's cached prompt is never read by the style.
    settings = Settings(lengths=[4])
    base.suggest(TEXT[:300], settings, seed=0)
    ids = base.prompt_ids(TEXT[:300], settings.context_tokens)[0]
    cached = base.prefixes.reusable(ids)
    assert cached > len(ids) // 2 and adapted.prefixes is not base.prefixes
    assert adapted.prefixes.reusable(ids) <= 1  # the BOS token at most: the style never read this text
    # Its owner key lists it; another's does not, and cannot delete it.
    assert [m["model"] for m in styles.store.mine(answer["owner_key"])] == [answer["model"]]
    assert styles.store.mine("someone-else-entirely-000") == []


def test_cancel_stops_the_jobs_reading_of_a_text_not_after_it(tok, folder, tmp_path):
    """The job's scoring (the held-out text, before and after; the cache's weight) asks whether to
    stop before each window and chunk: a caller who leaves once the first read has begun ends the
    job there, before the model is prepared for training."""
    base = base_engine(tok, folder)
    asked = []

    def gone() -> bool:  # the first question is the job's own, before the read begins
        asked.append(1)
        return len(asked) > 1

    seen = []
    answer = Styles(lambda name: base, tmp_path, config=CONFIG).learn(
        "\n".join(CORPUS[:4] * 12), "mine", "tiny", caller_gone=gone, on_progress=seen.append)
    assert answer == {"error": "Cancelled: the caller went away."}
    assert [p.stage for p in seen] == ["measuring the base model on your held-out text"]


def test_learn_refuses_with_one_line(tok, folder, tmp_path):
    base = base_engine(tok, folder)
    styles = Styles(lambda name: base, tmp_path)
    assert styles.learn("too short", "mine", "tiny")["error"].startswith("Too little text")
    assert styles.learn("word " * 1000, "../etc", "tiny") == {"error": BAD_NAME}
    assert "owner key" in styles.learn("word " * 1000, "mine", "tiny", owner_key="not a key!")["error"]
    assert Styles(lambda name: base, tmp_path, enabled=False).learn("word " * 1000, "mine", "tiny") == {"error": OFF}
    styles._job.acquire()  # another job is running
    try:
        assert styles.learn("word " * 1000, "mine", "tiny") == {"error": BUSY}
    finally:
        styles._job.release()
    with pytest.raises(Exception, match="not a style this app has"):
        styles.engine("tiny+mine@AAAAAAAAAAAAAAAA")


def test_a_job_fits_its_training_into_what_job_seconds_leaves(tok, folder, tmp_path):
    base = base_engine(tok, folder)
    text = "\n".join(CORPUS[:4] * 12)
    plans = {}
    for job_seconds in (0.0, 600.0):
        config = style.StyleConfig(**{**vars(CONFIG), "epochs": 3, "job_seconds": job_seconds})
        seen = []
        answer = Styles(lambda name: base, tmp_path / str(job_seconds), config=config).learn(text, "mine", "tiny", on_progress=seen.append)
        assert "error" not in answer, answer
        plans[job_seconds] = [p for p in seen if p.stage == "training"]
    # A job with no time left trains the least a plan allows; with time, the three passes asked.
    spent, ample = plans[0.0], plans[600.0]
    assert spent[-1].done == spent[-1].total == 2
    assert ample[-1].done == ample[-1].total == ample[0].total > 2


def test_the_page_says_how_long_the_training_was_chosen_to_be():
    from editor.ui import _style_report

    answer = {"model": "tiny+mine@AAAAAAAAAAAAAAAA", "seconds": 12.0, "bits_per_char_before": 2.0, "bits_per_char_after": 1.8,
              "perplexity_per_char_before": 4.0, "perplexity_per_char_after": 3.48, "heldout_chars": 2000}
    assert "chosen" not in _style_report(answer)  # a short text: one pass, nothing held back
    kept = _style_report({**answer, "held_back_chars": 1100, "training_steps": 28, "kept_step": 18})
    assert "1,100 characters" in kept and "step 18 of 28" in kept
    assert "base model as it was" in _style_report({**answer, "held_back_chars": 1100, "training_steps": 28, "kept_step": 0})
    assert "draws on your text" not in kept  # no cache blended in
    assert "10% of each guess" in _style_report({**answer, "text_cache_weight": 0.1})
