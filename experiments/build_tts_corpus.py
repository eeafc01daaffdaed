"""Builds the embedded default CLD corpus: espeak-ng speech of the project's own sentence lists.

    python -m experiments.build_tts_corpus --output_dir=experiments/data/tts_corpus

Every sentence of `experiments/data/tts_sentences/{lang}.txt` is spoken once in each accent of its
language (an espeak-ng voice, or for one-voice languages a speed/pitch setting of it or the Klatt synthesiser),
with a speaker variant (+m1, +f2, ...) rotating over sentences. zh is Mandarin in all four accents (espeak-ng's
`cmn-latn-pinyin` voice, see ZH_VOICE). Clips are resampled to 16 kHz mono, leading and trailing silence trimmed
to 0.1 s, kept at 1-4 s, and stored as Ogg/Opus next to `manifest.jsonl`.

Splits are by sentence (a sentence's clips never span two splits), fixed by `--seed`: 70 % train,
15 % valid, 15 % test. One accent per language is held out for the accent-shift evaluation: its clips
are all `split: "test"` with `heldout_accent: true` and never appear in train or valid.
Only this binary needs espeak-ng; the shipped corpus is read with soundfile alone.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import soundfile as sf
from absl import app, flags, logging

from encoders.audio import SAMPLE_RATE
from experiments.lib import runtime_flags
from experiments.lib.tts import synthesize, trim_silence

SENTENCES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tts_sentences")

# Mandarin voice. espeak-ng's plain `cmn` voice reads Latin text as English, and in espeak-ng 1.51 (Debian's) that
# includes the pinyin its dictionary gives most characters, tone digits and all ("你好" is spoken as English
# "ni three hao three"; whisper-base calls such clips English). `cmn-latn-pinyin` is the same voice (phonemes,
# dictionary, pitch) reading that pinyin as Mandarin.
ZH_VOICE = "cmn-latn-pinyin"
# lang -> accents: (accent name, espeak-ng voice, words per minute, pitch 0-99). The last accent is held out:
# another voice (en-gb-scotland) or, for one-voice languages, the same voice on espeak-ng's Klatt synthesiser.
ACCENTS = {
    "en": [("en-us", "en-us", 165, 50), ("en-gb", "en-gb", 165, 50), ("en-029", "en-029", 165, 50),
           ("en-gb-scotland", "en-gb-scotland", 165, 50)],
    "zh": [("cmn", ZH_VOICE, 165, 50), ("cmn-slow-low", ZH_VOICE, 140, 35), ("cmn-fast-high", ZH_VOICE, 200, 70),
           ("cmn-klatt", ZH_VOICE + "+klatt", 165, 50)],
}
for _lang in ("hi", "id", "ms"):
    ACCENTS[_lang] = [(_lang, _lang, 165, 50), (f"{_lang}-slow-low", _lang, 140, 35),
                      (f"{_lang}-fast-high", _lang, 200, 70), (f"{_lang}-klatt", _lang + "+klatt", 165, 50)]
SPEAKER_VARIANTS = ("m1", "f2", "m3", "f4")
SPLIT_FRACTIONS = (0.7, 0.15)  # train, valid; the rest is test

_OUTPUT = flags.DEFINE_string("output_dir", "experiments/data/tts_corpus", "Output directory (replaced).")
_SENTENCES = flags.DEFINE_string("sentences_dir", SENTENCES_DIR, "Directory of {lang}.txt sentence lists.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sentence-level split.")
_COMPRESSION = flags.DEFINE_float("compression_level", 0.85, "Opus compression level in [0, 1] (higher: smaller).")
_MIN_SECONDS = flags.DEFINE_float("min_seconds", 1.0, "Shortest clip; shorter speech is zero-padded.")
_MAX_SECONDS = flags.DEFINE_float("max_seconds", 4.0, "Longest clip; longer speech is re-spoken faster.")


def speak_clip(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """Trimmed speech of `text`, re-spoken faster while longer than --max_seconds, padded to --min_seconds."""
    for _ in range(4):
        audio = trim_silence(synthesize(text, voice, speed, pitch))
        if len(audio) <= _MAX_SECONDS.value * SAMPLE_RATE:
            break
        speed = int(np.ceil(speed * len(audio) / (0.95 * _MAX_SECONDS.value * SAMPLE_RATE)))
    else:
        raise ValueError(f"cannot fit {text!r} ({voice}) into {_MAX_SECONDS.value} s")
    return np.pad(audio, (0, max(int(_MIN_SECONDS.value * SAMPLE_RATE) - len(audio), 0)))


def sentence_splits(n: int, rng: np.random.Generator) -> list[str]:
    """Split name of each of `n` sentences: a seeded permutation cut at SPLIT_FRACTIONS."""
    n_train, n_valid = (int(round(f * n)) for f in SPLIT_FRACTIONS)
    names = np.array(["train"] * n_train + ["valid"] * n_valid + ["test"] * (n - n_train - n_valid))
    return list(names[np.argsort(rng.permutation(n))])


def main(argv):
    if not runtime_flags.init_host_tool(argv):
        return
    if shutil.which("espeak-ng") is None:
        raise app.UsageError("espeak-ng is not installed (apt-get install espeak-ng); it is only needed to rebuild")
    out = _OUTPUT.value
    if os.path.exists(out):
        shutil.rmtree(out)
    rows, total_seconds = [], 0.0
    for lang_index, (lang, accents) in enumerate(ACCENTS.items()):
        with open(os.path.join(_SENTENCES.value, f"{lang}.txt"), encoding="utf-8") as f:
            sentences = [line.strip() for line in f if line.strip()]
        splits = sentence_splits(len(sentences), np.random.default_rng([_SEED.value, lang_index]))
        for accent_index, (accent, voice, speed, pitch) in enumerate(accents):
            heldout = accent_index == len(accents) - 1
            os.makedirs(os.path.join(out, lang, accent), exist_ok=True)
            for i, (text, split) in enumerate(zip(sentences, splits)):
                speaker = voice if "+" in voice else f"{voice}+{SPEAKER_VARIANTS[i % len(SPEAKER_VARIANTS)]}"
                audio = speak_clip(text, speaker, speed, pitch)
                path = f"{lang}/{accent}/{lang}_{i:03d}.ogg"
                sf.write(os.path.join(out, path), audio, SAMPLE_RATE, format="OGG", subtype="OPUS",
                         compression_level=_COMPRESSION.value)
                seconds = len(audio) / SAMPLE_RATE
                total_seconds += seconds
                rows.append({"id": f"{lang}/{accent}/{i:03d}", "audio": path, "lang": lang, "text": text,
                             "accent": accent, "speaker": speaker, "split": "test" if heldout else split,
                             "heldout_accent": heldout, "seconds": round(seconds, 3)})
            logging.info("%s %s: %d clips", lang, accent, len(sentences))
    with open(os.path.join(out, "manifest.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    size = sum(os.path.getsize(os.path.join(d, name)) for d, _, names in os.walk(out) for name in names)
    print(f"wrote {len(rows)} clips, {total_seconds / 60:.1f} min of audio, {size / 2**20:.2f} MiB to {out}")


if __name__ == "__main__":
    app.run(main)
