"""MMS CTC ASR: the `Wav2Vec2ForCTC` head over the `encoders` MMS backbone, with per-language adapters.

A CLD head picks each clip's language (ISO-639-1), mapped to the MMS adapter code
(ISO-639-3, configurable); clips are grouped by language, the adapter and the
language's `lm_head` are swapped in as parameter values (the compiled encoder is
reused: no recompilation per swap) and decoded by greedy CTC with the
language's vocabulary from `vocab.json` (nested by language).
"""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from asr.whisper_pipeline import as_clip_list, padded_batches
from encoders import loading, pooling
from encoders.audio import SAMPLE_RATE, normalize
from encoders.wav2vec2 import Wav2Vec2Encoder

ISO_639_3 = {"en": "eng", "zh": "cmn", "hi": "hin", "id": "ind", "ms": "zlm", "fr": "fra", "de": "deu", "es": "spa",
             "ru": "rus", "ja": "jpn", "ko": "kor", "ar": "ara", "pt": "por", "it": "ita", "vi": "vie", "th": "tha"}
SPECIAL_TOKENS = ("<s>", "</s>", "<unk>")


class CTCVocabulary:
    """id -> token table of one language; greedy CTC collapse (repeats merged, then blanks and specials dropped).

    Equal to transformers' `Wav2Vec2CTCTokenizer.decode(ids)` with the special-token strings removed; note that
    transformers 5's `skip_special_tokens=True` also drops the blank before merging repeats, which
    merges genuine double letters ("l<pad>l" -> "l"), so it is not used as the reference.
    """

    def __init__(self, token_to_id: dict, pad_token: str = "<pad>", word_delimiter: str = "|"):
        self.tokens = {int(i): t for t, i in token_to_id.items()}
        self.pad_id = int(token_to_id[pad_token])
        self.word_delimiter = word_delimiter

    def decode(self, ids) -> str:
        """Merges repeats, removes blanks and special tokens, turns word delimiters into spaces."""
        merged = [i for i, _ in itertools.groupby(map(int, ids))]
        chars = [self.tokens[i] for i in merged if i != self.pad_id and self.tokens.get(i) not in SPECIAL_TOKENS]
        text = "".join(" " if c == self.word_delimiter else c for c in chars)
        return " ".join(text.split())


@jax.jit
def _ctc_argmax(hidden, kernel, bias):
    """Greedy CTC ids (B, T) and logits (B, T, V) of the lm_head over encoder states."""
    logits = jnp.einsum("btd,dv->btv", hidden, kernel, preferred_element_type=jnp.float32) + bias
    return jnp.argmax(logits, -1), logits


class MMSASR:
    """MMS (wav2vec2 CTC) pipeline: `set_lang_detect_head(head)`, `predict(audio) -> (langs, texts)`."""

    def __init__(self, encoder: Wav2Vec2Encoder, lm_heads: dict, vocabularies: dict, languages=None,
                 iso3: dict | None = None, batch_size: int = 8):
        self.encoder, self.lm_heads, self.vocabularies = encoder, lm_heads, vocabularies
        self.iso3 = dict(ISO_639_3 if iso3 is None else iso3)
        self.batch_size = batch_size
        self._adapters = {None: self._adapter_values()}  # None: the adapter stored in the main weights
        self.languages = self._check_decodable(languages) if languages is not None else None
        self.head = None

    @classmethod
    def from_pretrained(cls, name_or_path: str, languages=None, *, iso3: dict | None = None,
                        batch_size: int = 8) -> "MMSASR":
        """Loads backbone, main `lm_head` and `vocab.json` of a Wav2Vec2ForCTC (MMS) checkpoint directory."""
        model_dir = loading.resolve_model_dir(name_or_path)
        encoder = Wav2Vec2Encoder.from_pretrained(model_dir)
        tensors = loading.load_state_dict(model_dir)
        if "lm_head.weight" not in tensors:
            raise ValueError(f"{name_or_path} has no lm_head: not a Wav2Vec2ForCTC checkpoint")
        with open(loading.resolve_file(model_dir, "vocab.json")) as f:
            vocab = json.load(f)
        nested = all(isinstance(v, dict) for v in vocab.values())
        vocabularies = {k: CTCVocabulary(v) for k, v in vocab.items()} if nested else {None: CTCVocabulary(vocab)}
        lm_heads = {None: (jnp.asarray(tensors["lm_head.weight"].T), jnp.asarray(tensors["lm_head.bias"]))}
        return cls(encoder, lm_heads, vocabularies, languages, iso3, batch_size)

    @property
    def decodable_languages(self) -> tuple[str, ...]:
        """ISO-639-1 codes whose ISO-639-3 code has a vocabulary in `vocab.json`."""
        return tuple(sorted(c for c, c3 in self.iso3.items() if c3 in self.vocabularies))

    def _check_decodable(self, languages) -> tuple[str, ...]:
        unknown = sorted(set(languages) - set(self.decodable_languages))
        if unknown:
            raise ValueError(f"language(s) {unknown} cannot be decoded by this MMS checkpoint (no vocabulary/adapter "
                             f"for their ISO-639-3 codes; mapping: {self.iso3})")
        return tuple(sorted(languages))

    def set_lang_detect_head(self, head) -> None:
        """Uses `head` (on masked-mean-pooled backbone states, main adapter) to pick each clip's language."""
        self._check_decodable(head.languages)
        if head.embedding_dim != self.encoder.config.hidden_size:
            raise ValueError(f"head embedding dim {head.embedding_dim} != encoder hidden size "
                             f"{self.encoder.config.hidden_size}")
        self.head = head

    def _adapter_values(self) -> dict:
        return {path: var.get_value() for path, var in nnx.iter_graph(self.encoder)
                if isinstance(var, nnx.Param) and "adapter_layer" in path}

    def use_language(self, language: str | None) -> None:
        """Swaps in the adapter and `lm_head` of an ISO-639-1 language (None: the checkpoint's own)."""
        code = None if language is None else self.iso3[language]
        if code not in self._adapters:
            try:
                file = loading.resolve_file(self.encoder.source, f"adapter.{code}.safetensors")
            except FileNotFoundError:
                file = loading.resolve_file(self.encoder.source, f"adapter.{code}.bin")
            self.encoder.load_adapter(file)
            self._adapters[code] = self._adapter_values()
            tensors = loading.load_tensor_file(file)
            self.lm_heads[code] = (jnp.asarray(tensors["lm_head.weight"].T), jnp.asarray(tensors["lm_head.bias"]))
        values = self._adapters[code]
        for path, var in nnx.iter_graph(self.encoder):
            if path in values:
                var.set_value(values[path])
        self._active = code

    def _run(self, clips: list[np.ndarray]):
        """Encoder states and frame masks of clips padded to a whole second (fixed batch size)."""
        length = int(np.ceil(max(len(c) for c in clips) / SAMPLE_RATE) * SAMPLE_RATE)
        mask = np.zeros((len(clips), length), bool)
        audio = np.zeros((len(clips), length), np.float32)
        for i, c in enumerate(clips):
            audio[i, : len(c)], mask[i, : len(c)] = normalize(c), True
        hidden = self.encoder(audio, attention_mask=mask)
        return hidden, self.encoder.frame_mask(mask, hidden.shape[1])

    def logits(self, clips, language: str | None = None) -> np.ndarray:
        """CTC logits (B, T, V) of 16 kHz clips under `language`'s adapter and lm_head (padded frames included)."""
        self.use_language(language)
        hidden, _ = self._run(as_clip_list(clips, SAMPLE_RATE))
        return np.asarray(_ctc_argmax(hidden, *self.lm_heads[self._active])[1])

    def transcribe(self, clips: list[np.ndarray], language: str | None) -> list[str]:
        """Greedy CTC transcripts of validated clips, all in `language`."""
        self.use_language(language)
        vocab = self.vocabularies[self._active if self._active in self.vocabularies else None]
        texts = {}
        for idx, rows in padded_batches(list(range(len(clips))), self.batch_size):
            hidden, frames = self._run([clips[r] for r in rows])
            ids = np.asarray(_ctc_argmax(hidden, *self.lm_heads[self._active])[0])
            frames = np.asarray(frames)
            for r, j in enumerate(idx):
                texts[j] = vocab.decode(ids[r][frames[r]])
        return [texts[j] for j in range(len(clips))]

    def detect_languages(self, clips: list[np.ndarray]) -> list[str]:
        """The head's language per clip on masked-mean-pooled states (the checkpoint's own adapter)."""
        if self.head is None:
            if self.languages is None or len(self.languages) != 1:
                raise ValueError("MMS has no language detection of its own: set a CLD head with "
                                 "set_lang_detect_head, or load with languages=[one language]")
            return [self.languages[0]] * len(clips)
        self.use_language(None)
        pooled = []
        for idx, rows in padded_batches(list(range(len(clips))), self.batch_size):
            hidden, frames = self._run([clips[r] for r in rows])
            pooled.append(np.asarray(pooling.masked_mean_pool(hidden, frames))[: len(idx)])
        return list(self.head.predict_languages(np.concatenate(pooled)))

    def predict(self, audio, sampling_rate: int = SAMPLE_RATE):
        """Languages and transcripts for one 16 kHz clip or a list -> (langs, texts); grouped by language."""
        clips = as_clip_list(audio, sampling_rate)
        langs = self.detect_languages(clips)
        texts = [""] * len(clips)
        for lang in sorted(set(langs)):
            idx = [i for i, x in enumerate(langs) if x == lang]
            for i, text in zip(idx, self.transcribe([clips[i] for i in idx], lang)):
                texts[i] = text
        return langs, texts
