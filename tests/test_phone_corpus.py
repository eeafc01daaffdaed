"""espeak-ng phone corpus, manifest validation and cached span features."""

import json
import shutil

import numpy as np
import pytest
from flax import nnx

from encoders import phone_spans, wav2vec2
from encoders.pooling import span_mean_pool
from experiments import build_phone_corpus


def tiny_encoder():
    cfg = wav2vec2.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  conv_dim=(16, 16, 16), conv_stride=(5, 4, 16), conv_kernel=(10, 4, 16),
                                  num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                                  feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=True)
    return wav2vec2.Wav2Vec2Encoder(cfg, rngs=nnx.Rngs(0))

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    assert shutil.which("espeak-ng"), "espeak-ng is not installed: `apt-get install espeak-ng` (README's test command does)"
    out = tmp_path_factory.mktemp("phones")
    rows = build_phone_corpus.build_language("es", str(out), np.random.default_rng(0), units_per_clip=3,
                                             syllables=["ba", "ki", "mu", "so"], variants=((160, 50),))
    (out / "manifest.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return out

def test_corpus_spans_and_labels(corpus):
    utts = phone_spans.load_phone_manifest(str(corpus / "manifest.jsonl"))
    assert [len(u.spans) for u in utts] == [3, 1]
    labels = sorted(l for u in utts for l in u.labels)
    assert labels == ["ba", "ki", "mu", "so"]  # espeak-ng's Spanish IPA, stress marks removed
    for u in utts:
        assert (np.diff(u.spans, axis=1) > 0.05).all() and (u.spans[1:, 0] >= u.spans[:-1, 1]).all()

def test_span_features_match_direct_pooling_and_cache(corpus, tmp_path):
    utts = phone_spans.load_phone_manifest(str(corpus / "manifest.jsonl"))
    enc = tiny_encoder()
    X, labels, sources = phone_spans.extract_spans(enc, utts, cache_dir=str(tmp_path), batch_size=2, progress=False)
    assert X.shape == (4, 32) and list(sources) == ["es"] * 4
    from encoders.input_pipeline import decode_audio
    audio = decode_audio(utts[0].audio_path)[None]
    ref = span_mean_pool(enc(wav2vec2.normalize(audio)), utts[0].spans[None])[0]
    np.testing.assert_allclose(X[:3], ref, atol=1e-4)
    again, _, _ = phone_spans.extract_spans(enc, utts, cache_dir=str(tmp_path), batch_size=2, progress=False)
    np.testing.assert_array_equal(X, again)

def _manifest(tmp_path, spans):
    import soundfile as sf
    sf.write(tmp_path / "a.wav", np.zeros(16000, np.float32), 16000)
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"id": "a", "audio_path": "a.wav", "source": "xx", "spans": spans}) + "\n")
    return str(path)

@pytest.mark.parametrize("spans, message", [
    ([[0.5, 1.5, "a"]], "outside the audio"),
    ([[-0.1, 0.2, "a"]], "outside the audio"),
    ([[0.4, 0.3, "a"]], "ends before it starts"),
    ([[0.1, 0.2, ""]], "non-empty label"),
    ([[0.1, 0.2]], "non-empty label"),
    ([], "no phone spans"),
])
def test_bad_spans(tmp_path, spans, message):
    with pytest.raises(ValueError, match=message):
        phone_spans.load_phone_manifest(_manifest(tmp_path, spans))

def test_empty_manifest(tmp_path):
    (tmp_path / "m.jsonl").write_text("")
    with pytest.raises(ValueError, match="no utterances"):
        phone_spans.load_phone_manifest(str(tmp_path / "m.jsonl"))
