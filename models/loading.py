"""Loading a model and its tokenizer, with an on-disk cache for converted GGUF files.

transformers reads GGUF by dequantising every tensor, which takes about a minute for
Gemma 3 270M on 2 cores. We do that once, in a process of its own (``_convert_apart``), save
the result as safetensors under the cache folder, and load from there afterwards (under a
second). Models already loaded in this
process are kept, so switching back and forth in the UI costs nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

from models.core import dtype_name
from models.registry import CACHE_ENV, ModelLoadError, ModelNotFound, ModelSource, cache_root, resolve  # noqa: F401  (re-exported; ModelLoadError: raised here)

log = logging.getLogger("tabwrite")

KEEP_IN_MEMORY = 3  # models kept loaded in this process




@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype  # of the activations
    context_length: int
    weights: str = ""  # how the matmuls run, e.g. "fp16-fbgemm (decoding) / int8-smooth (prompts)"
    tuning: object = None  # models.tuning.Tuning on a CPU: what was chosen for this machine, and why
    folder: str = ""  # where its fp32 weights are (a style is learned from them: models/style.py)
    absmax: dict = field(default_factory=dict, repr=False)  # Linear's name -> its input range on the probe (tuning)


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    """The activations' dtype. On a CPU it is fp32, and each weight's format is chosen for the
    machine by measurement (models/tuning.py): bf16 everywhere was 2x slower than fp32 on a
    Xeon without native bf16, where it is emulated. On CUDA bf16, or fp16 where bf16 is missing."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# GGUF files are converted to fp32: the exact values of their quantized blocks, which every
# weight format (models/kernels.py) is then made from and measured against.
CONVERTED_DTYPE = torch.float32


def _gguf_cache_dir(gguf_path: str, dtype: torch.dtype = CONVERTED_DTYPE) -> Path:
    st = os.stat(gguf_path)
    key = hashlib.sha256(f"{os.path.abspath(gguf_path)}|{st.st_size}|{int(st.st_mtime)}|{dtype}".encode()).hexdigest()[:12]
    return cache_root() / f"{Path(gguf_path).stem}-{dtype_name(dtype)}-{key}"


def _tuning_folder() -> Path:
    """Where each machine's choice of formats (models/tuning.py) and each model's probe read are kept."""
    return cache_root() / "tuning"


def _convert_gguf(gguf_path: str, target: Path, dtype: torch.dtype, round_too: bool = False) -> None:
    """Dequantise a GGUF file once and save it as a transformers folder (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = os.path.split(gguf_path)
    print(
        f"[tabwrite] First start with {filename}: converting it once into {target}\n"
        f"[tabwrite] This takes about a minute; later starts load from the cache in seconds.",
        file=sys.stderr,
        flush=True,
    )
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    print(f"[tabwrite] tokenizer read ({time.time() - started:.0f} s); dequantising weights...", file=sys.stderr, flush=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=dtype)
    # The weights are now plain tensors; drop the GGUF quantizer so the model can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(partial, target)  # atomic: a killed conversion never leaves a half cache
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)  # another process finished first
    print(f"[tabwrite] converted in {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    if not round_too:
        return
    # Once per model too, when no other model is serving: the body's int8 weights rounded by
    # GPTQ (models/rounding.py, ~13 s for Gemma), which the tuning may choose for decode steps,
    # made here so that the first start's choice does not also wait for them. Not beside a
    # model that serves: this is arithmetic on both cores, unlike the conversion, and as SmolLM2
    # loaded beside writers pressing Tab on Gemma, 2 of ~70 presses came back "busy" (at nice
    # 10 none did, but the rounding took 821 s for a model whose tuning then did not use it).
    # Elsewhere the tuning makes them itself, only where int8 would win (models/tuning.py).
    try:
        from models import rounding

        rounding.save(rounding.round_model(model.eval(), tokenizer), target.name)
    except Exception as e:  # noqa: BLE001 - made at the first start that needs them instead
        print(f"[tabwrite] int8 rounding left for later: {type(e).__name__}", file=sys.stderr, flush=True)
    # So is the model's read of the probe text in fp32, which every machine's choice of formats
    # checks them against (models/tuning.py: ~3 s of a first start's ~10 s choice).
    try:
        from models import tuning

        started = time.time()
        tuning.save_probe(tuning.read_probe(model.eval(), tokenizer), model, tuning.probe_path(_tuning_folder(), target.name))
        print(f"[tabwrite] read the probe text in fp32 for the choice of formats ({time.time() - started:.1f} s)", file=sys.stderr, flush=True)
    except Exception as e:  # noqa: BLE001 - read at the first choice instead
        print(f"[tabwrite] probe text left for later: {type(e).__name__}", file=sys.stderr, flush=True)


# The conversion runs in a process of its own. In this process it starved the presses on a
# model already loaded: reading the GGUF and its tokenizer is seconds of pure Python, and the
# thread serving Gemma's presses, which gives the GIL back at every torch op, waited for it
# again each time. SmolLM2 converted and tuned beside a writer pressing Tab on Gemma without a
# pause (2-core EPYC, 4 s budget): in this process one press took 7.0 s and the next was refused
# "busy" (the others 1.0-2.9 s; ~0.6 s alone); apart, the slowest took 2.3 s, and the load as
# long as before (31 s: 21 converting, 8 tuning). Not at a lower priority: at nice 5 the slowest
# press took 1.2 s but the load 75 s, and at nice 10 165 s, for whoever asked for the model.


def _convert_apart(gguf_path: str, target: Path, dtype: torch.dtype, round_too: bool = False) -> None:
    """``_convert_gguf`` in a child process (its progress lines go to this one's stderr); a
    RuntimeError with the child's one line if it fails (load_source words it for the user)."""
    import subprocess

    code = "import sys; from models.loading import _convert_main; sys.exit(_convert_main(sys.argv[1:]))"
    child = subprocess.Popen(
        [sys.executable, "-c", code, gguf_path, str(target), dtype_name(dtype), str(os.getpid()),
         "round" if round_too else "no-round"],
        cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE, text=True,
    )
    out, _ = child.communicate()
    if child.returncode != 0:
        lines = [line for line in (out or "").splitlines() if line.strip()]
        raise RuntimeError(lines[-1] if lines else f"the conversion of {Path(gguf_path).name} exited with {child.returncode}")


def _convert_main(argv: list[str]) -> int:
    """The child of ``_convert_apart``: GGUF path, target folder, dtype name, parent's pid, "round" or not."""
    gguf_path, target, dtype, parent, then = argv
    try:  # Linux: end with the app (a stopped app's conversion would run on alone)
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != int(parent):
            return 1
    except Exception:
        pass
    try:
        _convert_gguf(gguf_path, Path(target), getattr(torch, dtype), then == "round")
    except Exception as e:  # one line for the parent's ModelLoadError
        print((str(e).strip().splitlines() or [type(e).__name__])[0][:300], flush=True)
        return 1
    return 0


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (checked with one TCP connect).

    Without this, a hub id on an offline machine costs ~50 s of retries before failing.
    HF_HUB_OFFLINE=1 (set by the tests) skips the check and any network use.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_pretrained(location: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A hub id on a machine that cannot reach the hub: use the local HF cache only, and say so.
    local_only = not os.path.isdir(location) and not hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, local_files_only=local_only)
    except OSError as e:
        if local_only:
            raise ModelLoadError(
                f"'{location}' is not an embedded model or a local path, the Hugging Face hub is not reachable "
                f"from here, and it is not in the local hub cache"
            ) from e
        raise
    return model, tokenizer


def _drop_tokenizer_tables(tokenizer) -> None:
    """Drop the Python copies of the vocabulary and merges a fast tokenizer keeps after building
    its Rust backend, which holds its own. For Gemma's 262k-token BPE (515k merges) they were
    ~200 MB of the process's 1.5 GB; tokenizing, decoding and the ids are unchanged without
    them (checked here on a probe string, else they stay)."""
    probe = "Tab, 我们 naïve x=1\n"
    before = tokenizer(probe, add_special_tokens=False).input_ids
    text, pieces = tokenizer.decode(before), tokenizer.convert_ids_to_tokens(before)
    kept = {name: getattr(tokenizer, name) for name in ("_merges", "_vocab") if getattr(tokenizer, name, None) is not None}
    for name in kept:
        setattr(tokenizer, name, None)
    try:
        same = (tokenizer(probe, add_special_tokens=False).input_ids == before and tokenizer.decode(before) == text
                and tokenizer.convert_ids_to_tokens(before) == pieces and len(tokenizer) > 0)
    except Exception:  # noqa: BLE001 - this tokenizer needs them after all
        same = False
    if not same:
        for name, value in kept.items():
            setattr(tokenizer, name, value)


def load_source(source: ModelSource, device: torch.device | None = None) -> LoadedModel:
    device = device or pick_device()
    dtype = pick_dtype(device)
    try:
        if source.kind == "gguf":
            target = _gguf_cache_dir(source.location)
            if not (target / "config.json").is_file():
                _convert_apart(source.location, target, CONVERTED_DTYPE, round_too=not loaded_models())
            model, tokenizer = _load_pretrained(str(target), device, dtype)
            model_key, folder = target.name, str(target)
        else:
            model, tokenizer = _load_pretrained(source.location, device, dtype)
            folder = source.location
            model_key = f"{Path(source.location).name}-{hashlib.sha256(source.location.encode()).hexdigest()[:12]}"
    except (ModelNotFound, ModelLoadError):
        raise
    except Exception as e:  # hub errors, bad files, missing packages: one line for the user
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"cannot load model '{source.name}': {first_line}") from e
    if not getattr(model, "can_generate", lambda: True)():
        raise ModelLoadError(f"'{source.name}' is not a causal language model")
    _drop_tokenizer_tables(tokenizer)
    model.to(device).eval()
    from models.fastnorm import fuse_norms

    fuse_norms(model)
    weights, tuning, absmax = dtype_name(dtype), None, {}
    if device.type == "cpu":
        from models import rounding
        from models.tuning import named_linears, tune_or_load

        linears = named_linears(model)  # kept alive: ids stay theirs

        def round_body() -> dict:
            return rounding.by_layer(model, rounding.load_or_make(model, tokenizer, model_key))

        tuning = tune_or_load(model, tokenizer, _tuning_folder(), model_key, rounding=round_body)
        weights = tuning.describe()
        # By name, so a model with the same body (a learned style) is made the same way.
        absmax = {n: tuning.absmax[id(m)] for n, m in linears.items() if id(m) in tuning.absmax}
        del linears
    config = model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 1024
    return LoadedModel(source.name, model, tokenizer, device, dtype, int(context), weights, tuning, folder, absmax)


_loaded: OrderedDict[str, LoadedModel] = OrderedDict()
_cache_lock = threading.Lock()  # the dict above, held only for a lookup or an insert
_load_lock = threading.Lock()  # one model loads at a time (a conversion takes a core and ~1 GB)


def load(spec: str | None) -> LoadedModel:
    """Resolve and load a model, reusing one already loaded in this process.

    A model already loaded is returned without waiting for another one that is loading: a
    Tab press on the default model must not stall while a second model converts.
    """
    source = resolve(spec)
    key = f"{source.kind}:{source.location}"
    with _cache_lock:
        if key in _loaded:
            _loaded.move_to_end(key)
            return _loaded[key]
    with _load_lock:
        with _cache_lock:
            if key in _loaded:  # loaded by another caller while this one waited
                return _loaded[key]
        model = load_source(source)
        with _cache_lock:
            _loaded[key] = model
            while len(_loaded) > KEEP_IN_MEMORY:
                _loaded.popitem(last=False)
        return model


def is_loaded(model: LoadedModel) -> bool:
    with _cache_lock:
        return any(m is model for m in _loaded.values())


def loaded_models() -> list[LoadedModel]:
    with _cache_lock:
        return list(_loaded.values())
