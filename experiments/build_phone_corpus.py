"""Builds a phone-aligned espeak-ng corpus: CV syllables spoken one at a time and concatenated.

    python -m experiments.build_phone_corpus --output_dir=outputs/phone_corpus

For each language, every syllable of CONSONANTS x VOWELS is spoken in isolation by the language's
espeak-ng voice at each (speed, pitch) variant, silence-trimmed, and the tokens (shuffled, fixed by
`--seed`) are concatenated `--units_per_clip` at a time with `--gap_seconds` of silence between them, so
every unit's boundaries are known exactly. A unit's label is the IPA espeak-ng gives the syllable in that
language (`espeak-ng --ipa`, stress and length-boundary marks removed): the "phones" of this corpus are
CV units, and the same spelling gets different labels where languages pronounce it differently. The
source of every clip is its language, so held-out sources are held-out languages.
Writes 16 kHz WAV clips and `manifest.jsonl` rows {id, audio_path, source, spans: [[start, end, label]]}.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import soundfile as sf
from absl import app, flags, logging

from encoders import runtime
from encoders.audio import SAMPLE_RATE
from experiments.lib import runtime_flags
from experiments.lib.tts import synthesize, trim_silence

CONSONANTS = ("p", "b", "t", "d", "k", "g", "m", "n", "s", "f", "l")
VOWELS = ("a", "e", "i", "o", "u")
VARIANTS = ((150, 50), (185, 35), (130, 70))  # (words per minute, pitch)

_OUTPUT = flags.DEFINE_string("output_dir", "outputs/phone_corpus", "Output directory (its clips are replaced).")
_LANGUAGES = flags.DEFINE_list("languages", ["en-us", "de", "es", "pt", "pl", "sw", "fr", "cs", "nl", "id", "it"],
                               "espeak-ng voices; each is one source.")
_UNITS = flags.DEFINE_integer("units_per_clip", 8, "Syllables per clip.")
_GAP = flags.DEFINE_float("gap_seconds", 0.05, "Silence between syllables.")
_SEED = flags.DEFINE_integer("order_seed", 0, "Seed of the syllable order.")


def syllable_ipa(voice: str, syllables: list[str]) -> list[str]:
    """espeak-ng's IPA for each syllable read alone, without stress or boundary marks."""
    def ipa(text):
        out = subprocess.run(["espeak-ng", "-q", "--ipa", "-v", voice, text], capture_output=True, check=True, text=True)
        return out.stdout.strip().translate(str.maketrans("", "", "ˈˌ-_ "))
    return [ipa(s) for s in syllables]


def build_language(voice: str, output: str, rng: np.random.Generator, *, units_per_clip: int = 8,
                   gap_seconds: float = 0.05, syllables: list[str] | None = None,
                   variants=VARIANTS) -> list[dict]:
    """Synthesises the syllable tokens of one voice, writes its clips to output/clips and returns their
    manifest rows (syllables default to every CONSONANTS x VOWELS pair)."""
    os.makedirs(os.path.join(output, "clips"), exist_ok=True)
    syllables = syllables or [c + v for c in CONSONANTS for v in VOWELS]
    labels = dict(zip(syllables, syllable_ipa(voice, syllables)))
    tokens = [(s, trim_silence(synthesize(s, voice, speed, pitch), pad_seconds=0.0))
              for speed, pitch in variants for s in syllables]
    order = rng.permutation(len(tokens))
    gap = np.zeros(int(gap_seconds * SAMPLE_RATE), np.float32)
    rows = []
    for clip, start in enumerate(range(0, len(order), units_per_clip)):
        pieces, spans, t = [gap], [], len(gap)
        for i in order[start:start + units_per_clip]:
            syllable, audio = tokens[i]
            spans.append([t / SAMPLE_RATE, (t + len(audio)) / SAMPLE_RATE, labels[syllable]])
            pieces += [audio, gap]
            t += len(audio) + len(gap)
        name = f"{voice}_{clip:04d}"
        path = os.path.join(output, "clips", f"{name}.wav")
        sf.write(path, np.concatenate(pieces), SAMPLE_RATE, subtype="PCM_16")
        rows.append({"id": name, "audio_path": os.path.relpath(path, output), "source": voice, "spans": spans})
    return rows


def main(argv):
    runtime_flags.init()
    if not runtime.is_writer():  # a host-side tool: process 0 does all of it
        return
    del argv
    rows = []
    for voice in _LANGUAGES.value:
        rng = np.random.default_rng([_SEED.value, len(rows)])
        rows += build_language(voice, _OUTPUT.value, rng, units_per_clip=_UNITS.value, gap_seconds=_GAP.value)
        logging.info("%s: %d clips so far", voice, len(rows))
    with open(os.path.join(_OUTPUT.value, "manifest.jsonl"), "w") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    print(f"wrote {len(rows)} clips, {sum(len(r['spans']) for r in rows)} spans to {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)
