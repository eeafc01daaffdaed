"""Greedy and beam-search generation against transformers' WhisperForConditionalGeneration.generate."""

import numpy as np
import pytest
import torch
from asr_testutil import tiny_whisper_asr, whisper_ids

from asr.generate import DecodeOptions, generate
from asr.whisper_decoder import WhisperDecoder
from encoders.whisper import WhisperEncoder

BEGIN_SUPPRESS = (220, 50257)
SUPPRESS = (1, 2, 7, 8, 9)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("whisper_gen")
    ref = tiny_whisper_asr(path)
    mel = np.random.default_rng(1).standard_normal((3, 80, 3000)).astype(np.float32)
    enc = WhisperEncoder.from_pretrained(str(path))
    return ref, WhisperDecoder.from_pretrained(str(path)), enc(mel), mel


def reference(ref, mel, language, suppress=SUPPRESS, **kw):
    with torch.no_grad():
        out = ref.generate(torch.from_numpy(mel), language=language, task="transcribe", return_timestamps=False,
                           suppress_tokens=list(suppress), begin_suppress_tokens=list(BEGIN_SUPPRESS), **kw)
    return [trim(row) for row in out.numpy()]


def trim(row):
    row = [int(t) for t in row]
    return row[: row.index(50257)] if 50257 in row else row


def ours(dec, states, language, num_beams=1, penalty=1.0, n=20, suppress=SUPPRESS):
    ids = whisper_ids()
    prompt = np.array([[ids["sot"], ids["lang_to_id"][f"<|{language}|>"], ids["transcribe"], ids["no_timestamps"]]]
                      * states.shape[0])
    opts = DecodeOptions(max_new_tokens=n, num_beams=num_beams, suppress_tokens=tuple(suppress),
                         begin_suppress_tokens=BEGIN_SUPPRESS)
    out = generate(dec, states, prompt, opts, repetition_penalty=penalty)
    return [list(map(int, row[:length])) for row, length in zip(out.tokens, out.lengths)], out


@pytest.mark.parametrize("language,penalty", [("en", 1.0), ("zh", 1.1)])
def test_greedy_matches_transformers(model, language, penalty):
    ref, dec, states, mel = model
    expected = reference(ref, mel, language, max_new_tokens=20, repetition_penalty=penalty)
    got, out = ours(dec, states, language, penalty=penalty)
    print("greedy", language, got)
    assert got == expected
    assert out.tokens.shape == (3, 20)


@pytest.mark.parametrize("num_beams", [2, 3])
def test_beam_search_matches_transformers(model, num_beams):
    ref, dec, states, mel = model
    expected = reference(ref, mel, "en", max_new_tokens=20, num_beams=num_beams)
    got, _ = ours(dec, states, "en", num_beams=num_beams)
    print("beam", num_beams, got, expected)
    assert got == expected


@pytest.mark.parametrize("num_beams", [1, 3])
def test_early_eos_matches_transformers(model, num_beams):
    """Only EOS and three text tokens allowed, so sequences end (at different steps) before max_new_tokens."""
    ref, dec, states, mel = model
    allowed = {50257, 100, 101, 102}
    suppress = tuple(t for t in range(51865) if t not in allowed)
    expected = reference(ref, mel, "en", suppress=suppress, max_new_tokens=40, num_beams=num_beams)
    got, _ = ours(dec, states, "en", num_beams=num_beams, suppress=suppress, n=40)
    print("eos", num_beams, [len(row) for row in got])
    assert got == expected and any(len(row) < 40 for row in got)


def test_too_long_request_raises(model):
    _, dec, states, _ = model
    with pytest.raises(ValueError, match="positions"):
        generate(dec, states, np.zeros((3, 4), int), DecodeOptions(max_new_tokens=61))
