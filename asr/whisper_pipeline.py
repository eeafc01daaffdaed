"""Whisper ASR with the language chosen by a CLD head (or by Whisper itself: the "vanilla" baseline).

Audio is cut into 30 s windows (overlapping when longer than 30 s), encoded once,
mean-pooled for the head (the CLD convention: all 1500 frames), decoded with the
prompt `<|startoftranscript|><|lang|><|transcribe|><|notimestamps|>` and merged.
Decoding follows the published CLD settings: repetition penalty 1.1 and
temperature fallback (0.0, 0.2, ..., 1.0) when the zlib compression ratio of a
window's text exceeds 1.35 or its average log-probability is below -1.0.

With a (`data`, `model`) mesh, encoder and decoder parameters are placed by the
logical-axis rules and every batch is split over `data` (the batch size is
rounded up to a multiple of it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from asr.generate import DecodeOptions, generate
from asr.model import check_head
from asr.whisper_decoder import WhisperDecoder
from encoders import loading, pooling, runtime
from encoders.audio import SAMPLE_RATE, log_mel_spectrogram, pad_or_trim, validate_audio
from encoders.whisper import WhisperEncoder


@dataclasses.dataclass(frozen=True)
class WhisperDecodingConfig:
    """Decoding settings of the pipeline (defaults: the published CLD pipeline)."""

    max_new_tokens: int = 224  # at most the decoder's positions minus the 4 prompt tokens
    num_beams: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.1
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    compression_ratio_threshold: float | None = 1.35
    logprob_threshold: float | None = -1.0
    chunk_seconds: float = 30.0
    overlap_seconds: float = 5.0
    batch_size: int = 8


class WhisperTokens:
    """Special-token ids (from `generation_config.json`) and text decoding for a Whisper checkpoint.

    Text comes from the checkpoint's transformers tokenizer files when present,
    else from openai-whisper's bundled tiktoken vocabularies (same ids).
    """

    def __init__(self, generation: dict, decode_fn, vocab_size: int):
        self.multilingual = bool(generation.get("is_multilingual", "lang_to_id" in generation))
        required = ("no_timestamps_token_id", "decoder_start_token_id", "eos_token_id")
        missing = [k for k in required + (("lang_to_id", "task_to_id") if self.multilingual else ()) if k not in generation]
        if missing:
            raise ValueError(f"generation config lacks {missing}: not a Whisper checkpoint's generation_config.json")
        self.sot = int(generation["decoder_start_token_id"])
        eos = generation["eos_token_id"]
        self.eot = int(eos[0] if isinstance(eos, list) else eos)
        self.no_timestamps = int(generation["no_timestamps_token_id"])
        if self.multilingual:
            self.transcribe = int(generation["task_to_id"]["transcribe"])
            self.lang_to_id = {k.strip("<|>"): int(v) for k, v in generation["lang_to_id"].items()}
        else:  # English-only checkpoints (*.en): no language or task token in the prompt
            self.transcribe, self.lang_to_id = None, {"en": None}
        self.suppress_tokens = tuple(int(t) for t in generation.get("suppress_tokens") or ())
        self.begin_suppress_tokens = tuple(int(t) for t in generation.get("begin_suppress_tokens") or ())
        self.vocab_size = vocab_size
        self._decode = decode_fn

    @classmethod
    def from_model_dir(cls, model_dir: str, vocab_size: int) -> "WhisperTokens":
        """Reads `generation_config.json` and a tokenizer from `model_dir`."""
        path = os.path.join(model_dir, "generation_config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{model_dir} has no generation_config.json (Whisper's special-token ids)")
        with open(path) as f:
            generation = json.load(f)
        if any(os.path.exists(os.path.join(model_dir, n)) for n in ("tokenizer.json", "vocab.json")):
            from transformers import WhisperTokenizer

            tok = WhisperTokenizer.from_pretrained(model_dir)
            return cls(generation, lambda ids: tok.decode(ids, skip_special_tokens=True), vocab_size)
        try:
            from whisper.tokenizer import get_tokenizer
        except ImportError as e:
            raise FileNotFoundError(f"{model_dir} has no tokenizer files; install openai-whisper for its bundled "
                                    "vocabularies or add the checkpoint's tokenizer.json") from e
        encoding = get_tokenizer(True, num_languages=vocab_size - 51766).encoding
        eot = int(generation["eos_token_id"])
        return cls(generation, lambda ids: encoding.decode([t for t in ids if t < eot]), vocab_size)

    def prompt(self, language: str) -> list[int]:
        """`<|startoftranscript|><|lang|><|transcribe|><|notimestamps|>` (English-only: without lang and task)."""
        if not self.multilingual:
            return [self.sot, self.no_timestamps]
        return [self.sot, self.lang_to_id[language], self.transcribe, self.no_timestamps]

    def decode(self, ids) -> str:
        """Text of generated token ids, special tokens removed."""
        return self._decode([int(t) for t in ids]).strip()


def compression_ratio(text: str) -> float:
    """UTF-8 length over zlib-compressed length (Whisper's repetition detector)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def merge_overlap(previous: list[int], current: list[int], min_match: int = 2) -> list[int]:
    """Appends `current` to `previous`, dropping the longest prefix of `current` that repeats a suffix of
    `previous` (the words decoded twice in the windows' overlap)."""
    for k in range(min(len(previous), len(current)), min_match - 1, -1):
        if previous[-k:] == current[:k]:
            return previous + current[k:]
    return previous + current


def split_windows(audio: np.ndarray, chunk_seconds: float, overlap_seconds: float) -> list[np.ndarray]:
    """Cuts audio into windows of at most `chunk_seconds` overlapping by `overlap_seconds`."""
    size = int(chunk_seconds * SAMPLE_RATE)
    step = size - int(overlap_seconds * SAMPLE_RATE)
    if step <= 0:
        raise ValueError("overlap_seconds must be shorter than chunk_seconds")
    starts = range(0, max(len(audio) - size, 0) + step, step) if len(audio) > size else [0]
    return [audio[s : s + size] for s in starts]


def as_clip_list(audio, sampling_rate: int) -> list[np.ndarray]:
    """One 16 kHz clip (1-D array) or a list of clips -> validated float32 clips."""
    if sampling_rate != SAMPLE_RATE:
        raise ValueError(f"expected {SAMPLE_RATE} Hz audio, got {sampling_rate} Hz; resample with "
                         "encoders.audio.prepare_audio(audio, sampling_rate)")
    clips = list(audio) if isinstance(audio, (list, tuple)) else [audio]
    if not clips:
        raise ValueError("no audio given")
    return [validate_audio(c) for c in clips]


def padded_batches(indices: list[int], batch_size: int):
    """Yields (indices, rows): consecutive groups of `indices` and the same padded to `batch_size` rows
    (the last index repeated), so every batch has one shape and one compilation."""
    for i in range(0, len(indices), batch_size):
        idx = indices[i : i + batch_size]
        yield idx, idx + [idx[-1]] * (batch_size - len(idx))


def per_clip_mean(values: np.ndarray, clip_of: list[int], n_clips: int) -> np.ndarray:
    """Averages per-window rows over the windows of each clip -> (n_clips, ...)."""
    clip_of = np.asarray(clip_of)
    return np.stack([values[clip_of == i].mean(0) for i in range(n_clips)])


@dataclasses.dataclass
class EncodedClips:
    """Encoder states of clips cut into 30 s windows: `states` (N windows, 1500, D), `clip_of` (window -> clip),
    `window_samples` (real samples per window) and the number of clips."""

    states: np.ndarray
    clip_of: list[int]
    window_samples: list[int]
    n_clips: int

    def select(self, clips: list[int]) -> "EncodedClips":
        """The windows of `clips` (repeats allowed), renumbered 0..len(clips)-1 in that order."""
        rows, clip_of = [], []
        for new, old in enumerate(clips):
            mine = [w for w, c in enumerate(self.clip_of) if c == old]
            rows += mine
            clip_of += [new] * len(mine)
        return EncodedClips(self.states[rows], clip_of, [self.window_samples[w] for w in rows], len(clips))


class WhisperASR:
    """Whisper encoder + decoder with CLD language selection; `predict(audio) -> (langs, texts)`.

    With `mesh`, the encoder's and decoder's parameters are placed on it (in place) and encoding, language
    detection and decoding run sharded: batches over `data`, heads / MLP / vocabulary over `model`.
    """

    def __init__(self, encoder: WhisperEncoder, decoder: WhisperDecoder, tokens: WhisperTokens,
                 languages=None, config: WhisperDecodingConfig = WhisperDecodingConfig(), mesh=None):
        self.encoder, self.decoder, self.tokens, self.config = encoder, decoder, tokens, config
        self.languages = self._check_decodable(languages) if languages is not None else None
        self.head = None
        self.encoder_name = None  # what the checkpoint was loaded as (compared with a head's metadata "encoder")
        self.mesh = mesh
        if mesh is not None:
            runtime.shard_model(encoder, mesh)
            runtime.shard_model(decoder, mesh)

    @classmethod
    def from_pretrained(cls, name_or_path: str, languages=None, *, dtype=jnp.float32,
                        config: WhisperDecodingConfig = WhisperDecodingConfig(), mesh=None) -> "WhisperASR":
        """Loads encoder, decoder and special tokens of a Whisper checkpoint (local directory or Hub id); with
        `mesh`, runs sharded on it (see the class)."""
        model_dir = loading.resolve_model_dir(name_or_path)
        decoder = WhisperDecoder.from_pretrained(model_dir, dtype=dtype)
        tokens = WhisperTokens.from_model_dir(model_dir, decoder.config.vocab_size)
        model = cls(WhisperEncoder.from_pretrained(model_dir, dtype=dtype), decoder, tokens, languages, config,
                    mesh)
        model.encoder_name = name_or_path
        return model

    @property
    def batch_size(self) -> int:
        """Rows per encoder / decoder batch: `config.batch_size` rounded up to a multiple of the `batch` axis."""
        return runtime.padded_size(self.config.batch_size, self.mesh)

    def _batches(self, n: int):
        """`padded_batches` of rows 0..n-1 at `batch_size`."""
        return padded_batches(list(range(n)), self.batch_size)

    def _place(self, rows: np.ndarray, names) -> jax.Array:
        """A host batch on the device(s): split by logical `names` over the mesh, if any."""
        if self.mesh is None:
            return jnp.asarray(rows)
        return runtime.place(rows, runtime.logical_sharding(self.mesh, names))

    @property
    def decodable_languages(self) -> tuple[str, ...]:
        """ISO-639-1 codes with a language token in this checkpoint."""
        return tuple(sorted(self.tokens.lang_to_id))

    def _check_decodable(self, languages) -> tuple[str, ...]:
        unknown = sorted(set(languages) - set(self.tokens.lang_to_id))
        if unknown:
            raise ValueError(f"language(s) {unknown} cannot be decoded by this Whisper checkpoint (no language token)")
        return tuple(sorted(languages))

    def set_lang_detect_head(self, head) -> None:
        """Uses `head` (a `heads.Head` on encoder states pooled over all 1500 frames, 'mean', or over the frames
        covering the audio, 'masked_mean') to pick the decoding language; see `asr.model.check_head`."""
        self._check_decodable(head.languages)
        check_head(head, embedding_dim=self.encoder.config.d_model, poolings={"mean": None, "masked_mean": None},
                   encoder_name=self.encoder_name, pipeline="Whisper")
        self.head = head

    def _encode(self, windows: list[np.ndarray]) -> np.ndarray:
        """Encoder states (N, 1500, D) of windows, in fixed-size batches (one compilation)."""
        mels = log_mel_spectrogram(np.stack([pad_or_trim(w) for w in windows]), self.encoder.config.num_mel_bins)
        with runtime.mesh_context(self.mesh):
            out = [runtime.to_host(self.encoder(self._place(mels[rows], ("batch", None, None))))[: len(idx)]
                   for idx, rows in self._batches(len(mels))]
        return np.concatenate(out)

    def encode(self, audio, sampling_rate: int = SAMPLE_RATE) -> EncodedClips:
        """Validates one 16 kHz clip or a list of clips, cuts them into (overlapping) windows and encodes them."""
        clips = as_clip_list(audio, sampling_rate)
        windows, clip_of = [], []
        for i, clip in enumerate(clips):
            parts = split_windows(clip, self.config.chunk_seconds, self.config.overlap_seconds)
            windows += parts
            clip_of += [i] * len(parts)
        return EncodedClips(self._encode(windows), clip_of, [len(w) for w in windows], len(clips))

    def pooled(self, encoded: EncodedClips, pooling_name: str = "mean") -> np.ndarray:
        """(n_clips, D) clip embeddings: each window pooled over all 1500 frames ('mean') or the frames covering
        its audio ('masked_mean'), then averaged over the clip's windows."""
        states = jnp.asarray(encoded.states)
        if pooling_name == "mean":
            pooled = pooling.mean_pool(states)
        else:
            mask = pooling.whisper_frame_mask(jnp.asarray(encoded.window_samples), states.shape[1])
            pooled = pooling.masked_mean_pool(states, mask)
        return per_clip_mean(np.asarray(pooled), encoded.clip_of, encoded.n_clips)

    def language_logprobs(self, encoded: EncodedClips, candidates) -> np.ndarray:
        """(n_clips, len(candidates)) Whisper's log-probabilities of the candidates' language tokens after
        `<|startoftranscript|>` (softmax over the whole vocabulary), averaged over each clip's windows."""
        ids = jnp.asarray([self.tokens.lang_to_id[c] for c in candidates])
        first = []
        with runtime.mesh_context(self.mesh):
            for idx, rows in self._batches(len(encoded.states)):
                states = self._place(encoded.states[rows], ("batch", "length", "embed"))
                logprobs = _first_step_logits(self.decoder, states, self.tokens.sot, ids)
                first.append(runtime.to_host(logprobs)[: len(idx)])
        return per_clip_mean(np.concatenate(first), encoded.clip_of, encoded.n_clips)

    def detect_languages(self, encoded: EncodedClips) -> list[str]:
        """One language per clip: the head on the clip's pooled windows (the head's pooling), else Whisper's own
        language token (restricted to `languages` when given)."""
        if self.head is not None:
            pooled = self.pooled(encoded, self.head.metadata.get("pooling", "mean"))
            return list(self.head.predict_languages(pooled))
        if not self.tokens.multilingual:
            return ["en"] * encoded.n_clips
        candidates = self.languages or self.decodable_languages
        return [candidates[j] for j in self.language_logprobs(encoded, candidates).argmax(1)]

    def transcribe(self, encoded: EncodedClips, langs: list[str]) -> list[str]:
        """Transcripts of encoded clips decoded in the given languages (one per clip), windows merged."""
        self._check_decodable(set(langs))
        window_ids = self._decode_windows(encoded.states, [langs[c] for c in encoded.clip_of])
        merged: list[list[int]] = [[] for _ in range(encoded.n_clips)]
        for c, ids in zip(encoded.clip_of, window_ids):
            merged[c] = merge_overlap(merged[c], ids)
        return [self.tokens.decode(ids) for ids in merged]

    def _decode_windows(self, states: np.ndarray, langs: list[str]) -> list[list[int]]:
        """Token ids per window with temperature fallback (compression ratio / average log-probability)."""
        cfg = self.config
        result: list[list[int] | None] = [None] * len(states)
        pending = list(range(len(states)))
        for t_index, temperature in enumerate(cfg.temperatures):
            last = t_index == len(cfg.temperatures) - 1
            beams = cfg.num_beams if temperature == 0 else 1
            opts = DecodeOptions(min(cfg.max_new_tokens, self.decoder.config.max_target_positions - 4), self.tokens.eot, beams, cfg.length_penalty,
                                 self.tokens.suppress_tokens, self.tokens.begin_suppress_tokens)
            retry = []
            for idx, rows in padded_batches(pending, self.batch_size):
                out = generate(self.decoder, states[rows], np.array([self.tokens.prompt(langs[j]) for j in rows]),
                               opts, repetition_penalty=cfg.repetition_penalty, temperature=temperature,
                               seed=t_index, mesh=self.mesh)
                for r, j in enumerate(idx):
                    ids = out.tokens[r, : out.lengths[r]].tolist()
                    text = self.tokens.decode(ids)
                    too_repetitive = (cfg.compression_ratio_threshold is not None
                                      and compression_ratio(text) > cfg.compression_ratio_threshold)
                    too_unlikely = (cfg.logprob_threshold is not None
                                    and out.sum_logprobs[r] / (out.lengths[r] + 1) < cfg.logprob_threshold)
                    if result[j] is None or not (too_repetitive or too_unlikely) or last:
                        result[j] = ids
                    if (too_repetitive or too_unlikely) and not last:
                        retry.append(j)
            pending = retry
            if not pending:
                break
        return result

    def predict(self, audio, sampling_rate: int = SAMPLE_RATE):
        """Languages and transcripts for one 16 kHz clip or a list of clips -> (langs, texts), lists."""
        encoded = self.encode(audio, sampling_rate)
        langs = self.detect_languages(encoded)
        return langs, self.transcribe(encoded, langs)


@nnx.jit
def _first_step_logits(decoder, states, sot, language_ids):
    """Log-probabilities of the language tokens after `<|startoftranscript|>` (Whisper's language detection)."""
    logits = decoder(jnp.full((states.shape[0], 1), sot, jnp.int32), states)[:, 0]
    return jax.nn.log_softmax(logits, axis=-1)[:, language_ids]
