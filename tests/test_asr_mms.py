"""MMS CTC pipeline against transformers' Wav2Vec2ForCTC after load_adapter."""

import json

import numpy as np
import pytest
import torch
import transformers
from encoders_testutil import random_audio, tiny_wav2vec2
from flax import nnx
from transformers.pipelines.automatic_speech_recognition import chunk_iter

from asr import ASRModel
from asr.mms import MMSASR, _ctc_argmax
from encoders import layers
from encoders.audio import normalize
from heads import ConvexReLUHead, LinearHead

LETTERS = "abcdefg"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mms_ctc"))
    tiny_wav2vec2(path, "mms", languages=("eng", "fra"))
    base = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4}
    vocab = {lang: {**base, **{c: 5 + i for i, c in enumerate(LETTERS)}} for lang in ("eng", "fra")}
    vocab["fra"] = {**base, **{c.upper(): 5 + i for i, c in enumerate(LETTERS)}}  # distinguishable outputs
    with open(f"{path}/vocab.json", "w") as f:
        json.dump(vocab, f)
    return path


def without_specials(text: str) -> str:
    """A transformers CTC transcript (blank-aware collapse) without the special-token strings, spaces joined."""
    for special in ("<s>", "</s>", "<unk>"):
        text = text.replace(special, "")
    return " ".join(text.split())


def reference(path, lang3, audio):
    model = transformers.Wav2Vec2ForCTC.from_pretrained(path).eval()
    if lang3 is not None:
        model.load_adapter(lang3)
    tok = transformers.Wav2Vec2CTCTokenizer(f"{path}/vocab.json", target_lang=lang3)
    with torch.no_grad():
        logits = model(torch.from_numpy(normalize(audio))).logits
    return logits.numpy(), [without_specials(t) for t in tok.batch_decode(logits.argmax(-1))]


@pytest.mark.parametrize("lang", ["en", "fr"])
def test_logits_and_strings_match_transformers(checkpoint, lang):
    model = ASRModel.from_pretrained(checkpoint, languages=[lang])
    assert isinstance(model, MMSASR)
    audio = random_audio(batch=2, samples=16000, seed=3)
    ref_logits, ref_text = reference(checkpoint, {"en": "eng", "fr": "fra"}[lang], audio)
    ours = np.stack(model.logits(list(audio), lang))
    err = float(np.abs(ours - ref_logits).max())
    print(f"mms {lang} logits max abs error {err:.2e}; texts {ref_text}")
    assert err < 1e-4
    langs, texts = model.predict(list(audio))
    assert langs == [lang, lang] and texts == ref_text and any(texts)


def test_mixed_batch_grouped_by_head_language(checkpoint):
    model = ASRModel.from_pretrained(checkpoint)
    audio = list(random_audio(batch=4, samples=16000, seed=5))
    head = ConvexReLUHead.fit(np.random.default_rng(0).standard_normal((20, 32)), ["en", "fr"] * 10, ["en", "fr"],
                              pooling="masked_mean")
    model.set_lang_detect_head(head)
    langs, texts = model.predict(audio)
    for lang in set(langs):
        _, expected = reference(checkpoint, {"en": "eng", "fr": "fra"}[lang], np.stack(audio)[[l == lang for l in langs]])
        assert [t for t, l in zip(texts, langs) if l == lang] == expected
    again = model.predict(audio)  # swapping back and forth reuses the compiled encoder
    assert again == (langs, texts)


def test_mms_errors(checkpoint):
    model = ASRModel.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="no language detection"):
        model.predict(random_audio(1, 4000)[0])
    with pytest.raises(ValueError, match="cannot be decoded"):
        ASRModel.from_pretrained(checkpoint, languages=["hi"])
    bad = ConvexReLUHead.fit(np.random.default_rng(0).standard_normal((12, 8)), ["en", "fr"] * 6, ["en", "fr"])
    with pytest.raises(ValueError, match="embedding dim"):
        model.set_lang_detect_head(bad)
    x = np.random.default_rng(0).standard_normal((12, 32))
    with pytest.raises(ValueError, match="trained on 'attentive' embeddings"):
        model.set_lang_detect_head(LinearHead.fit(x, ["en", "fr"] * 6, ["en", "fr"], pooling="attentive"))
    with pytest.warns(UserWarning, match="trained on unpadded clips"):  # 'mean' over padded frames would differ
        model.set_lang_detect_head(LinearHead.fit(x, ["en", "fr"] * 6, ["en", "fr"], pooling="mean"))
    with pytest.warns(UserWarning, match="trained on embeddings of 'facebook/mms-1b-all'"):
        model.set_lang_detect_head(LinearHead.fit(x, ["en", "fr"] * 6, ["en", "fr"], pooling="masked_mean",
                                                  encoder="facebook/mms-1b-all"))


CHUNK, CONTEXT = 0.25, 0.05  # seconds: 4000-sample windows, 800 samples of context (tiny model: 20 samples a frame)


def feature_extractor():
    return transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                                 do_normalize=True, return_attention_mask=True)


def pipeline_windows(clip, ratio):
    """transformers' ASR-pipeline windows of `clip` for chunk_length_s=CHUNK, stride_length_s=CONTEXT, with the
    pipeline's sizes (multiples of `ratio`, the model's samples per logit)."""
    size, side = (int(round(s * 16000 / ratio) * ratio) for s in (CHUNK, CONTEXT))
    return chunk_iter(clip, feature_extractor(), size, side, side)


def chunked_reference(model, clip, output):
    """transformers' chunked CTC on one clip: each pipeline window's `output` ("logits", or "hidden": the
    backbone's last state) cut to the frames the pipeline keeps, joined."""
    ratio = model.config.inputs_to_logits_ratio
    parts = []
    for item in pipeline_windows(clip, ratio):
        inputs = dict(input_values=item["input_values"], attention_mask=item["attention_mask"])
        with torch.no_grad():
            values = model(**inputs).logits[0] if output == "logits" else model.wav2vec2(**inputs).last_hidden_state[0]
        n, left, right = (int(round(x / ratio)) for x in item["stride"])  # the pipeline's rescale_stride
        parts.append(values.numpy()[left:n - right])
    return np.concatenate(parts), len(parts)


def test_long_clip_windows_match_transformers_chunked_pipeline(checkpoint):
    """A clip of four windows: joined logits equal transformers' on the pipeline's windows and kept frames, the
    transcript equals transformers' chunked ASR pipeline, and the pooled embedding is the mean of the kept frames."""
    model = MMSASR.from_pretrained(checkpoint, chunk_seconds=CHUNK, context_seconds=CONTEXT, batch_size=3)
    clip = random_audio(1, 10000, seed=7)[0]
    ref = transformers.Wav2Vec2ForCTC.from_pretrained(checkpoint).eval()
    expected_hidden, _ = chunked_reference(ref, clip, "hidden")  # the checkpoint's own adapter
    ref.load_adapter("fra")
    expected, windows = chunked_reference(ref, clip, "logits")
    assert windows == 4
    ours = model.logits([clip], "fr")[0]
    assert ours.shape[0] == int(ref._get_feat_extract_output_lengths(torch.tensor(len(clip))))  # frames tile the clip
    err = float(np.abs(ours - expected).max())
    print(f"chunked logits max abs error {err:.2e} over {ours.shape[0]} frames")
    assert err < 1e-4
    pipe = transformers.pipeline("automatic-speech-recognition", model=ref, feature_extractor=feature_extractor(),
                                 tokenizer=transformers.Wav2Vec2CTCTokenizer(f"{checkpoint}/vocab.json",
                                                                             target_lang="fra"),
                                 chunk_length_s=CHUNK, stride_length_s=CONTEXT)
    text = model.transcribe([clip], "fr")[0]
    assert text == without_specials(pipe(clip.copy())["text"]) and text
    np.testing.assert_allclose(model.pooled([clip])[0], expected_hidden.mean(0), atol=1e-4)


def test_length_buckets_bound_compilations(checkpoint):
    """16 clip lengths (some chunked) compile the encoder and the CTC head once per length bucket (the window and
    its 4 halves) that their windows fall in; unchunked clips, padded to a bucket, still equal transformers."""
    model = MMSASR.from_pretrained(checkpoint, chunk_seconds=CHUNK, context_seconds=CONTEXT, batch_size=3)
    ratio = transformers.Wav2Vec2Config.from_pretrained(checkpoint).inputs_to_logits_ratio
    forward = layers._compiled_forward(nnx.graphdef(model.encoder), None)
    forward.clear_cache()
    _ctc_argmax.clear_cache()
    lengths = np.linspace(40, 12000, 16).astype(int)
    clips = [random_audio(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    logits = model.logits(clips, "en")
    compiled = forward._cache_size(), _ctc_argmax._cache_size()
    window = int(round(CHUNK * 16000 / ratio) * ratio)
    buckets = [-(-window // 2**k) for k in range(5)]
    window_lengths = {len(item["input_values"][0]) for c in clips for item in pipeline_windows(c, ratio)}
    hit = {min(b for b in buckets if b >= n) for n in window_lengths}
    print(f"{len(set(lengths))} clip lengths, {len(window_lengths)} window lengths -> buckets {sorted(hit)}, "
          f"compilations {compiled}")
    assert len(window_lengths) > len(buckets) and compiled == (len(hit), len(hit))
    for clip, ours in zip(clips, logits):
        if len(clip) <= window:
            expected, _ = reference(checkpoint, "eng", clip[None])
            assert float(np.abs(ours - expected[0]).max()) < 1e-4


def test_clip_under_one_frame_raises(checkpoint):
    model = ASRModel.from_pretrained(checkpoint, languages=["en"])
    ref = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config.from_pretrained(checkpoint))
    frames = ref._get_feat_extract_output_lengths(torch.arange(1, 200))
    need = int(torch.nonzero(frames >= 1)[0]) + 1  # fewest samples giving one frame
    audio = random_audio(1, need, seed=1)[0]
    assert model.predict([audio, audio])[0] == ["en", "en"]
    with pytest.raises(ValueError, match=rf"clip 1 \({need - 1} samples\).*at least {need} samples, or drop it"):
        model.predict([audio, audio[:-1]])


def test_missing_vocabulary_raises_instead_of_falling_back(checkpoint, tmp_path):
    """A flat vocab.json decodes the checkpoint's own lm_head (as transformers), but never an adapter's language;
    a nested one has no vocabulary for language None."""
    flat = str(tmp_path / "flat")
    tiny_wav2vec2(flat, "mms", languages=("eng", "fra"))
    with open(f"{checkpoint}/vocab.json") as f, open(f"{flat}/vocab.json", "w") as out:
        json.dump(json.load(f)["eng"], out)
    model = MMSASR.from_pretrained(flat)
    audio = random_audio(batch=1, samples=16000, seed=3)
    _, expected = reference(flat, None, audio)
    assert model.transcribe(list(audio), None) == expected
    with pytest.raises(ValueError, match=r"\['fr'\] cannot be decoded.*vocab.json has no vocabulary"):
        model.transcribe(list(audio), "fr")
    with pytest.raises(ValueError, match="nested by language"):
        MMSASR.from_pretrained(checkpoint).transcribe(list(audio), None)
