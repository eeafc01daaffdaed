"""`python -m experiments.train_cld` and `experiments.sweep_cld` end to end on a tiny generated corpus."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from encoders_testutil import tiny_whisper

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTENCES = {  # our own short sentences; two voices each, the second held out as an accent shift
    "en": ["the cat sleeps", "open the door", "it is raining", "we eat rice", "good night", "call me soon"],
    "zh": ["你好朋友", "今天很冷", "我们吃饭", "请开门", "明天见", "天气很好"],
    "id": ["selamat pagi", "terima kasih", "sampai jumpa", "apa kabar", "saya lapar", "rumah besar"],
}
VOICES = {"en": ("en-us", "en-gb"), "zh": ("cmn-latn-pinyin", "cmn-latn-pinyin+klatt"), "id": ("id", "id+f2")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """espeak-ng clips (22.05 kHz wav) and a JSONL manifest with splits and one held-out accent per language."""
    assert shutil.which("espeak-ng"), "espeak-ng is not installed: `apt-get install espeak-ng` (README's test command does)"
    root = tmp_path_factory.mktemp("corpus")
    rows = []
    for lang, sentences in SENTENCES.items():
        for voice_index, voice in enumerate(VOICES[lang]):
            for i, text in enumerate(sentences):
                name = f"{lang}_{voice_index}_{i}.wav"
                subprocess.run(["espeak-ng", "-v", voice, "-w", str(root / name), text], check=True)
                split = "test" if voice_index == 1 else ("train", "train", "train", "train", "valid", "test")[i]
                rows.append({"audio": name, "lang": lang, "text": text, "accent": voice, "speaker": voice,
                             "split": split, "heldout_accent": voice_index == 1})
    (root / "broken.wav").write_bytes(b"RIFF\x00\x00not audio at all")
    rows.append({"audio": "broken.wav", "lang": "en", "text": "broken", "accent": "en-us", "speaker": "x", "split": "train",
                 "heldout_accent": False})
    def write(name, keep):
        path = root / name
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows if keep(r)) + "\n", encoding="utf-8")
        return str(path)
    encoder_dir = root / "tiny_whisper"
    tiny_whisper(str(encoder_dir))
    return {"two": write("en_zh.jsonl", lambda r: r["lang"] != "id"), "three": write("all.jsonl", lambda r: True),
            "encoder": str(encoder_dir), "root": root}


def _train(args, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "experiments.train_cld", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _flags(corpus, out, **overrides):
    flags = {"encoder": corpus["encoder"], "dataset": corpus["two"], "languages": "zh,en", "output_dir": str(out),
             "cache_dir": str(corpus["root"] / "cache"), "neuron": 8, "rank": 4, "batch_size": 4}
    flags.update(overrides)
    return [f"--{k}={v}" for k, v in flags.items()]


def test_train_cld_end_to_end(corpus, tmp_path):
    out = tmp_path / "run"
    result = _train(_flags(corpus, out), REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["labels"] == ["en", "zh"]  # sorted ISO codes: 0 -> en, 1 -> zh
    assert (metrics["n_train"], metrics["n_valid"], metrics["n_test"]) == (8, 2, 2)
    assert metrics["skipped_corrupt"] == 1
    assert metrics["accent_shift"]["n"] == 12
    assert set(metrics["accent_shift"]["per_accent"]) == {"en-gb", "cmn-latn-pinyin+klatt"}
    confusion = np.array(metrics["test"]["confusion_matrix"])
    assert confusion.sum() == 2 and np.trace(confusion) / 2 == pytest.approx(metrics["test"]["accuracy"])
    assert metrics["train_flops"] > 0 and metrics["train_compile_seconds"] > 0
    assert len(json.loads((out / "head" / "head.json").read_text())["languages"]) == 2
    card = (out / "README.md").read_text()
    assert "| Samples per class | Test accuracy |" in card and "en-gb" in card

    # The saved head reproduces the reported accuracy on freshly extracted test embeddings.
    from encoders import extraction, input_pipeline
    from experiments.lib import cld
    from heads import ConvexReLUHead
    dataset = input_pipeline.load_manifest(corpus["two"], languages=["en", "zh"])
    _, _, test = input_pipeline.split(dataset, data_seed=0)
    encoder, pooling, _ = cld.load_encoder(corpus["encoder"])
    X, _ = extraction.extract(encoder, test.examples, cache_dir=str(tmp_path / "fresh"), batch_size=4, pooling=pooling,
                              progress=False)
    head = ConvexReLUHead.load(str(out / "head"))
    accuracy = np.mean([p == e.lang for p, e in zip(head.predict_languages(X), test.examples)])
    assert accuracy == pytest.approx(metrics["test"]["accuracy"])


@pytest.mark.parametrize("overrides, message", [
    ({"dataset": "three"}, "id"),                       # a language in the data that --languages does not name
    ({"languages": "en,fr"}, "fr"),                      # a requested language with no clips
    ({"languages": "en,english"}, "ISO-639-1"),
    ({"bogus_flag": 1}, "Unknown command line flag 'bogus_flag'"),
])
def test_train_cld_rejects_bad_input(corpus, tmp_path, overrides, message):
    if overrides.get("dataset") == "three":
        overrides = {**overrides, "dataset": corpus["three"]}
    result = _train(_flags(corpus, tmp_path / "bad", **overrides), REPO)
    assert result.returncode != 0
    assert message in result.stderr


def test_sweep_writes_table_and_plot(corpus, tmp_path):
    out = tmp_path / "sweep"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-m", "experiments.sweep_cld", *_flags(corpus, out),
                             "--sweep_samples_per_class=2,4", "--sweep_data_seeds=0,1"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = json.loads((out / "sweep.json").read_text())
    assert [p["samples_per_class"] for p in sweep["points"]] == [2, 4]
    assert [p["n_train"] for p in sweep["points"]] == [[4, 4], [8, 8]]
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for run in sweep["runs"]:  # each point's spread is over the per-seed runs, each with its own metrics.json
        metrics = json.loads((out / f"spc_{run['samples_per_class']}_seed_{run['data_seed']}" / "metrics.json").read_text())
        assert metrics["config"]["data_seed"] == run["data_seed"]
        assert run["accuracy"]["test"] == metrics["test"]["accuracy"]
    for point in sweep["points"]:
        values = [r["accuracy"]["test"] for r in sweep["runs"] if r["samples_per_class"] == point["samples_per_class"]]
        assert point["test"] == pytest.approx(dict(mean=np.mean(values), min=min(values), max=max(values)))
    assert "Generated by `python -m experiments.sweep_cld" in (out / "sweep.md").read_text()
