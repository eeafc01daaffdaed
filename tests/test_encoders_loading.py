"""Checkpoint loading: file formats, key checking, restricted unpickling, offline errors."""

import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from encoders_testutil import TOL, max_err, random_audio, tiny_wav2vec2, tiny_whisper
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
