"""ASRModel end to end on espeak-ng speech with a CLD head (random-weight encoder), and bad input.

The head is trained on transformers' encoder states, and the expected languages and transcripts come from
transformers (the head on transformers' states, then `generate` in those languages)."""

import dataclasses

import numpy as np
import pytest
import torch
import transformers
from asr_testutil import tiny_whisper_asr

from asr import ASRModel
from asr.whisper_pipeline import WhisperASR, merge_overlap, split_windows
from encoders import input_pipeline
from encoders.audio import log_mel_spectrogram, pad_or_trim
from experiments.lib.cld import EMBEDDED_CORPUS
from heads import ConvexReLUHead, LinearHead

LANGS = ["en", "hi", "zh"]
GREEDY = dict(temperatures=(0.0,), repetition_penalty=1.0, compression_ratio_threshold=None, logprob_threshold=None)


def torch_embeddings(ref, clips) -> np.ndarray:
    """Mean over all 1500 frames of transformers' encoder states (the 'mean' pooling), float64."""
    mel = torch.from_numpy(log_mel_spectrogram(np.stack([pad_or_trim(c) for c in clips])))
    with torch.no_grad():
        return ref.model.encoder(mel).last_hidden_state.numpy().astype(np.float64).mean(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("whisper_pipe"))
    ref = tiny_whisper_asr(path)
    model = ASRModel.from_pretrained(path, languages=LANGS)
    model.config = dataclasses.replace(model.config, max_new_tokens=8, batch_size=4)
    ds = input_pipeline.load_manifest(EMBEDDED_CORPUS, languages=LANGS, on_unknown_language="drop")
    train = [e for e in ds.examples if e.split == "train"][::8]
    test = [e for e in ds.examples if e.split == "test"][::6][:6]
    emb = torch_embeddings(ref, [input_pipeline.read_audio(e) for e in train])
    head = LinearHead.fit(emb, [e.lang for e in train], LANGS, encoder=path)
    return path, model, head, [input_pipeline.read_audio(e) for e in test], ref


def test_predict_routes_by_head(setup):
    path, model, head, clips, ref = setup
    assert isinstance(model, WhisperASR)
    greedy = ASRModel.from_pretrained(path, languages=LANGS)
    greedy.config = dataclasses.replace(greedy.config, max_new_tokens=8, batch_size=4, **GREEDY)
    greedy.set_lang_detect_head(head)
    expected = head.predict_languages(torch_embeddings(ref, clips))
    assert len(set(expected)) > 1, "the clips should not all get one language"
    with torch.no_grad():
        seqs = ref.generate(torch.from_numpy(log_mel_spectrogram(np.stack([pad_or_trim(c) for c in clips]))),
                            language=list(expected), task="transcribe", return_timestamps=False, num_beams=1,
                            do_sample=False, repetition_penalty=1.0, max_new_tokens=8)
    tokenizer = transformers.WhisperTokenizer.from_pretrained(path)
    langs, texts = greedy.predict(clips)
    assert langs == list(expected)
    assert texts == [tokenizer.decode(row, skip_special_tokens=True).strip() for row in seqs.tolist()]
    one_lang, one_text = greedy.predict(clips[0])
    assert one_lang == [expected[0]] and one_text == texts[:1]


def test_head_of_another_encoder_or_pooling(setup):
    path, model, head, _, _ = setup
    x = np.random.default_rng(0).standard_normal((12, 32))
    other = LinearHead.fit(x, ["en", "zh"] * 6, ["en", "zh"], encoder="openai/whisper-small")
    with pytest.warns(UserWarning, match="trained on embeddings of 'openai/whisper-small'"):
        model.set_lang_detect_head(other)
    attentive = LinearHead.fit(x, ["en", "zh"] * 6, ["en", "zh"], pooling="attentive")
    with pytest.raises(ValueError, match="trained on 'attentive' embeddings"):
        model.set_lang_detect_head(attentive)


def test_short_silent_and_long_clips(setup):
    _, model, head, clips, _ = setup
    model.set_lang_detect_head(head)
    long_clip = np.concatenate([clips[0]] * int(np.ceil(40 * 16000 / len(clips[0]))))[: 40 * 16000]
    assert len(split_windows(long_clip, 30, 5)) == 2
    langs, texts = model.predict([np.zeros(160, np.float32), np.zeros(16000, np.float32), long_clip])
    assert len(langs) == len(texts) == 3 and set(langs) <= set(LANGS)


def test_vanilla_detection_restricted_to_languages(setup):
    path, _, _, clips, _ = setup
    model = ASRModel.from_pretrained(path, languages=["en", "zh"])
    model.config = dataclasses.replace(model.config, max_new_tokens=4, batch_size=4, temperatures=(0.0,))
    langs, texts = model.predict(clips[:3])
    assert set(langs) <= {"en", "zh"} and len(texts) == 3


def test_bad_input_and_bad_heads(setup):
    path, model, head, clips, _ = setup
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
