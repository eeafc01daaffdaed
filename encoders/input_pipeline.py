"""CLD input data: manifests and saved Hugging Face datasets -> examples -> splits -> 16 kHz audio batches.

    ds = load_manifest("corpus/manifest.jsonl", languages=["en", "zh"], on_unknown_language="drop")
    train, valid, test = split(ds, data_seed=0)
    train = subsample_per_class(train, samples_per_class=100, data_seed=0)
    for batch in audio_pipeline(train.examples, batch_size=8): ...   # {"audio", "lengths", "ids", "valid"}

Loading decodes every clip once (soundfile: wav, flac, ogg/opus, mp3) to check it and record its
16 kHz length; unreadable, empty or non-finite clips are skipped, counted in `Dataset.stats` and
logged. All shuffles are seeded by `data_seed` and independent of the input row order (examples are
ordered by id first), so the same seed gives the same rows on every machine.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import os
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence

import grain
import jax
import numpy as np
import soundfile as sf
from absl import logging

from encoders import runtime
from encoders.audio import prepare_audio, validate_audio
from encoders.languages import check_language_codes

SPLITS = ("train", "valid", "test")
_AUDIO_COLUMNS = ("audio", "audio_path", "path")


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One labelled clip. Audio lives in `audio_path` (a file) or `audio` (encoded file bytes or a 16 kHz array)."""

    id: str
    lang: str
    text: str = ""
    accent: str = ""
    speaker: str = ""
    split: str | None = None
    heldout_accent: bool = False
    audio_path: str | None = None
    audio: bytes | np.ndarray | None = None
    num_samples: int = 0  # length at 16 kHz, recorded when loading


@dataclasses.dataclass
class Stats:
    """What loading kept and dropped: `skipped_corrupt` holds (source, error) pairs."""

    loaded: int = 0
    skipped_corrupt: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    dropped_unknown_language: int = 0
    per_language: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Dataset:
    """Examples with their label set (`languages`, in label-index order) and the loading stats."""

    examples: list[Example]
    languages: tuple[str, ...]
    stats: Stats

    def __len__(self) -> int:
        return len(self.examples)

    def subset(self, examples: list[Example]) -> "Dataset":
        """The same label set and stats over other examples."""
        return Dataset(examples, self.languages, self.stats)

    def labels(self) -> np.ndarray:
        """(n,) int32 index of each example's language in `languages`."""
        index = {lang: i for i, lang in enumerate(self.languages)}
        return np.array([index[e.lang] for e in self.examples], np.int32)


class CorruptAudioError(ValueError):
    """An audio file that cannot be decoded (unreadable, truncated, not audio) or decodes to no finite samples."""


def decode_audio(source) -> np.ndarray:
    """A file path or file-like object (wav, flac, ogg, mp3, ...) as validated 16 kHz mono float32.

    Raises CorruptAudioError when the file cannot be decoded or is empty or non-finite; any other error
    (a wrong argument, a bug) propagates.
    """
    try:
        audio, rate = sf.read(source, dtype="float32", always_2d=True)
    except (sf.SoundFileError, OSError) as err:  # libsndfile's decode errors, I/O errors of the file
        raise CorruptAudioError(f"cannot decode the audio ({type(err).__name__}: {err}); re-encode or drop the file") \
            from err
    try:
        mono = validate_audio(audio.mean(axis=1))  # a (T,) float32 array, so only its samples can fail
    except ValueError as err:
        raise CorruptAudioError(f"the decoded audio is unusable ({err}); re-encode or drop the file") from err
    return prepare_audio(mono, rate)


def read_audio(example: Example) -> np.ndarray:
    """The example's audio as 16 kHz mono float32."""
    if isinstance(example.audio, np.ndarray):
        return example.audio
    return decode_audio(example.audio_path if example.audio is None else io.BytesIO(example.audio))


def _probe_lengths(examples: Sequence[Example]) -> np.ndarray:
    """Decoded length of every example (-1: corrupt). With several JAX processes each decodes every
    process_count-th clip and the lengths are gathered, so no host reads the whole corpus."""
    count, index = jax.process_count(), jax.process_index()
    lengths = np.zeros(len(examples), np.int64)
    for k in range(index, len(examples), count):
        try:
            lengths[k] = len(read_audio(examples[k]))
        except CorruptAudioError:
            lengths[k] = -1
    if count > 1:  # every entry was set by exactly one process (the others left 0)
        lengths = runtime.gather_rows(lengths[None]).sum(axis=0)
    return lengths


def _build_dataset(examples: Iterable[Example], languages: Sequence[str] | None, on_unknown_language: str,
                   source: str) -> Dataset:
    """Language filter, duplicate-id check, audio check (each clip decoded once, its length recorded; split over
    processes), absent-language errors."""
    if on_unknown_language not in ("drop", "error"):
        raise ValueError(f"on_unknown_language must be 'drop' or 'error', got {on_unknown_language!r}")
    wanted = None if languages is None else set(check_language_codes(languages))
    stats, candidates, seen = Stats(), [], set()
    for ex in examples:
        if wanted is not None and ex.lang not in wanted:
            if on_unknown_language == "error":
                raise ValueError(f"{source}: example {ex.id!r} has language {ex.lang!r}, which is not in "
                                 f"languages={sorted(wanted)}; pass on_unknown_language='drop' to drop such rows")
            stats.dropped_unknown_language += 1
            continue
        if ex.id in seen:
            raise ValueError(f"{source}: duplicate example id {ex.id!r}")
        seen.add(ex.id)
        candidates.append(ex)
    kept = []
    for ex, num_samples in zip(candidates, _probe_lengths(candidates)):
        if num_samples < 0:
            try:  # the rare corrupt clip is read again here, for the same message on every process
                num_samples = len(read_audio(ex))
            except CorruptAudioError as err:
                stats.skipped_corrupt.append((ex.audio_path or ex.id, str(err)))
                logging.warning("skipping unreadable audio %s: %s", ex.audio_path or ex.id, err)
                continue
        kept.append(dataclasses.replace(ex, num_samples=int(num_samples)))
    stats.loaded = len(kept)
    stats.per_language = dict(sorted(Counter(e.lang for e in kept).items()))
    if languages is not None:
        absent = [lang for lang in languages if lang not in stats.per_language]
        if absent:
            raise ValueError(f"{source}: requested languages {absent} have no (readable) examples; "
                             f"present: {sorted(stats.per_language)}")
    logging.info("%s: loaded %d clips %s, skipped %d unreadable, dropped %d of other languages", source,
                 stats.loaded, stats.per_language, len(stats.skipped_corrupt), stats.dropped_unknown_language)
    return Dataset(kept, tuple(languages) if languages is not None else tuple(stats.per_language), stats)


def _read_rows(path: str) -> list[dict]:
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    raise ValueError(f"manifest must be .jsonl or .csv, got {path}")


def _as_bool(value) -> bool:
    return value is True or str(value).strip().lower() in ("1", "true", "yes")


def load_manifest(path: str, languages: Sequence[str] | None = None,
                  on_unknown_language: str = "error") -> Dataset:
    """Loads a JSONL or CSV manifest of audio files (paths relative to the manifest).

    Columns: audio (or audio_path / path), lang; optional text, accent, speaker, split (train/valid/test),
    heldout_accent, id (default: the audio path). With `languages`, rows of other languages raise
    (`on_unknown_language="error"`) or are dropped and counted (`"drop"`); a requested language with no
    readable clip raises.
    """
    root = os.path.dirname(os.path.abspath(path))

    def examples():
        for i, row in enumerate(_read_rows(path)):
            column = next((c for c in _AUDIO_COLUMNS if row.get(c)), None)
            if column is None or not row.get("lang"):
                raise ValueError(f"{path}: row {i} needs an audio path ({'/'.join(_AUDIO_COLUMNS)}) and a lang")
            yield Example(id=str(row.get("id") or row[column]), lang=row["lang"], text=row.get("text") or "",
                          accent=row.get("accent") or "", speaker=row.get("speaker") or "",
                          split=row.get("split") or None, heldout_accent=_as_bool(row.get("heldout_accent")),
                          audio_path=os.path.join(root, row[column]))

    return _build_dataset(examples(), languages, on_unknown_language, path)


def load_hf_dataset(path: str, languages: Sequence[str] | None = None, on_unknown_language: str = "error") -> Dataset:
    """Loads a Hugging Face `DatasetDict` saved with `save_to_disk` in the CLD layout.

    Splits train/valid/test ("validation" is read as valid); columns audio (an `Audio` feature or
    {"array", "sampling_rate"}), lang, text, accent, optional speaker and id. Needs `pip install datasets`.
    """
    try:
        import datasets
    except ImportError as err:
        raise ImportError("load_hf_dataset needs Hugging Face datasets: pip install datasets") from err
    saved = datasets.load_from_disk(path)
    if not isinstance(saved, datasets.DatasetDict):
        raise ValueError(f"{path} holds a single Dataset; the CLD layout is a DatasetDict with splits {SPLITS}")

    def examples():
        for split_name, table in saved.items():
            split_name = "valid" if split_name == "validation" else split_name
            if isinstance(table.features.get("audio"), datasets.Audio):
                table = table.cast_column("audio", datasets.Audio(decode=False))  # decoded here, with soundfile
            for i, row in enumerate(table):
                audio = row["audio"]
                if "array" in audio:
                    audio_path, audio = None, prepare_audio(np.asarray(audio["array"]), audio["sampling_rate"])
                else:
                    audio_path, audio = audio.get("path"), audio.get("bytes")
                yield Example(id=str(row.get("id") or f"{split_name}/{i}"), lang=row["lang"],
                              text=row.get("text") or "", accent=row.get("accent") or "",
                              speaker=row.get("speaker") or "", split=split_name,
                              heldout_accent=_as_bool(row.get("heldout_accent")), audio_path=audio_path, audio=audio)

    return _build_dataset(examples(), languages, on_unknown_language, path)


def _rng(data_seed: int, lang: str) -> np.random.Generator:
    """Per-language generator, so one language's draw does not depend on which others are present."""
    return np.random.default_rng([data_seed, zlib.crc32(lang.encode())])


def _by_language(ds: Dataset, examples: Iterable[Example]) -> dict[str, list[Example]]:
    """Examples of each language of `ds.languages`, ordered by id."""
    groups = {lang: [] for lang in ds.languages}
    for ex in sorted(examples, key=lambda e: e.id):
        groups[ex.lang].append(ex)
    return groups


def split(ds: Dataset, data_seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
          ) -> tuple[Dataset, Dataset, Dataset]:
    """(train, valid, test) without held-out-accent clips (see `heldout_accent_test`).

    Uses the examples' split column when every example has one; when none has, draws a per-language
    (stratified) split with `fractions`, seeded by `data_seed`. A partial split column raises.
    """
    pool = [e for e in ds.examples if not e.heldout_accent]
    given = {e.split for e in pool}
    if given <= set(SPLITS):
        parts = {name: [e for e in pool if e.split == name] for name in SPLITS}
    elif given == {None}:
        parts = {name: [] for name in SPLITS}
        for lang, group in _by_language(ds, pool).items():
            order = _rng(data_seed, lang).permutation(len(group))
            n_train, n_valid = (int(round(f * len(group))) for f in fractions[:2])
            for name, rows in zip(SPLITS, np.split(order, [n_train, n_train + n_valid])):
                parts[name] += [group[i] for i in rows]
    else:
        raise ValueError(f"split column must be one of {SPLITS} on every example or on none, "
                         f"got {sorted(map(str, given))}")
    return tuple(ds.subset(parts[name]) for name in SPLITS)


def heldout_accent_test(ds: Dataset) -> Dataset:
    """The clips of held-out accents (the accent-shift test set)."""
    return ds.subset([e for e in ds.examples if e.heldout_accent])


def subsample_per_class(ds: Dataset, samples_per_class: int, data_seed: int = 0, take_all: bool = False) -> Dataset:
    """`samples_per_class` random examples of every language in `ds.languages`, seeded by `data_seed`.

    The draw is a seeded permutation per language, so for one seed smaller subsets are prefixes of
    larger ones (100 of 500 of 1000). A language with fewer examples raises unless `take_all`, which
    keeps all of them; a language with none always raises.
    """
    kept = []
    for lang, group in _by_language(ds, ds.examples).items():
        if not group:
            raise ValueError(f"language {lang!r} has no examples to sample from")
        if len(group) < samples_per_class and not take_all:
            raise ValueError(f"language {lang!r} has {len(group)} examples, fewer than samples_per_class="
                             f"{samples_per_class}; pass take_all=True to keep all of them")
        kept += [group[i] for i in _rng(data_seed, lang).permutation(len(group))[:samples_per_class]]
    return ds.subset(kept)


def _collate(items: Sequence[tuple[int, str, np.ndarray, bool]], pad_to: int | None) -> dict:
    """Zero-pads clips to `pad_to` (default: the longest) into one batch dict."""
    clips = [a for _, _, a, _ in items]
    length = pad_to or max(len(a) for a in clips)
    long = [i for _, i, a, _ in items if len(a) > length]
    if long:
        raise ValueError(f"clips {long[:5]} are longer than pad_to={length} samples")
    audio = np.zeros((len(clips), length), np.float32)
    for row, clip in zip(audio, clips):
        row[: len(clip)] = clip
    return {"audio": audio, "lengths": np.array([len(a) for a in clips], np.int32),
            "ids": np.array([i for _, i, _, _ in items], object), "valid": np.array([v for *_, v in items], bool),
            "index": np.array([k for k, *_ in items], np.int64)}


def process_records(n: int, batch_size: int, num_processes: int, process_index: int) -> list[tuple[int, bool]]:
    """(example position, valid) records process `process_index` reads when n examples are cut into global batches
    of `batch_size` rows, the last filled with repeats of the last example (valid=False): its contiguous
    batch_size / num_processes rows of every global batch, in order."""
    if batch_size % num_processes:
        raise ValueError(f"batch size {batch_size} does not split over {num_processes} processes; use a multiple")
    local = batch_size // num_processes
    padded = -(-n // batch_size) * batch_size
    rows = [(min(k, n - 1), k < n) for k in range(padded)]
    return [r for start in range(0, padded, batch_size)
            for r in rows[start + process_index * local: start + (process_index + 1) * local]]


def audio_pipeline(examples: Sequence[Example], batch_size: int, *, pad_to: int | None = None,
                   shuffle_seed: int | None = None, fill_last_batch: bool = False, num_threads: int = 2):
    """grain iterator of 16 kHz batches {"audio" (B, T) float32, "lengths", "ids", "valid", "index"} in example
    order ("index": each row's position in `examples`).

    Clips are zero-padded to `pad_to` samples (default: the longest in the batch). `shuffle_seed` shuffles the
    examples (grain, deterministic, the same order on every process). `fill_last_batch` repeats the last clip so
    every batch has `batch_size` rows, marking the repeats `valid=False`. With several JAX processes,
    `batch_size` is the global batch: each process reads and decodes only its own batch_size / process_count rows
    of every batch (grain `ShardByJaxProcess` over records laid out process-major), so every process yields the
    same number of equal batches; this needs `fill_last_batch`.
    """
    shard = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    if shard.shard_count > 1 and (not fill_last_batch or pad_to is None):
        raise ValueError("several JAX processes need equal batches of one shape: pass fill_last_batch=True and "
                         "pad_to")
    order = list(range(len(examples)))
    if shuffle_seed is not None:
        order = list(grain.MapDataset.source(order).shuffle(seed=shuffle_seed))
    if fill_last_batch:
        local = batch_size // shard.shard_count
        records = [(order[k], valid) for p in range(shard.shard_count)
                   for k, valid in process_records(len(order), batch_size, shard.shard_count, p)]
        per_process = len(records) // shard.shard_count
        dataset = grain.MapDataset.source(records)[shard.shard_index * per_process:(shard.shard_index + 1) * per_process]
    else:
        local = batch_size
        dataset = grain.MapDataset.source([(k, True) for k in order])
    read = lambda record: (record[0], examples[record[0]].id, read_audio(examples[record[0]]), record[1])  # noqa: E731
    dataset = dataset.map(read).batch(local, batch_fn=functools.partial(_collate, pad_to=pad_to))
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2)))
