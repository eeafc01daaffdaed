"""MMS CTC ASR: the `Wav2Vec2ForCTC` head over the `encoders` MMS backbone, with per-language adapters.

A CLD head picks each clip's language (ISO-639-1), mapped to the MMS adapter code
(ISO-639-3, configurable); clips are grouped by language, the adapter and the
language's `lm_head` are swapped in as parameter values (the compiled encoder is
reused: no recompilation per swap) and decoded by greedy CTC with the
language's vocabulary from `vocab.json` (nested by language); a language without its own
vocabulary raises rather than decoding with another's.

Memory and compilations are bounded: clips are cut into windows of `chunk_seconds` (30 s) that overlap by
2 x `context_seconds` (5 s), as transformers' ASR pipeline cuts them for CTC (`chunk_length_s`,
`stride_length_s`), and the frames of each window's middle are joined (`ctc_windows`); windows are padded to
one of `BUCKETS` lengths (the window and its halves, `length_buckets`), so the encoder compiles at most that
many shapes per batch size.
"""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from asr.model import check_head
from asr.whisper_pipeline import as_clip_list, padded_batches
from encoders import loading, pooling, runtime
from encoders.audio import SAMPLE_RATE, normalize
from encoders.wav2vec2 import Wav2Vec2Encoder

ISO_639_3 = {"en": "eng", "zh": "cmn", "hi": "hin", "id": "ind", "ms": "zlm", "fr": "fra", "de": "deu", "es": "spa",
             "ru": "rus", "ja": "jpn", "ko": "kor", "ar": "ara", "pt": "por", "it": "ita", "vi": "vie", "th": "tha"}
SPECIAL_TOKENS = ("<s>", "</s>", "<unk>")
CHUNK_SECONDS = 30.0  # window of long clips (transformers' `chunk_length_s`)
CONTEXT_SECONDS = 5.0  # audio on each side of a window's kept frames (its `stride_length_s`, chunk / 6 by default)
BUCKETS = 5  # padded lengths of a batch: the window and its halves


def length_buckets(window: int, count: int = BUCKETS) -> tuple[int, ...]:
    """Padded batch lengths in samples, ascending: `window` and its `count - 1` successive halves (rounded up).

    A batch pads to the smallest bucket that holds its longest window, so the encoder compiles at most `count`
    shapes and pads a batch to less than twice its length (or to the smallest bucket)."""
    return tuple(sorted({-(-window // 2**k) for k in range(count)}))


def ctc_windows(num_samples: int, window: int, context: int,
                samples_per_frame: int) -> list[tuple[int, int, int, int | None]]:
    """Windows of a clip for chunked CTC, cut as transformers' ASR pipeline cuts them: per window its (start, end)
    samples and the frames [first, stop) whose logits it contributes (stop None: up to its last frame).

    Windows of `window` samples start every `window - 2 * context` samples until one reaches the clip's end; each
    drops the frames of the `context` samples on a side it shares with a neighbour. With `window` and `context`
    multiples of `samples_per_frame` (the feature encoder's total stride) and `context` at least its receptive
    field, the kept frames tile the frames of the whole clip exactly; a clip of at most `window` samples is one
    window."""
    skip, windows, start = context // samples_per_frame, [], 0
    while True:
        last = start + window >= num_samples
        windows.append((start, min(start + window, num_samples), skip if start else 0,
                        None if last else (window - context) // samples_per_frame))
        if last:
            return windows
        start += window - 2 * context


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
                 iso3: dict | None = None, batch_size: int = 8, chunk_seconds: float = CHUNK_SECONDS,
                 context_seconds: float = CONTEXT_SECONDS, mesh=None):
        self.encoder, self.lm_heads, self.vocabularies = encoder, lm_heads, vocabularies
        self.mesh = mesh
        if mesh is not None:  # parameters by the rules table; every batch split over the `batch` axis
            runtime.shard_model(encoder, mesh)
            batch_size = runtime.padded_size(batch_size, mesh)
        self.iso3 = dict(ISO_639_3 if iso3 is None else iso3)
        self.batch_size = batch_size
        self.samples_per_frame = int(np.prod(encoder.config.conv_stride))
        self.window, self.context = (int(round(s * SAMPLE_RATE / self.samples_per_frame)) * self.samples_per_frame
                                     for s in (chunk_seconds, context_seconds))
        if self.context < encoder.min_samples or self.window <= 2 * self.context:
            raise ValueError(f"chunk_seconds={chunk_seconds} and context_seconds={context_seconds} give windows of "
                             f"{self.window} samples with {self.context} samples of context; the context must cover "
                             f"one frame ({encoder.min_samples} samples) and the window must exceed twice the "
                             "context: raise context_seconds, or chunk_seconds")
        self._adapters = {None: self._adapter_values()}  # None: the adapter stored in the main weights
        self.languages = self._check_decodable(languages) if languages is not None else None
        self.head = None
        self.encoder_name = None  # what the checkpoint was loaded as (compared with a head's metadata "encoder")

    @classmethod
    def from_pretrained(cls, name_or_path: str, languages=None, *, iso3: dict | None = None, batch_size: int = 8,
                        chunk_seconds: float = CHUNK_SECONDS, context_seconds: float = CONTEXT_SECONDS,
                        mesh=None) -> "MMSASR":
        """Loads backbone, main `lm_head` and `vocab.json` of a Wav2Vec2ForCTC (MMS) checkpoint directory; with
        `mesh`, the encoder runs sharded on it (batch over `data`, heads / MLP over `model`; the batch size is
        rounded up to a multiple of the `data` axis)."""
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
        model = cls(encoder, lm_heads, vocabularies, languages, iso3, batch_size, chunk_seconds, context_seconds, mesh)
        model.encoder_name = name_or_path
        return model

    @property
    def decodable_languages(self) -> tuple[str, ...]:
        """ISO-639-1 codes whose ISO-639-3 code has a vocabulary in `vocab.json`."""
        return tuple(sorted(c for c, c3 in self.iso3.items() if c3 in self.vocabularies))

    def _check_decodable(self, languages) -> tuple[str, ...]:
        unknown = sorted(set(languages) - set(self.decodable_languages))
        if unknown:
            raise ValueError(f"language(s) {unknown} cannot be decoded by this MMS checkpoint: vocab.json has no "
                             f"vocabulary for their ISO-639-3 codes (mapping: {self.iso3}), and another language's "
                             f"would give wrong text; use one of {list(self.decodable_languages)}, map the language "
                             "to a code of vocab.json with iso3=..., or use a checkpoint that has its vocabulary")
        return tuple(sorted(languages))

    def set_lang_detect_head(self, head) -> None:
        """Uses `head` (on masked-mean-pooled backbone states, main adapter) to pick each clip's language."""
        self._check_decodable(head.languages)
        check_head(head, embedding_dim=self.encoder.config.hidden_size, pipeline="MMS", encoder_name=self.encoder_name,
                   poolings={"masked_mean": None,
                             "mean": "the MMS pipeline pools each clip's own frames ('masked_mean'); the head's "
                                     "'mean' embeddings agree with that only if it was trained on unpadded clips"})
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
            if self.mesh is not None:
                runtime.shard_model(self.encoder, self.mesh)
            self._adapters[code] = self._adapter_values()
            tensors = loading.load_tensor_file(file)
            self.lm_heads[code] = (jnp.asarray(tensors["lm_head.weight"].T), jnp.asarray(tensors["lm_head.bias"]))
        values = self._adapters[code]
        for path, var in nnx.iter_graph(self.encoder):
            if path in values:
                var.set_value(values[path])
        self._active = code

    def _window_batches(self, clips: list[np.ndarray]):
        """Yields (keys, hidden, kept) per batch of `batch_size` normalised windows (`ctc_windows`) of the clips,
        padded to their `length_buckets` bucket: the (clip, window) of each real row, the encoder states (B, T, D)
        and the (B, T) mask of the frames each window contributes to its clip."""
        self.encoder.check_lengths([len(c) for c in clips], [f"clip {i}" for i in range(len(clips))])
        buckets = length_buckets(self.window)
        groups: dict[int, list] = {}
        for c, clip in enumerate(clips):
            for w, (start, end, first, stop) in enumerate(ctc_windows(len(clip), self.window, self.context,
                                                                      self.samples_per_frame)):
                bucket = next(b for b in buckets if b >= end - start)
                groups.setdefault(bucket, []).append(((c, w), clip[start:end], first, stop))
        for length, group in sorted(groups.items()):
            for idx, rows in padded_batches(list(range(len(group))), self.batch_size):
                audio = np.zeros((len(rows), length), np.float32)
                mask = np.zeros((len(rows), length), bool)
                for r, i in enumerate(rows):
                    samples = group[i][1]
                    audio[r, : len(samples)], mask[r, : len(samples)] = normalize(samples), True
                if self.mesh is None:
                    hidden = self.encoder(audio, attention_mask=mask)
                else:
                    self.encoder.check_lengths(mask.sum(-1))  # on the host: the placed mask may span processes
                    batch = runtime.logical_sharding(self.mesh, ("batch", None))
                    with runtime.mesh_context(self.mesh):
                        hidden = runtime.to_host(self.encoder(runtime.place(audio, batch),
                                                              attention_mask=runtime.place(mask, batch)))
                frames = np.asarray(self.encoder.frame_lengths(mask.sum(-1)))
                kept = np.zeros(hidden.shape[:2], bool)
                for r, i in enumerate(rows):
                    _, _, first, stop = group[i]
                    kept[r, first : frames[r] if stop is None else stop] = True
                yield [group[i][0] for i in idx], hidden, kept

    def _per_window(self, clips: list[np.ndarray], fn) -> list[list]:
        """Per clip, the rows `fn(hidden, kept)` gives its windows (in order) over `_window_batches`."""
        rows = {}
        for keys, hidden, kept in self._window_batches(clips):
            rows.update(zip(keys, fn(hidden, kept)))
        return [[rows[k] for k in group] for _, group in itertools.groupby(sorted(rows), key=lambda k: k[0])]

    def _joined_ctc(self, clips: list[np.ndarray], output: int) -> list[np.ndarray]:
        """Per clip, the active lm_head's greedy ids (output 0: (frames,)) or logits (1: (frames, V)) on the
        frames its windows contribute, joined."""
        kernel, bias = self.lm_heads[self._active]

        def kept_rows(hidden, kept):
            return [row[k] for row, k in zip(np.asarray(_ctc_argmax(hidden, kernel, bias)[output]), kept)]

        return [np.concatenate(windows) for windows in self._per_window(clips, kept_rows)]

    def _vocabulary(self, language: str | None) -> CTCVocabulary:
        """The CTC vocabulary of `language` (None: the checkpoint's own); never another language's."""
        if language is not None:
            self._check_decodable([language])
            return self.vocabularies[self.iso3[language]]
        if None not in self.vocabularies:
            raise ValueError(f"vocab.json is nested by language ({sorted(self.vocabularies)}) and has no vocabulary "
                             f"of the checkpoint's own lm_head: pass one of the languages {self.decodable_languages}")
        return self.vocabularies[None]

    def logits(self, clips, language: str | None = None) -> list[np.ndarray]:
        """CTC logits (frames, V) of each 16 kHz clip under `language`'s adapter and lm_head: its real frames, the
        windows of a long clip joined (`ctc_windows`)."""
        self.use_language(language)
        return self._joined_ctc(as_clip_list(clips, SAMPLE_RATE), 1)

    def transcribe(self, clips: list[np.ndarray], language: str | None) -> list[str]:
        """Greedy CTC transcripts of validated clips, all in `language`, with that language's vocabulary."""
        vocab = self._vocabulary(language)
        self.use_language(language)
        return [vocab.decode(ids) for ids in self._joined_ctc(clips, 0)]

    def pooled(self, clips: list[np.ndarray]) -> np.ndarray:
        """(n, hidden) embeddings of validated clips under the checkpoint's own adapter: the mean of the encoder
        states over the frames a clip's windows contribute, i.e. over its real frames ('masked_mean')."""
        self.use_language(None)

        def pooled_rows(hidden, kept):
            return list(zip(np.asarray(pooling.masked_mean_pool(hidden, kept)), kept.sum(1)))

        windows = self._per_window(clips, pooled_rows)
        return np.stack([np.average([m for m, _ in w], axis=0, weights=[n for _, n in w]) for w in windows]
                        ).astype(np.float32)

    def detect_languages(self, clips: list[np.ndarray]) -> list[str]:
        """The head's language per clip on its `pooled` embedding (the checkpoint's own adapter)."""
        if self.head is None:
            if self.languages is None or len(self.languages) != 1:
                raise ValueError("MMS has no language detection of its own: set a CLD head with "
                                 "set_lang_detect_head, or load with languages=[one language]")
            return [self.languages[0]] * len(clips)
        return list(self.head.predict_languages(self.pooled(clips)))

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
