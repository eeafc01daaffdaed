"""Checkpoint loading: file formats, key checking, restricted unpickling, Hub and corrupt-file errors."""

import collections
import io
import os
import pickle
import types
import zipfile

import huggingface_hub
import numpy as np
import pytest
import torch
from encoders_testutil import TOL, max_err, random_audio, tiny_wav2vec2, tiny_whisper
from huggingface_hub import errors as hub_errors
from safetensors.numpy import load_file, save_file

from encoders import loading, wav2vec2, whisper


@pytest.fixture(scope="module")
def xlsr(tmp_path_factory):
    path = tmp_path_factory.mktemp("xlsr")
    return path, tiny_wav2vec2(path, "xlsr")


def check(path, ref):
    audio = random_audio()
    with torch.no_grad():
        expected = ref.wav2vec2(torch.from_numpy(audio)).last_hidden_state
    assert max_err(wav2vec2.Wav2Vec2Encoder.from_pretrained(str(path))(audio), expected) < TOL


def test_pytorch_bin_without_torch_unpickling(xlsr, tmp_path):
    path, ref = xlsr
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    tensors = loading.load_torch_bin(str(tmp_path / "pytorch_model.bin"))
    assert set(tensors) == set(ref.state_dict())
    check(tmp_path, ref)


def test_sharded_safetensors_and_legacy_weight_norm(xlsr, tmp_path):
    path, ref = xlsr
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    check(tmp_path, ref)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((path / "config.json").read_text())
    tensors = {k.replace("parametrizations.weight.original0", "weight_g")
                .replace("parametrizations.weight.original1", "weight_v"): v
               for k, v in load_file(str(path / "model.safetensors")).items()}
    save_file(tensors, str(legacy / "model.safetensors"))
    check(legacy, ref)


def test_missing_and_unexpected_keys_are_listed(xlsr, tmp_path):
    path, _ = xlsr
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    tensors = load_file(str(path / "model.safetensors"))
    tensors.pop("wav2vec2.encoder.layers.1.attention.q_proj.bias")
    tensors["wav2vec2.encoder.layers.0.attention.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        wav2vec2.Wav2Vec2Encoder.from_pretrained(str(tmp_path))
    assert "encoder.layers.1.attention.q_proj.bias" in str(e.value)
    assert "encoder.layers.0.attention.extra.weight" in str(e.value)


def test_restricted_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    path = tmp_path / "evil.bin"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        loading.load_torch_bin(str(path))


def test_offline_error_names_repo_and_local_dir(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="openai/whisper-small") as e:
        whisper.WhisperEncoder.from_pretrained("openai/whisper-small")
    assert "local directory" in str(e.value)


def test_wrong_family_is_reported(tmp_path):
    tiny_whisper(tmp_path)
    with pytest.raises(ValueError, match="feature_projection.projection.weight"):
        wav2vec2.Wav2Vec2Encoder.from_pretrained(str(tmp_path))


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def test_bin_views_of_shared_storages_load_as_torch_does(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    row = torch.arange(5, dtype=torch.float32)
    state = {"base": base, "offset_strided": base[1:, ::2], "transposed": base.t(), "row": base[2],
             "column": base[:, 3], "scalar": base[1, 1], "empty": base[4:], "broadcast": row.expand(3, 5),
             "bf16": torch.linspace(-2, 2, 12).to(torch.bfloat16).reshape(3, 4)[:, 1:],
             "f16": torch.linspace(-1, 1, 10).half()[3:], "long": torch.arange(-5, 5)[::3],
             "bool": (torch.arange(8) % 3 == 0)[2:]}
    path = tmp_path / "views.bin"
    torch.save(state, path)
    with zipfile.ZipFile(path) as z:  # the views really share storages: one record per base tensor
        assert len([n for n in z.namelist() if "/data/" in n and not n.endswith("serialization_id")]) == 6
    expected = torch.load(path, weights_only=True)
    got = loading.load_torch_bin(str(path))
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        np.testing.assert_array_equal(got[name].astype(np.float32) if name == "bf16" else got[name],
                                      to_numpy(tensor), err_msg=name)
        assert got[name].shape == tuple(tensor.shape), name


class _Storage:
    def __init__(self, numel):
        self.numel = numel


class _View:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        return ("storage", torch.FloatStorage, "0", "cpu", obj.numel) if isinstance(obj, _Storage) else None


def crafted_bin(path, template, view, data: bytes, numel=None):
    """torch.save's archive `template` with data.pkl replaced by {"w": view} over one float32 storage `data`.

    `view` is (storage_offset, sizes, strides); `numel` is the storage size the pickle declares.
    """
    buf = io.BytesIO()
    storage = _Storage(len(data) // 4 if numel is None else numel)
    _Pickler(buf, protocol=2).dump(collections.OrderedDict(w=_View(storage, *view)))
    with zipfile.ZipFile(template) as src, zipfile.ZipFile(path, "w") as dst:
        root = next(n for n in src.namelist() if n.endswith("/data.pkl")).rsplit("/", 1)[0]
        for name in src.namelist():
            if not name.startswith(f"{root}/data/"):
                dst.writestr(name, buf.getvalue() if name.endswith("/data.pkl") else src.read(name))
        dst.writestr(f"{root}/data/0", data)
    return path


STORAGE = np.arange(12, dtype=np.float32)  # 12 elements
OUT_OF_BOUNDS = {  # (offset, sizes, strides), storage bytes, declared numel
    "offset_past_end": ((10, (3,), (1,)), STORAGE.tobytes(), None),
    "stride_past_end": ((0, (3, 4), (4, 100)), STORAGE.tobytes(), None),
    "size_past_end": ((0, (100,), (1,)), STORAGE.tobytes(), None),
    "last_element_plus_one": ((1, (3, 4), (4, 1)), STORAGE.tobytes(), None),
    "negative_offset": ((-1, (3,), (1,)), STORAGE.tobytes(), None),
    "negative_stride": ((11, (3,), (-1,)), STORAGE.tobytes(), None),
    "negative_size": ((0, (-3,), (1,)), STORAGE.tobytes(), None),
    "stride_overflow": ((0, (2,), (2 ** 62,)), STORAGE.tobytes(), None),
    "size_stride_rank_mismatch": ((0, (3, 4), (4,)), STORAGE.tobytes(), None),
    "record_shorter_than_declared": ((0, (3,), (1,)), STORAGE.tobytes(), 20),
    "record_longer_than_declared": ((0, (3,), (1,)), STORAGE.tobytes(), 5),
    "record_not_whole_elements": ((0, (3,), (1,)), STORAGE.tobytes()[:-1], 11),
}
IN_BOUNDS = {
    "whole_storage": (0, (3, 4), (4, 1)),
    "ends_on_last_element": (2, (2, 3), (1, 4)),  # reaches 2 + 1 + 8 = 11
    "overlapping_rows": (3, (4, 3), (2, 1)),
    "empty_view_past_end": (100, (0, 5), (5, 1)),  # reads nothing, so torch accepts any offset
}


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "t.bin"
    torch.save({"w": torch.zeros(2)}, path)
    return path


@pytest.mark.parametrize("case", sorted(OUT_OF_BOUNDS))
def test_bin_views_outside_their_storage_are_refused(case, template, tmp_path):
    view, data, numel = OUT_OF_BOUNDS[case]
    path = crafted_bin(tmp_path / f"{case}.bin", template, view, data, numel)
    with pytest.raises(RuntimeError):  # the reference: torch refuses the same file
        torch.load(path, weights_only=True)
    with pytest.raises(loading.CorruptCheckpointError, match="corrupt .*or untrusted") as e:
        loading.load_torch_bin(str(path))
    assert isinstance(e.value, ValueError) and str(path) in str(e.value)
    assert "'w'" in str(e.value) or "storage record" in str(e.value)


@pytest.mark.parametrize("case", sorted(IN_BOUNDS))
def test_bin_views_inside_their_storage_load_as_torch_does(case, template, tmp_path):
    path = crafted_bin(tmp_path / f"{case}.bin", template, IN_BOUNDS[case], STORAGE.tobytes())
    expected = torch.load(path, weights_only=True)["w"].numpy()
    got = loading.load_torch_bin(str(path))["w"]
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_corrupt_local_files_are_reported_as_corrupt(xlsr, tmp_path):
    path, ref = xlsr
    torch.save(ref.state_dict(), tmp_path / "full.bin")
    files = {"model.safetensors": (path / "model.safetensors").read_bytes(),
             "pytorch_model.bin": (tmp_path / "full.bin").read_bytes()}
    for name, data in files.items():
        bad = tmp_path / name
        bad.write_bytes(data[: len(data) // 2])  # a truncated download
        with pytest.raises(Exception):  # the reference libraries refuse the same file
            load_file(str(bad)) if name.endswith(".safetensors") else torch.load(bad, weights_only=True)
        with pytest.raises(loading.CorruptCheckpointError, match="corrupt.*download the model again"):
            loading.load_tensor_file(str(bad))
    (tmp_path / "config.json").write_text('{"model_type": "wav2vec2", ')
    with pytest.raises(loading.CorruptCheckpointError, match="config.json: is not valid JSON"):
        loading.load_config(str(tmp_path))


def _response(status):
    return types.SimpleNamespace(status_code=status, headers={}, request=None)


HUB_FAILURES = {  # raised by huggingface_hub -> (our error, words of the problem and of the fix)
    "no_network": (hub_errors.LocalEntryNotFoundError("Please check your connection"), loading.HubUnavailableError,
                   ("unreachable", "check the network", "hf download org/model --local-dir")),
    "offline_mode": (hub_errors.OfflineModeIsEnabled("offline"), loading.HubUnavailableError,
                     ("unreachable", "hf download org/model --local-dir")),
    "connection_reset": (ConnectionResetError("reset"), loading.HubUnavailableError, ("unreachable",)),
    "missing_repo": (hub_errors.RepositoryNotFoundError("404", response=_response(404)), loading.RepoAccessError,
                     ("neither a local directory nor a Hub repository", "check the path", "hf auth login")),
    "gated": (hub_errors.GatedRepoError("gated", response=_response(403)), loading.RepoAccessError,
              ("gated", "https://huggingface.co/org/model", "hf auth login")),
    "unauthorized": (hub_errors.HfHubHTTPError("401", response=_response(401)), loading.RepoAccessError,
                     ("refused access", "HTTP 401", "HF_TOKEN")),
    "server_error": (hub_errors.HfHubHTTPError("503", response=_response(503)), loading.HubUnavailableError,
                     ("HTTP 503", "retry later")),
    "invalid_id": (hub_errors.HFValidationError("Repo id must be in the form"), loading.RepoAccessError,
                   ("nor a valid Hub repo id", "check the path")),
}


def _raising(error):
    calls = []

    def download(*args, **kwargs):
        calls.append(args)
        raise error

    return download, calls


@pytest.mark.parametrize("case", sorted(HUB_FAILURES))
def test_hub_failures_are_reported_by_cause(case, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    raised, expected, words = HUB_FAILURES[case]
    for attr, load in (("snapshot_download", lambda: loading.resolve_model_dir("org/model")),
                       ("hf_hub_download", lambda: loading.resolve_file("org/model", "vocab.json"))):
        download, calls = _raising(raised)
        monkeypatch.setattr(huggingface_hub, attr, download)
        with pytest.raises(expected) as e:
            load()
        assert calls and e.value.__cause__ is raised and not isinstance(e.value, FileNotFoundError)
        assert "org/model" in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_hf_hub_offline_is_reported_without_calling_the_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for attr, load in (("snapshot_download", lambda: loading.resolve_model_dir("org/model")),
                       ("hf_hub_download", lambda: loading.resolve_file("org/model", "vocab.json"))):
        download, calls = _raising(AssertionError("the Hub was called"))
        monkeypatch.setattr(huggingface_hub, attr, download)
        with pytest.raises(loading.HubUnavailableError, match="HF_HUB_OFFLINE is set.*Fix: unset HF_HUB_OFFLINE"):
            load()
        assert not calls


def test_file_missing_from_a_hub_repo_is_file_not_found(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    missing = hub_errors.RemoteEntryNotFoundError("404 entry", response=_response(404))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _raising(missing)[0])
    with pytest.raises(FileNotFoundError, match="adapter.fra.safetensors not found in the Hub repo"):
        loading.resolve_file("org/model", "adapter.fra.safetensors")


def test_unexpected_errors_in_a_download_propagate(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    bug = TypeError("snapshot_download() got an unexpected keyword argument")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _raising(bug)[0])
    with pytest.raises(TypeError) as e:
        loading.resolve_model_dir("org/model")
    assert e.value is bug
