"""experiments.benchmark_cld end to end on the shipped corpus with a tiny random Whisper, and resuming."""

import json
import os

import numpy as np
import pytest
from asr_testutil import tiny_whisper_asr

from encoders.audio import log_mel_spectrogram, pad_or_trim
from encoders.pooling import mean_pool
from encoders.whisper import WhisperEncoder
from experiments import benchmark_cld, cld_data
from heads import LinearHead

pytest.importorskip("whisper")
LANGS = ["en", "hi", "id", "ms", "zh"]


def test_benchmark_runs_scores_and_resumes(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    tiny_whisper_asr(ckpt)
    train = [e for e in cld_data.load_manifest(languages=LANGS).examples if e.split == "train"][::20]
    enc = WhisperEncoder.from_pretrained(ckpt)
    mels = log_mel_spectrogram(np.stack([pad_or_trim(cld_data.read_audio(e)) for e in train]))
    emb = np.asarray(mean_pool(enc(mels)))
    LinearHead.fit(emb, [e.lang for e in train], LANGS).save(str(tmp_path / "head"))
    config = dict(head="linear", head_path=str(tmp_path / "head"), encoder=ckpt, dataset="embedded", split="test",
                  languages=LANGS, batch_size=4, max_examples=6, max_new_tokens=6)
    out = str(tmp_path / "out")
    results = benchmark_cld.run(config, out)
    assert results["overall"]["n"] == 6 and 0 <= results["overall"]["accuracy"] <= 1
    assert set(results["per_language"]) <= set(LANGS) and results["per_accent"]
    assert "precision" in results["classification_report_text"]
    assert os.path.exists(f"{out}/results.md") and json.load(open(f"{out}/results.json"))["overall"]["n"] == 6
    with open(f"{out}/predictions.jsonl") as f:
        first = f.read()
    config["max_examples"] = 8  # resume: only the two new clips are decoded
    assert benchmark_cld.run(config, out)["overall"]["n"] == 8
    with open(f"{out}/predictions.jsonl") as f:
        lines = f.read()
    assert lines.startswith(first) and len(lines.splitlines()) == 8
    with pytest.raises(ValueError, match="not --head=cvx"):
        benchmark_cld.build_model(ckpt, "cvx", str(tmp_path / "head"), LANGS, 4, 6)
