"""CLD data: manifest / HF loading, seeded splits and subsampling, grain batches, resumable embeddings, corpus."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf
from flax import nnx

from encoders import extraction, input_pipeline
from encoders.audio import log_mel_spectrogram, normalize, pad_or_trim, prepare_audio
from encoders.pooling import mean_pool
from encoders.wav2vec2 import Wav2Vec2Config, Wav2Vec2Encoder
from encoders.whisper import WhisperConfig, WhisperEncoder
from experiments.lib.cld import EMBEDDED_CORPUS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LANGS = ("en", "hi", "zh")
# (extension, rate, channels): every format, rate and layout the loader has to convert.
FORMATS = [("wav", 22050, 2), ("flac", 16000, 1), ("mp3", 44100, 1), ("wav", 8000, 1)]
TINY_WHISPER = WhisperConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64)


def tone(i: int, rate: int, channels: int) -> np.ndarray:
    """A 0.5-1.2 s noisy tone, distinct per clip, (T,) or (T, channels)."""
    rng = np.random.default_rng(i)
    t = np.arange(int(rate * (0.5 + 0.1 * (i % 8)))) / rate
    x = 0.3 * np.sin(2 * np.pi * (200 + 37 * i) * t) + 0.01 * rng.standard_normal(len(t))
    return np.stack([x, 0.5 * x], 1) if channels == 2 else x


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """24 clips (8 per language, mixed formats/rates) plus a corrupt and an empty file; JSONL + CSV manifests."""
    root = tmp_path_factory.mktemp("corpus")
    rows, originals = [], {}
    for i in range(24):
        ext, rate, channels = FORMATS[i % len(FORMATS)]
        name = f"clip{i:02d}.{ext}"
        audio = tone(i, rate, channels)
        sf.write(root / name, audio, rate)
        originals[name] = (audio, rate, channels)
        rows.append({"audio": name, "lang": LANGS[i % 3], "text": f"t{i}", "accent": f"a{i % 2}",
                     "speaker": f"s{i % 4}"})
    (root / "corrupt.wav").write_bytes(b"RIFF....WAVEfmt garbage" * 10)
    sf.write(root / "empty.wav", np.zeros(0), 16000)
    rows += [{"audio": "corrupt.wav", "lang": "en"}, {"audio": "empty.wav", "lang": "zh"}]
    with open(root / "manifest.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(root / "manifest.csv", "w") as f:
        f.write("audio_path,lang,text,accent,speaker\n")
        f.writelines(f"{r['audio']},{r['lang']},{r.get('text', '')},{r.get('accent', '')},{r.get('speaker', '')}\n"
                     for r in rows)
    return root, originals


def test_manifest_loads_resamples_and_counts_corrupt(corpus):
    root, originals = corpus
    ds = input_pipeline.load_manifest(str(root / "manifest.jsonl"))
    assert ds.stats.loaded == len(ds) == 24
    assert sorted(os.path.basename(p) for p, _ in ds.stats.skipped_corrupt) == ["corrupt.wav", "empty.wav"]
    assert ds.stats.per_language == {"en": 8, "hi": 8, "zh": 8} and ds.languages == LANGS
    assert list(ds.labels()) == [LANGS.index(e.lang) for e in ds.examples]
    for ex in ds.examples:
        audio, rate, channels = originals[os.path.basename(ex.audio_path)]
        got = input_pipeline.read_audio(ex)
        assert got.dtype == np.float32 and got.ndim == 1 and ex.num_samples == len(got)
        if ex.audio_path.endswith(".mp3"):  # lossy, with encoder delay: only the length is comparable
            assert abs(len(got) - len(audio) * 16000 / rate) < 0.1 * 16000
            continue
        reference = prepare_audio(audio, rate, channels_axis=1 if channels == 2 else None)
        np.testing.assert_allclose(got, reference, atol=2e-4)  # 16-bit quantisation of the stored file
    csv_ds = input_pipeline.load_manifest(str(root / "manifest.csv"))
    assert [e.id for e in csv_ds.examples] == [e.id for e in ds.examples]
    assert [e.text for e in csv_ds.examples] == [e.text for e in ds.examples]



def write_manifest(root, names, lang="en") -> str:
    """A JSONL manifest of the files `names` in `root`, all labelled `lang`."""
    with open(root / "manifest.jsonl", "w") as f:
        f.writelines(json.dumps({"audio": name, "lang": lang}) + "\n" for name in names)
    return str(root / "manifest.jsonl")


def test_undecodable_audio_is_counted_as_corrupt(tmp_path):
    sf.write(tmp_path / "good.wav", tone(0, 16000, 1), 16000)
    (tmp_path / "truncated.wav").write_bytes((tmp_path / "good.wav").read_bytes()[:30])  # cut inside the header
    (tmp_path / "garbage.wav").write_bytes(np.random.default_rng(0).bytes(2000))
    sf.write(tmp_path / "nan.wav", np.full(800, np.nan, np.float32), 16000, subtype="FLOAT")
    bad = ["garbage.wav", "nan.wav", "truncated.wav"]
    for name in ("garbage.wav", "truncated.wav"):  # the reference decoder refuses them as well
        with pytest.raises(sf.LibsndfileError):
            sf.read(tmp_path / name)
    assert np.isnan(sf.read(tmp_path / "nan.wav")[0]).all()
    ds = input_pipeline.load_manifest(write_manifest(tmp_path, ["good.wav", *bad]))
    assert [os.path.basename(e.audio_path) for e in ds.examples] == ["good.wav"]
    assert sorted(os.path.basename(p) for p, _ in ds.stats.skipped_corrupt) == bad
    for name in bad:
        with pytest.raises(input_pipeline.CorruptAudioError, match="re-encode or drop the file"):
            input_pipeline.decode_audio(str(tmp_path / name))


@pytest.mark.parametrize("error", [TypeError, ValueError])
def test_programming_errors_while_loading_audio_propagate(error, tmp_path, monkeypatch):
    sf.write(tmp_path / "good.wav", tone(0, 16000, 1), 16000)
    bug = error("prepare_audio() got an unexpected argument")

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(input_pipeline, "prepare_audio", broken)
    with pytest.raises(error) as e:
        input_pipeline.load_manifest(write_manifest(tmp_path, ["good.wav"]), languages=["en"])
    assert e.value is bug

def test_language_filter_and_errors(corpus):
    root, _ = corpus
    path = str(root / "manifest.jsonl")
    ds = input_pipeline.load_manifest(path, languages=["zh", "en"], on_unknown_language="drop")
    assert ds.languages == ("zh", "en") and ds.stats.dropped_unknown_language == 8
    assert {e.lang for e in ds.examples} == {"en", "zh"}
    with pytest.raises(ValueError, match="'hi'.*on_unknown_language='drop'"):
        input_pipeline.load_manifest(path, languages=["zh", "en"], on_unknown_language="error")
    with pytest.raises(ValueError, match=r"\['fr'\]"):
        input_pipeline.load_manifest(path, languages=["en", "fr", "hi", "zh"])
    with pytest.raises(ValueError, match="on_unknown_language"):
        input_pipeline.load_manifest(path, languages=["en"], on_unknown_language="ignore")


def ids(ds) -> list[str]:
    return [e.id for e in ds.examples]


def test_split_is_seeded_stratified_and_order_free(corpus):
    root, _ = corpus
    ds = input_pipeline.load_manifest(str(root / "manifest.jsonl"))
    parts = input_pipeline.split(ds, data_seed=0, fractions=(0.5, 0.25, 0.25))
    assert [ids(p) for p in parts] == [ids(p) for p in input_pipeline.split(ds, data_seed=0, fractions=(0.5, 0.25, 0.25))]
    assert sorted(sum(map(ids, parts), [])) == sorted(ids(ds))  # a partition: nothing lost or repeated
    for part, n in zip(parts, (4, 2, 2)):
        assert {lang: sum(e.lang == lang for e in part.examples) for lang in LANGS} == dict.fromkeys(LANGS, n)
    other = input_pipeline.split(ds, data_seed=1, fractions=(0.5, 0.25, 0.25))
    assert ids(other[0]) != ids(parts[0])
    shuffled = ds.subset(ds.examples[::-1])  # the row order of the manifest does not matter
    assert [sorted(ids(p)) for p in input_pipeline.split(shuffled, 0, (0.5, 0.25, 0.25))] == [sorted(ids(p)) for p in parts]
    with pytest.raises(ValueError, match="every example or on none"):
        input_pipeline.split(ds.subset([dataclasses.replace(ds.examples[0], split="train")] + ds.examples[1:]))


def test_split_column_and_heldout_accents():
    ds = input_pipeline.load_manifest(EMBEDDED_CORPUS, languages=["en", "id"], on_unknown_language="drop")
    train, valid, test = input_pipeline.split(ds, data_seed=123)
    for part, name in zip((train, valid, test), input_pipeline.SPLITS):
        assert part.examples and all(e.split == name and not e.heldout_accent for e in part.examples)
    shifted = input_pipeline.heldout_accent_test(ds)
    assert {e.accent for e in shifted.examples} == {"en-gb-scotland", "id-klatt"}
    assert {e.accent for e in train.examples}.isdisjoint({e.accent for e in shifted.examples})
    assert len(train) + len(valid) + len(test) + len(shifted) == len(ds)


def test_subsample_per_class(corpus):
    root, _ = corpus
    ds = input_pipeline.load_manifest(str(root / "manifest.jsonl"))
    small = input_pipeline.subsample_per_class(ds, 3, data_seed=0)
    assert {lang: sum(e.lang == lang for e in small.examples) for lang in LANGS} == dict.fromkeys(LANGS, 3)
    assert ids(small) == ids(input_pipeline.subsample_per_class(ds, 3, data_seed=0))
    assert ids(small) != ids(input_pipeline.subsample_per_class(ds, 3, data_seed=1))
    larger = ids(input_pipeline.subsample_per_class(ds, 5, data_seed=0))
    for lang in LANGS:  # nested: the 3 of a class are the first 3 of its 5
        assert [i for i in ids(small) if i in by_lang(ds, lang)] == [i for i in larger if i in by_lang(ds, lang)][:3]
    with pytest.raises(ValueError, match="'en' has 8 examples, fewer than samples_per_class=9"):
        input_pipeline.subsample_per_class(ds, 9)
    assert len(input_pipeline.subsample_per_class(ds, 9, take_all=True)) == 24
    only_en = input_pipeline.Dataset([e for e in ds.examples if e.lang == "en"], ("en", "zh"), ds.stats)
    with pytest.raises(ValueError, match="'zh' has no examples"):
        input_pipeline.subsample_per_class(only_en, 2, take_all=True)


def by_lang(ds, lang):
    return {e.id for e in ds.examples if e.lang == lang}


def test_audio_pipeline_batches(corpus):
    root, _ = corpus
    ds = input_pipeline.load_manifest(str(root / "manifest.jsonl"))
    batches = list(input_pipeline.audio_pipeline(ds.examples, 5, fill_last_batch=True))
    assert [len(b["ids"]) for b in batches] == [5] * 5 and batches[-1]["valid"].tolist() == [True] * 4 + [False]
    assert [i for b in batches for i, v in zip(b["ids"], b["valid"]) if v] == ids(ds)
    first = batches[0]
    for row, n, ex in zip(first["audio"], first["lengths"], ds.examples):
        np.testing.assert_array_equal(row[:n], input_pipeline.read_audio(ex))
        assert not row[n:].any()
    order = [list(b["ids"]) for b in input_pipeline.audio_pipeline(ds.examples, 4, shuffle_seed=3)]
    assert order == [list(b["ids"]) for b in input_pipeline.audio_pipeline(ds.examples, 4, shuffle_seed=3)]
    assert sorted(sum(order, [])) == sorted(ids(ds)) and sum(order, []) != ids(ds)
    with pytest.raises(ValueError, match="longer than pad_to"):
        next(input_pipeline.audio_pipeline(ds.examples, 4, pad_to=100))


def test_hf_dataset_layout(corpus, tmp_path):
    import datasets  # in the test extra

    root, _ = corpus
    ds = input_pipeline.load_manifest(str(root / "manifest.jsonl"))
    parts = dict(zip(("train", "validation", "test"), (ds.examples[:12], ds.examples[12:18], ds.examples[18:])))
    tables = {}
    for name, examples in parts.items():
        audio = [{"bytes": open(e.audio_path, "rb").read(), "path": None} for e in examples]
        if name == "test":
            audio[0] = {"bytes": b"not audio", "path": None}
        tables[name] = datasets.Dataset.from_dict(
            {"audio": audio, "lang": [e.lang for e in examples], "text": [e.text for e in examples],
             "accent": [e.accent for e in examples]}).cast_column("audio", datasets.Audio())
    datasets.DatasetDict(tables).save_to_disk(str(tmp_path / "hf"))
    hf = input_pipeline.load_hf_dataset(str(tmp_path / "hf"), languages=["en", "hi", "zh"])
    assert hf.stats.loaded == 23 and len(hf.stats.skipped_corrupt) == 1
    train, valid, test = input_pipeline.split(hf)
    assert (len(train), len(valid), len(test)) == (12, 6, 5)
    for got, ex in zip(train.examples, ds.examples):
        assert got.lang == ex.lang and got.text == ex.text
        np.testing.assert_array_equal(input_pipeline.read_audio(got), input_pipeline.read_audio(ex))


def test_whisper_embeddings_match_direct_pooling(corpus, tmp_path):
    root, _ = corpus
    ds = input_pipeline.load_manifest(str(root / "manifest.jsonl"))
    enc = WhisperEncoder(TINY_WHISPER, rngs=nnx.Rngs(0))
    X, got_ids = extraction.extract(enc, ds.examples[:6], cache_dir=str(tmp_path), batch_size=4, progress=False)
    audio = np.stack([pad_or_trim(input_pipeline.read_audio(e)) for e in ds.examples[:6]])
    np.testing.assert_allclose(X, np.asarray(mean_pool(enc(log_mel_spectrogram(audio)))), atol=1e-6)
    assert X.dtype == np.float32 and list(got_ids) == ids(ds)[:6]
    masked, _ = extraction.extract(enc, ds.examples[:6], cache_dir=str(tmp_path), batch_size=4,
                                   pooling="masked_mean", progress=False)
    other = WhisperEncoder(TINY_WHISPER, rngs=nnx.Rngs(1))
    extraction.extract(other, ds.examples[:6], cache_dir=str(tmp_path), batch_size=4, progress=False)
    assert len(os.listdir(tmp_path)) == 3 and not np.allclose(masked, X)  # pooling and weights key the cache


def test_wav2vec2_masked_mean_equals_unpadded_clip(corpus, tmp_path):
    root, _ = corpus
    ds = input_pipeline.load_manifest(str(root / "manifest.jsonl"))
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         conv_dim=(16, 16, 16), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 2),
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                         feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=True)
    enc = Wav2Vec2Encoder(cfg, rngs=nnx.Rngs(0))
    X, _ = extraction.extract(enc, ds.examples[:5], cache_dir=str(tmp_path), batch_size=4, progress=False)
    for row, ex in zip(X, ds.examples[:5]):  # each clip alone, unpadded: the mean over all its frames
        alone = np.asarray(enc(normalize(input_pipeline.read_audio(ex))[None])).mean(axis=(0, 1))
        np.testing.assert_allclose(row, alone, atol=2e-4)


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from flax import nnx
    from encoders import input_pipeline
    from encoders import extraction
    from encoders.whisper import WhisperConfig, WhisperEncoder
    ds = input_pipeline.load_manifest(sys.argv[1])
    enc = WhisperEncoder(WhisperConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64),
                         rngs=nnx.Rngs(0))
    def die(rows):  # a hard kill, no clean-up, once two shards are on disk
        if rows >= 8:
            os.kill(os.getpid(), signal.SIGKILL)
    extraction.extract(enc, ds.examples, cache_dir=sys.argv[2], batch_size=2, shard_batches=2, on_shard=die)
""")


def test_extraction_resumes_after_kill(corpus, tmp_path):
    root, _ = corpus
    manifest = str(root / "manifest.jsonl")
    cache = str(tmp_path / "killed")
    run = subprocess.run([sys.executable, "-c", KILLED_RUN, manifest, cache], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == -9, run.stderr[-2000:]
    (key,) = os.listdir(cache)
    with open(os.path.join(cache, key, "index.json")) as f:
        assert sorted(k.split("|")[0] for k in json.load(f)["items"]) == sorted(ids(input_pipeline.load_manifest(manifest))[:8])
    ds = input_pipeline.load_manifest(manifest)
    enc = WhisperEncoder(TINY_WHISPER, rngs=nnx.Rngs(0))
    resumed_shards = []
    X, got_ids = extraction.extract(enc, ds.examples, cache_dir=cache, batch_size=2, shard_batches=2,
                                    on_shard=resumed_shards.append, progress=False)
    assert resumed_shards == [4, 8, 12, 16]  # only the 16 missing clips were computed, in shards of 4
    full, full_ids = extraction.extract(enc, ds.examples, cache_dir=str(tmp_path / "full"), batch_size=2,
                                        shard_batches=2, progress=False)
    np.testing.assert_array_equal(X, full)
    assert X.shape == (24, 32) and list(got_ids) == list(full_ids) == ids(ds)
    assert len({row.tobytes() for row in X}) == 24  # no duplicated rows


def test_cache_is_per_clip_and_keyed_by_audio_content(corpus, tmp_path):
    """A subset's rows serve a later superset, and a clip whose file changed is recomputed."""
    root, _ = corpus
    ds = input_pipeline.load_manifest(str(root / "manifest.jsonl"))
    enc = WhisperEncoder(TINY_WHISPER, rngs=nnx.Rngs(0))
    cache = str(tmp_path / "cache")
    extraction.extract(enc, ds.examples[2:6], cache_dir=cache, batch_size=2, progress=False)
    computed = []
    X, _ = extraction.extract(enc, ds.examples[:8], cache_dir=cache, batch_size=2, shard_batches=1,
                              on_shard=computed.append, progress=False)
    assert computed == [2, 4]  # clips 0, 1, 6, 7 only
    audio = np.stack([pad_or_trim(input_pipeline.read_audio(e)) for e in ds.examples[:8]])
    np.testing.assert_allclose(X, np.asarray(mean_pool(enc(log_mel_spectrogram(audio)))), atol=1e-6)
    path = str(tmp_path / "clip.wav")
    shutil.copyfile(ds.examples[0].audio_path, path)
    extraction.extract(enc, [dataclasses.replace(ds.examples[0], audio_path=path)], cache_dir=cache, batch_size=2,
                       progress=False)
    shutil.copyfile(ds.examples[1].audio_path, path)  # same path and id, different audio
    again, _ = extraction.extract(enc, [dataclasses.replace(ds.examples[0], audio_path=path)], cache_dir=cache,
                                  batch_size=2, progress=False)
    np.testing.assert_allclose(again[0], X[1], atol=1e-6)


SHARDED_RUN = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from flax import nnx
    from encoders.runtime import create_mesh
    from encoders.whisper import WhisperConfig, WhisperEncoder
    from encoders import input_pipeline
    from encoders import extraction
    examples = input_pipeline.load_manifest(sys.argv[1]).examples[:10]
    enc = WhisperEncoder(WhisperConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64),
                         rngs=nnx.Rngs(0))
    plain, _ = extraction.extract(enc, examples, cache_dir=sys.argv[2] + "/plain", batch_size=4, progress=False)
    sharded, _ = extraction.extract(enc, examples, cache_dir=sys.argv[2] + "/sharded", batch_size=4,
                                    mesh=create_mesh(data=2), progress=False)
    assert len(jax.devices()) == 2 and sharded.shape == (10, 32)
    print("max difference", float(np.abs(plain - sharded).max()))
""")


def test_extraction_sharded_over_data_axis(corpus, tmp_path):
    root, _ = corpus
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", SHARDED_RUN, str(root / "manifest.jsonl"), str(tmp_path)], cwd=REPO,
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.split("max difference")[-1]) < 1e-5

def test_shipped_corpus():
    ds = input_pipeline.load_manifest(EMBEDDED_CORPUS)
    assert ds.languages == ("en", "hi", "id", "ms", "zh") and not ds.stats.skipped_corrupt
    assert len(ds) == 920 and set(ds.stats.per_language.values()) == {184}
    for ex in ds.examples:
        info = sf.info(ex.audio_path)
        assert info.samplerate == 16000 and info.channels == 1
        assert 16000 <= ex.num_samples <= 4 * 16000
    texts = {name: {(e.lang, e.text) for e in ds.examples if e.split == name and not e.heldout_accent}
             for name in input_pipeline.SPLITS}
    assert all(texts[a].isdisjoint(texts[b]) for a, b in [("train", "valid"), ("train", "test"), ("valid", "test")])
    corpus_dir = os.path.dirname(EMBEDDED_CORPUS)
    size = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(corpus_dir) for n in names)
    assert size <= 15e6


@pytest.mark.parametrize("n, batch, processes", [(10, 4, 2), (11, 8, 4), (3, 4, 4), (8, 4, 1)])
def test_process_records_split_every_global_batch_disjointly(n, batch, processes):
    """Each process reads its contiguous batch/processes rows of every global batch; together, every example once,
    then repeats of the last one (invalid) filling the final batch. Reference: the layout written out by hand."""
    local = batch // processes
    padded = -(-n // batch) * batch
    per_process = [input_pipeline.process_records(n, batch, processes, p) for p in range(processes)]
    for p, records in enumerate(per_process):
        expected = [(min(k, n - 1), k < n) for start in range(0, padded, batch)
                    for k in range(start + p * local, start + (p + 1) * local)]
        assert records == expected
    valid = sorted(i for records in per_process for i, ok in records if ok)
    assert valid == list(range(n))  # disjoint and complete
    assert sum(len(r) for r in per_process) == padded and all(not ok for r in per_process for i, ok in r if i >= n)
    with pytest.raises(ValueError, match="does not split over"):
        input_pipeline.process_records(n, 6, 4, 0)


def test_process_records_by_hand():
    """10 clips, global batches of 4, 2 processes: written out by hand."""
    assert input_pipeline.process_records(10, 4, 2, 0) == [(0, True), (1, True), (4, True), (5, True), (8, True),
                                                             (9, True)]
    assert input_pipeline.process_records(10, 4, 2, 1) == [(2, True), (3, True), (6, True), (7, True), (9, False),
                                                             (9, False)]
