"""CLD embedding refuses clips its encoder cannot embed (over Whisper's 30 s window, under one wav2vec2 frame)
with their ids and lengths, before any encoding work."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
import transformers
from asr_testutil import tiny_whisper_asr
from encoders_testutil import tiny_wav2vec2

from encoders import extraction, input_pipeline
from experiments.lib import cld


def manifest(tmp_path, samples: dict[str, int]) -> input_pipeline.Dataset:
    """16 kHz noise clips of the given lengths, loaded through a manifest (the loader records their lengths)."""
    rows = []
    for i, (clip_id, n) in enumerate(samples.items()):
        sf.write(tmp_path / f"{clip_id}.wav", np.random.default_rng(i).uniform(-0.5, 0.5, n), 16000)
        rows.append({"id": clip_id, "audio": f"{clip_id}.wav", "lang": "en"})
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return input_pipeline.load_manifest(str(tmp_path / "manifest.jsonl"))


@pytest.fixture
def no_encoding(monkeypatch):
    """Fails the test if any batch is built for the encoder."""
    def refuse(*args, **kwargs):
        raise AssertionError("encoding started before the clip lengths were checked")

    monkeypatch.setattr(extraction, "encoder_batches", refuse)


@pytest.mark.parametrize("pretrained", [True, False], ids=["extract_whisper", "extract"])
def test_whisper_clips_over_30_s_refused_up_front(tmp_path, no_encoding, pretrained):
    """A multilingual checkpoint goes through `extract_whisper`, a random Whisper through `extract`."""
    if pretrained:
        tiny_whisper_asr(tmp_path / "ckpt")
    spec = str(tmp_path / "ckpt") if pretrained else "random:whisper-tiny"
    ds = manifest(tmp_path, {"ok": 16000 * 2, "long": 16000 * 31 + 8000, "longer": 16000 * 45})
    with pytest.raises(ValueError) as err:
        cld.embed_dataset({"encoder": spec, "batch_size": 2}, ds.examples, str(tmp_path / "cache"), None)
    message = str(err.value)
    for clip_id in ("long", "longer"):
        assert f"'{clip_id}' ({sf.info(tmp_path / f'{clip_id}.wav').duration:.2f} s)" in message
    assert "'ok'" not in message and "2 clip(s) longer than Whisper's 30" in message and "trim or split" in message


def test_wav2vec2_clips_under_one_frame_refused_up_front(tmp_path, no_encoding):
    tiny_wav2vec2(tmp_path / "ckpt", "xlsr")
    ref = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config.from_pretrained(tmp_path / "ckpt"))
    need = int(torch.nonzero(ref._get_feat_extract_output_lengths(torch.arange(1, 2000)) >= 1)[0]) + 1
    ds = manifest(tmp_path, {"ok": 8000, "tiny": need - 1, "edge": need})
    with pytest.raises(ValueError) as err:
        cld.embed_dataset({"encoder": str(tmp_path / "ckpt"), "batch_size": 2}, ds.examples, str(tmp_path / "cache"),
                          None)
    message = str(err.value)
    assert f"1 clip(s) shorter than the {need} samples" in message and f"clip 'tiny' ({need - 1} samples);" in message
    assert "'edge'" not in message and f"at least {need} samples, or drop it" in message
