"""MMS CTC pipeline against transformers' Wav2Vec2ForCTC after load_adapter."""

import json

import numpy as np
import pytest
import torch
import transformers
from encoders_testutil import random_audio, tiny_wav2vec2

from asr import ASRModel
from asr.mms import MMSASR
from encoders.audio import normalize
from heads import ConvexReLUHead

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


def reference(path, lang3, audio):
    model = transformers.Wav2Vec2ForCTC.from_pretrained(path).eval()
    model.load_adapter(lang3)
    tok = transformers.Wav2Vec2CTCTokenizer(f"{path}/vocab.json", target_lang=lang3)
    with torch.no_grad():
        logits = model(torch.from_numpy(normalize(audio))).logits
    texts = tok.batch_decode(logits.argmax(-1))  # blank-aware CTC collapse; special-token strings removed below
    for special in ("<s>", "</s>", "<unk>"):
        texts = [t.replace(special, "") for t in texts]
    return logits.numpy(), [" ".join(t.split()) for t in texts]


@pytest.mark.parametrize("lang", ["en", "fr"])
def test_logits_and_strings_match_transformers(checkpoint, lang):
    model = ASRModel.from_pretrained(checkpoint, languages=[lang])
    assert isinstance(model, MMSASR)
    audio = random_audio(batch=2, samples=16000, seed=3)
    ref_logits, ref_text = reference(checkpoint, {"en": "eng", "fr": "fra"}[lang], audio)
    ours = model.logits(list(audio), lang)
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
