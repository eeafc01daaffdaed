"""ASRModel end to end on espeak-ng speech with a CLD head (random-weight encoder), and bad input."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from asr_testutil import tiny_whisper_asr

from asr import ASRModel
from asr.whisper_pipeline import WhisperASR, merge_overlap, split_windows
from encoders.pooling import mean_pool
from experiments import cld_data
from heads import ConvexReLUHead

pytest.importorskip("whisper")
LANGS = ["en", "hi", "zh"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("whisper_pipe"))
    tiny_whisper_asr(path)
    model = ASRModel.from_pretrained(path, languages=LANGS)
    model.config = dataclasses.replace(model.config, max_new_tokens=8, batch_size=4)
    ds = cld_data.load_manifest(cld_data.DEFAULT_CORPUS, languages=LANGS, on_unknown_language="drop")
    train = [e for e in ds.examples if e.split == "train"][::8]
    test = [e for e in ds.examples if e.split == "test"][::6][:6]
    audio = [cld_data.read_audio(e) for e in train]
    emb = np.asarray(mean_pool(jnp.asarray(model._encode(audio))))
    head = ConvexReLUHead.fit(emb, [e.lang for e in train], LANGS)
    return path, model, head, [cld_data.read_audio(e) for e in test]


def test_predict_routes_by_head(setup):
    path, model, head, clips = setup
    assert isinstance(model, WhisperASR)
    model.set_lang_detect_head(head)
    langs, texts = model.predict(clips)
    expected = head.predict_languages(np.asarray(mean_pool(jnp.asarray(model._encode(clips)))))
    assert langs == list(expected) and len(texts) == len(clips) and all(isinstance(t, str) for t in texts)
    one_lang, one_text = model.predict(clips[0])
    assert one_lang == [expected[0]] and len(one_text) == 1


def test_short_silent_and_long_clips(setup):
    _, model, head, clips = setup
    model.set_lang_detect_head(head)
    long_clip = np.concatenate([clips[0]] * int(np.ceil(40 * 16000 / len(clips[0]))))[: 40 * 16000]
    assert len(split_windows(long_clip, 30, 5)) == 2
    langs, texts = model.predict([np.zeros(160, np.float32), np.zeros(16000, np.float32), long_clip])
    assert len(langs) == len(texts) == 3 and set(langs) <= set(LANGS)


def test_vanilla_detection_restricted_to_languages(setup):
    path, _, _, clips = setup
    model = ASRModel.from_pretrained(path, languages=["en", "zh"])
    model.config = dataclasses.replace(model.config, max_new_tokens=4, batch_size=4, temperatures=(0.0,))
    langs, texts = model.predict(clips[:3])
    assert set(langs) <= {"en", "zh"} and len(texts) == 3


def test_bad_input_and_bad_heads(setup):
    path, model, head, clips = setup
    with pytest.raises(ValueError, match="empty"):
        model.predict(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        model.predict(np.full(1000, np.nan, np.float32))
    with pytest.raises(ValueError, match="16000 Hz"):
        model.predict(clips[0], sampling_rate=8000)
    bad_dim = ConvexReLUHead.fit(np.random.default_rng(0).standard_normal((12, 8)), ["en", "zh"] * 6, ["en", "zh"])
    with pytest.raises(ValueError, match="embedding dim"):
        model.set_lang_detect_head(bad_dim)
    igbo = ConvexReLUHead.fit(np.random.default_rng(0).standard_normal((12, 32)), ["en", "ig"] * 6, ["en", "ig"])
    with pytest.raises(ValueError, match="cannot be decoded"):
        model.set_lang_detect_head(igbo)
    with pytest.raises(ValueError, match="cannot be decoded"):
        ASRModel.from_pretrained(path, languages=["en", "ig"])


def test_merge_overlap():
    assert merge_overlap([1, 2, 3, 4], [3, 4, 5]) == [1, 2, 3, 4, 5]
    assert merge_overlap([1, 2], [7, 8]) == [1, 2, 7, 8]
