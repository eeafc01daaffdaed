"""experiments.bench.benchmark_cld on the shipped corpus with a tiny random Whisper: detections against transformers,
split hygiene, resuming after a truncated write, and refusing a changed configuration."""

import json
import os

import numpy as np
import pytest
import torch
from asr_testutil import tiny_whisper_asr
from transformers import WhisperFeatureExtractor

from encoders import input_pipeline
from experiments.bench import benchmark_cld
from experiments.lib import cld
from experiments.lib.cld import EMBEDDED_CORPUS

LANGS = ["en", "hi", "id", "ms", "zh"]


def _torch_features(model, clips):
    """Mean-pooled encoder states and first-step log-probabilities, computed by transformers alone."""
    fe = WhisperFeatureExtractor(feature_size=80)
    mel = torch.from_numpy(fe([np.asarray(c) for c in clips], sampling_rate=16000, return_tensors="np").input_features)
    with torch.no_grad():
        states = model.model.encoder(mel).last_hidden_state
        start = torch.full((len(clips), 1), model.generation_config.decoder_start_token_id)
        logits = model(encoder_outputs=(states,), decoder_input_ids=start).logits[:, 0]
    return states.mean(1).numpy(), torch.log_softmax(logits, -1).numpy()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    ckpt = str(root / "ckpt")
    model = tiny_whisper_asr(ckpt)
    from heads import LinearHead

    train = [e for e in input_pipeline.load_manifest(EMBEDDED_CORPUS, languages=LANGS).examples if e.split == "train"][::12]
    emb, _ = _torch_features(model, [input_pipeline.read_audio(e) for e in train])
    LinearHead.fit(emb, [e.lang for e in train], LANGS).save(str(root / "head"))
    config = dict(encoder=ckpt, dataset="embedded", splits=["test", "accent_shift"], languages=LANGS, data_seed=0,
                  batch_size=4, max_examples=5, max_new_tokens=4, repetition_penalty=1.0,
                  temperature_fallback=False, heads={"linear": str(root / "head")})
    return root, model, config


def test_detections_match_transformers_and_splits_follow_train_cld(setup):
    root, model, config = setup
    results = benchmark_cld.run(config, str(root / "out"))
    ds = cld.load_dataset("embedded", LANGS)
    _, _, test = input_pipeline.split(ds, data_seed=0)
    heldout = {e.id for e in input_pipeline.heldout_accent_test(ds).examples}
    assert [r["id"] for r in results["records"]["test"]] == [e.id for e in test.examples[:5]]
    assert not heldout & {r["id"] for r in results["records"]["test"]}  # test excludes the held-out accents
    assert {r["id"] for r in results["records"]["accent_shift"]} <= heldout

    from heads import load_head

    head = load_head(str(root / "head"))
    lang_to_id = model.generation_config.lang_to_id
    for split, records in results["records"].items():
        by_id = {e.id: e for e in (test.examples if split == "test" else input_pipeline.heldout_accent_test(ds).examples)}
        emb, logprobs = _torch_features(model, [input_pipeline.read_audio(by_id[r["id"]]) for r in records])
        expected_head = head.predict_languages(emb)
        all_codes = sorted(code.strip("<|>") for code in lang_to_id)
        for r, h, lp in zip(records, expected_head, logprobs):
            scores = {c: lp[lang_to_id[f"<|{c}|>"]] for c in all_codes}
            assert r["detections"]["linear"] == h
            assert r["detections"]["whisper_unrestricted"] == max(scores, key=scores.get)
            assert r["detections"]["whisper_restricted"] == max(LANGS, key=scores.get)
            assert r["detections"]["oracle"] == r["lang"]
            assert set(r["transcripts"]) == set(r["detections"].values())
        overall = results["splits"][split]["overall"]
        assert overall["oracle"]["accuracy"] == 1.0
        assert overall["linear"]["accuracy"] == np.mean([h == r["lang"] for h, r in zip(expected_head, records)])
    table = benchmark_cld.markdown(results, results["config"])
    assert "| whisper_restricted |" in table and "| linear |" in table


def test_resume_after_truncated_write_and_config_guard(setup, tmp_path):
    _, _, config = setup
    out = str(tmp_path / "out")
    first = benchmark_cld.run({**config, "splits": ["test"]}, out)
    path = os.path.join(out, "predictions_test.jsonl")
    with open(path) as f:
        lines = f.read().splitlines()
    with open(path, "w") as f:  # a kill in the middle of the last record
        f.write("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    again = benchmark_cld.run({**config, "splits": ["test"]}, out)
    assert [json.dumps(r, sort_keys=True) for r in again["records"]["test"]] == \
        [json.dumps(r, sort_keys=True) for r in first["records"]["test"]]
    with pytest.raises(ValueError, match="another configuration"):
        benchmark_cld.run({**config, "splits": ["test"], "max_new_tokens": 5}, out)


def test_whisper_features_pass_matches_transformers(setup, tmp_path):
    """extract_whisper's one pass: all-frames mean, covering-frames mean and language log-probs vs transformers."""
    _, model, config = setup
    from asr.whisper_decoder import WhisperDecoder
    from encoders import extraction
    from encoders.whisper import WhisperEncoder

    examples = [e for e in input_pipeline.load_manifest(EMBEDDED_CORPUS, languages=LANGS).examples if e.split == "test"][::21]
    lang_to_id = model.generation_config.lang_to_id
    codes = ["en", "zh", "th"]
    feats = extraction.extract_whisper(
        WhisperEncoder.from_pretrained(config["encoder"]), WhisperDecoder.from_pretrained(config["encoder"]), examples,
        sot=model.generation_config.decoder_start_token_id, language_ids=[lang_to_id[f"<|{c}|>"] for c in codes],
        cache_dir=str(tmp_path), batch_size=4, progress=False)
    clips = [input_pipeline.read_audio(e) for e in examples]
    fe = WhisperFeatureExtractor(feature_size=80)
    mel = torch.from_numpy(fe(clips, sampling_rate=16000, return_tensors="np").input_features)
    with torch.no_grad():
        states = model.model.encoder(mel).last_hidden_state.numpy()
    covering = [int(np.ceil(len(c) / 320)) for c in clips]  # frames whose 20 ms start lies inside the audio
    expected_masked = np.stack([s[:k].mean(0) for s, k in zip(states, covering)])
    _, logprobs = _torch_features(model, clips)
    np.testing.assert_allclose(feats["mean"], states.mean(1), atol=2e-4)
    np.testing.assert_allclose(feats["masked_mean"], expected_masked, atol=2e-4)
    assert not np.allclose(feats["mean"], feats["masked_mean"], atol=1e-2)
    np.testing.assert_allclose(feats["lang_logprobs"], logprobs[:, [lang_to_id[f"<|{c}|>"] for c in codes]], atol=2e-4)
