"""Compositional domain adaptation of real whisper-base by merging: two shifts learned apart, tested together.

Two distribution shifts are synthesised with espeak-ng (and sox) from English sentences (the CC0 sentences in
`../shared/corpora/sentences/en.txt` and the project's `experiments/data/tts_sentences/en.txt`), split into
disjoint train / dev / test sentence sets, with disjoint speaker pools for training and for dev / test:

- **A, speaker population** (child-like voices, read style): female and child-like espeak-ng variants at high
  pitch (75-99), normal rate (145-175 wpm), then shifted up 400-700 cents by sox's `pitch` effect (formants
  move with it, as with a shorter vocal tract).
- **B, speaking style** (adult voices, spontaneous style): male and female adult variants at normal pitch, fast
  rate (195-235 wpm), fillers (um, uh, you know, I mean, like, well), repetitions and false starts (a word's
  first letters, then the word) inserted into the text, with SSML pauses after fillers and false starts. The
  references are verbatim: they hold the fillers, repetitions and fragments.
- **A∩B** (the target: child-like voices in spontaneous style), never used by the merges, and **clean** (adult
  voices, read style, no sox) for forgetting.

whisper-base is fine-tuned three times from the same start on the same training sentences (`asr.finetune`):
SFT-A on A, SFT-B on B, and joint on A∩B (the upper bound), training the decoder's attention (self and cross;
`--trainable`), so the encoder stays the base's and every clip is encoded once (states cached under
`--output_dir`). The merges (`asr.merging`) combine SFT-A and SFT-B: linear (the average), task arithmetic,
TIES, DARE and DARE-TIES, and HSA at several head fractions with `select=layer` (each attention module keeps its
top heads) and `select=global` (heads ranked over all attention modules; the encoder's heads did not move, so
they rank last). Every merge's λ is chosen on the dev sets of A and B (mean WER; A∩B is never seen), then the
merged decoder is scored on the test sets. Decoding (`WhisperASR` over the cached states: forced English prompt,
the model's suppress tokens, no repetition penalty) is by default openai-whisper's `transcribe` strategy (greedy,
then temperatures 0.2 ... 1.0 for hypotheses whose compression ratio exceeds 2.4 or whose mean log-probability is
below -1: it stops the repetition loops greedy decoding of short fine-tuning runs falls into); WER uses `asr.metrics` with the basic normaliser (lower case, punctuation
removed; Whisper's English normaliser would delete the fillers the references hold).

Reported: WER on A∩B (95 % bootstrap interval over test utterances), on A, B and clean; the paired bootstrap
difference to task arithmetic on A∩B; the fraction of the gap between the better SFT and joint fine-tuning on
A∩B each row closes; DARE over `--dare_seeds` (mean and spread); merge wall times; the head-saliency heat map.
Everything is cached under `--output_dir` (clips' encoder states, fine-tuning checkpoints, hypotheses), so a
killed run resumes where it stopped.

    python -m experiments.bench.bench_merging --flagfile=experiments/configs/bench_merging.flags
    python -m experiments.bench.bench_merging --flagfile=experiments/configs/bench_merging.flags \
        --train_sentences=16 --dev_sentences=4 --test_sentences=4 --steps=2 --batch_size=4 --hsa_fractions=0.6 \
        --lam_grid=1.0 --ties_lam_grid=1.0 --dare_seeds=0 --output_dir=/tmp/bench_merging_smoke \
        --results_md=/tmp/bench_merging_smoke.md --heatmap_png=/tmp/bench_merging_smoke.png   # smoke run
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
from xml.sax.saxutils import escape

import jiwer
import numpy as np
from absl import app, flags
from tqdm.auto import tqdm

from asr import merging, metrics
from asr.finetune import FinetuneConfig, WhisperSeq2Seq, cache_encoder_states, finetune
from asr.whisper_pipeline import (
    EncodedClips,
    WhisperASR,
    WhisperDecodingConfig,
    WhisperTokens,
)
from encoders import loading
from encoders.input_pipeline import Example
from experiments.lib import plots, report, runtime_flags, tts

_MODEL = flags.DEFINE_string("model", "openai/whisper-base", "Whisper checkpoint (offline name or directory).")
_SENTENCES = flags.DEFINE_list("sentence_files", ["../shared/corpora/sentences/en.txt",
                                                  "experiments/data/tts_sentences/en.txt"],
                               "English sentence files, one sentence per line.")
_TRAIN = flags.DEFINE_integer("train_sentences", 150, "Training sentences (each rendered in A, B and A∩B).")
_DEV = flags.DEFINE_integer("dev_sentences", 36, "Dev sentences (rendered in A and B) for choosing λ.")
_TEST = flags.DEFINE_integer("test_sentences", 60, "Test sentences (rendered in A∩B, A, B and clean).")
_TRAINABLE = flags.DEFINE_string("trainable", "decoder_attention", "Trainable set of the fine-tunes (frozen encoder).")
_STEPS = flags.DEFINE_integer("steps", 60, "Fine-tuning steps per model.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Fine-tuning batch size (also the encoding and decoding batch).")
_LR = flags.DEFINE_float("learning_rate", 1e-4, "Peak AdamW learning rate.")
_LAM_GRID = flags.DEFINE_list("lam_grid", ["0.5", "0.75", "1.0"],
                              "λ grid of the summing merges (task arithmetic, DARE, HSA), chosen on dev.")
_TIES_LAM_GRID = flags.DEFINE_list("ties_lam_grid", ["1.0", "1.5", "2.0"],
                                   "λ grid of the disjoint-mean merges (TIES, DARE-TIES), chosen on dev.")
_TIES_DENSITY = flags.DEFINE_float("ties_density", 0.2, "TIES / DARE-TIES: fraction of task-vector entries kept.")
_DARE_DENSITY = flags.DEFINE_float("dare_density", 0.1, "DARE: keep probability of task-vector entries.")
_DARE_SEEDS = flags.DEFINE_list("dare_seeds", ["0", "1", "2"], "DARE / DARE-TIES seeds (λ chosen with the first).")
_HSA_FRACTIONS = flags.DEFINE_list("hsa_fractions", ["0.2", "0.4", "0.6", "0.8", "1.0"],
                                   "HSA head fractions (select=layer).")
_HSA_GLOBAL_FRACTIONS = flags.DEFINE_list("hsa_global_fractions", ["0.2", "0.4", "0.6"],
                                          "HSA head fractions with select=global (empty: none).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 96, "Decoding limit per clip.")
_DECODING = flags.DEFINE_enum("decoding", "fallback", ["fallback", "greedy"],
                              "fallback: openai-whisper's transcribe defaults (greedy, then temperatures 0.2..1.0 "
                              "where the compression ratio > 2.4 or the mean log-probability < -1); greedy: "
                              "temperature 0 only.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 2000, "Bootstrap resamples of the test utterances.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sentence split, voices, disfluencies and fine-tuning order.")
_OUTPUT = flags.DEFINE_string("output_dir", "outputs/bench_merging", "Cache: states, checkpoints, hypotheses.")
_RESULTS_MD = flags.DEFINE_string("results_md", "experiments/results/bench_merging.md", "Results table.")
_RESULTS_JSON = flags.DEFINE_string("results_json", "experiments/results/bench_merging.json", "Raw results.")
_HEATMAP = flags.DEFINE_string("heatmap_png", "experiments/results/bench_merging_saliency.png",
                               "Head-saliency heat map of SFT-A and SFT-B.")

# espeak-ng voices (voice+variant) of each speaker pool: training speakers never speak dev or test clips.
CHILD_VOICES = {"train": ["en-us+f1", "en+f2", "en-us+Annie", "en+Alicia"],
                "eval": ["en-us+f3", "en+f4", "en-us+Linda", "en+Andrea"]}
ADULT_VOICES = {"train": ["en-us+m1", "en+m3", "en-us+f2", "en+Andy"],
                "eval": ["en-us+m2", "en+m4", "en-us+f5", "en+Steph"]}
FILLERS = ("um", "uh", "you know", "I mean", "like", "well")
TEST_CONDITIONS = ("AB", "A", "B", "clean")


# --- the synthetic domains ------------------------------------------------------------------------------------------

def spontaneous(sentence: str, rng: np.random.Generator) -> tuple[str, str]:
    """(verbatim reference, SSML to speak) of `sentence` with fillers, repetitions and false starts inserted
    (each word: filler before it with p 0.12, repeated with p 0.08, false start with p 0.06; at least one)."""
    words = sentence.split()
    while True:
        reference, spoken, events = [], [], 0
        for i, word in enumerate(words):
            letters = "".join(c for c in word if c.isalpha())
            r = rng.random()
            if r < 0.12:
                filler = FILLERS[rng.integers(len(FILLERS))]
                reference.append(filler + ",")
                spoken.append(escape(filler) + ', <break time="250ms"/>')
                events += 1
            elif r < 0.20 and i + 1 < len(words):
                reference.append(word.rstrip(",.;:!?"))
                spoken.append(escape(word.rstrip(",.;:!?")))
                events += 1
            elif r < 0.26 and len(letters) >= 4:
                fragment = letters[: 2 + int(rng.integers(2))].lower()
                reference.append(fragment + "-")
                spoken.append(escape(fragment) + '- <break time="150ms"/>')
                events += 1
            reference.append(word)
            spoken.append(escape(word))
        if events:
            return " ".join(reference), " ".join(spoken)


@dataclasses.dataclass(frozen=True)
class Condition:
    """How one domain is spoken: voice pool, pitch and rate ranges, style, sox pitch shift (cents)."""

    child: bool
    spontaneous: bool

    def render(self, sentence: str, pool: str, k: int, rng: np.random.Generator) -> tuple[str, np.ndarray, str]:
        """(reference, 16 kHz audio, speaker) of the k-th clip of this condition from `pool` (train / eval)."""
        voices = (CHILD_VOICES if self.child else ADULT_VOICES)[pool]
        voice = voices[k % len(voices)]
        pitch = int(rng.integers(75, 100) if self.child else rng.integers(35, 60))
        speed = int(rng.integers(195, 236) if self.spontaneous else rng.integers(145, 176))
        if self.spontaneous:
            reference, spoken = spontaneous(sentence, rng)
        else:
            reference, spoken = sentence, escape(sentence)
        audio = tts.trim_silence(tts.synthesize(spoken, voice, speed, pitch, ssml=True))
        if self.child:
            audio = tts.shift_pitch(audio, float(rng.integers(400, 701)))
        return reference, audio, voice


CONDITIONS = {"A": Condition(child=True, spontaneous=False), "B": Condition(child=False, spontaneous=True),
              "AB": Condition(child=True, spontaneous=True), "clean": Condition(child=False, spontaneous=False)}
# split name -> (sentence set, speaker pool, conditions rendered)
SPLITS = {"train": ("train", "train", ("A", "B", "AB")), "dev": ("dev", "eval", ("A", "B")),
          "test": ("test", "eval", TEST_CONDITIONS)}


# --- cached per-clip data -------------------------------------------------------------------------------------------

def run_digest(*parts) -> str:
    """12 hex digits of the SHA-256 of `parts` as JSON: names cache entries by everything they depend on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _save_npy(path: str, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    report.atomic_write_bytes(path, buffer.getvalue())


def encoded_domain(model: WhisperSeq2Seq, name: str, sentences: list[str], pool: str, condition: Condition,
                   seed: int, cache: str) -> dict:
    """{"examples", "states"} of one split's condition: synthesised, encoded by the frozen encoder and cached
    (`cache/name-DIGEST.npy` + `.json`, the digest naming the model, sentences, speaker pool, condition and seed),
    so a re-run neither synthesises nor encodes again and a changed setting never reads stale clips."""
    digest = run_digest(_MODEL.value, name, sentences, pool, dataclasses.asdict(condition), seed)
    states_path, rows_path = (os.path.join(cache, f"{name}-{digest}.{ext}") for ext in ("npy", "json"))
    if not (os.path.exists(states_path) and os.path.exists(rows_path)):
        rng = np.random.default_rng([seed, sum(map(ord, name))])
        examples = []
        for k, sentence in enumerate(tqdm(sentences, desc=f"synthesising {name}", unit="clip")):
            reference, audio, voice = condition.render(sentence, pool, k, rng)
            examples.append(Example(id=f"{name}-{k:03d}", lang="en", text=reference, speaker=voice, audio=audio,
                                    num_samples=len(audio)))
        states = cache_encoder_states(model, examples, _BATCH.value, desc=f"encoding {name}")
        _save_npy(states_path, states)
        report.atomic_write_text(rows_path, json.dumps(
            [dict(id=e.id, text=e.text, speaker=e.speaker, num_samples=e.num_samples) for e in examples], indent=1))
    rows = json.load(open(rows_path))
    examples = [Example(id=r["id"], lang="en", text=r["text"], speaker=r["speaker"], num_samples=r["num_samples"])
                for r in rows]
    return dict(examples=examples, states=np.load(states_path, mmap_mode="r"))


def build_domains(model: WhisperSeq2Seq, cache: str) -> dict[str, dict]:
    """Every split's conditions ({"train_A": {...}, "dev_B": ..., "test_AB": ...})."""
    sentences = tts.split_sentences(tts.read_sentences(_SENTENCES.value),
                                {"train": _TRAIN.value, "dev": _DEV.value, "test": _TEST.value}, _SEED.value)
    domains = {}
    for split, (sentence_set, pool, conditions) in SPLITS.items():
        for condition in conditions:
            name = f"{split}_{condition}"
            domains[name] = encoded_domain(model, name, sentences[sentence_set], pool, CONDITIONS[condition],
                                           _SEED.value, cache)
    return domains


# --- models ---------------------------------------------------------------------------------------------------------

def set_decoder(model: WhisperSeq2Seq, state: dict[str, np.ndarray]) -> None:
    """Loads the decoder part of a full state dict (transformers names) into `model`."""
    loading.assign_params(model.decoder, {k.removeprefix("model.decoder."): v for k, v in state.items()
                                          if k.startswith("model.decoder.")})


def finetuned_state(model: WhisperSeq2Seq, base: dict, domain: dict, name: str, model_dir: str) -> tuple[dict, dict]:
    """(state dict, training info) of the base fine-tuned on one domain's cached states (resumable)."""
    set_decoder(model, base)
    config = FinetuneConfig(trainable=_TRAINABLE.value, steps=_STEPS.value, batch_size=_BATCH.value,
                            learning_rate=_LR.value, warmup_steps=max(1, _STEPS.value // 10),
                            cache_encoder_states=True, checkpoint_every=max(1, _STEPS.value // 3), seed=_SEED.value)
    result = finetune(model, domain["examples"], config, tokenizer_dir=model_dir, model_name=_MODEL.value,
                      checkpoint_dir=os.path.join(_OUTPUT.value, "finetune", name),
                      encoder_states=np.asarray(domain["states"]))
    info_path = os.path.join(_OUTPUT.value, "finetune", f"{name}.json")
    if result.info["resumed_from"] == 0:  # trained from scratch in this call: its cost is the run's
        info = {k: result.info[k] for k in ("compile_seconds", "run_seconds", "flops_per_step",
                                            "trainable_parameters", "steps", "losses")}
        report.atomic_write_text(info_path, json.dumps(info))
    elif os.path.exists(info_path):  # restored: report the cost measured when it was trained
        info = json.load(open(info_path))
    else:  # resumed mid-run by an older binary: this call's share only
        info = {k: result.info[k] for k in ("compile_seconds", "run_seconds", "flops_per_step",
                                            "trainable_parameters", "steps", "losses")}
    info["resumed_from"] = result.info["resumed_from"]
    return result.model.state_dict(), info


def decoding_config() -> WhisperDecodingConfig:
    """The `--decoding` settings (no repetition penalty: the references repeat words verbatim)."""
    fallback = _DECODING.value == "fallback"
    return WhisperDecodingConfig(max_new_tokens=_MAX_NEW_TOKENS.value, repetition_penalty=1.0,
                                 temperatures=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0) if fallback else (0.0,),
                                 compression_ratio_threshold=2.4 if fallback else None,
                                 logprob_threshold=-1.0 if fallback else None, batch_size=_BATCH.value)


def transcribe(model: WhisperSeq2Seq, tokens: WhisperTokens, states: np.ndarray) -> list[str]:
    """Transcripts of cached encoder states by `WhisperASR` decoding (forced English prompt, the model's suppress
    tokens, `--decoding`), the decoder being `model`'s current one."""
    pipeline = WhisperASR(model.encoder, model.decoder, tokens, ["en"], decoding_config())
    n = len(states)
    encoded = EncodedClips(np.asarray(states), list(range(n)), [pipeline.encoder.config.max_source_positions] * n, n)
    return pipeline.transcribe(encoded, ["en"] * n)


class Evaluator:
    """Hypotheses of decoder states on domains, cached per (row key, domain) under `--output_dir/hypotheses`."""

    def __init__(self, model: WhisperSeq2Seq, tokens: WhisperTokens, domains: dict):
        self.model, self.tokens, self.domains = model, tokens, domains
        self.cache = os.path.join(_OUTPUT.value, "hypotheses_" + run_digest(
            _DECODING.value, _MODEL.value, _SENTENCES.value, _TRAIN.value, _DEV.value, _TEST.value, _TRAINABLE.value,
            _STEPS.value, _BATCH.value, _LR.value, _SEED.value, _MAX_NEW_TOKENS.value))

    def hypotheses(self, key: str, state, domains) -> dict[str, list[str]]:
        """{domain: transcripts} by the decoder of `state` (a dict, or a callable making it, called only when
        some domain is not cached yet) under `key`."""
        paths = {d: os.path.join(self.cache, f"{key}.{d}.json") for d in domains}
        missing = [d for d, path in paths.items() if not os.path.exists(path)]
        if missing:
            set_decoder(self.model, state() if callable(state) else state)
            for d in missing:
                report.atomic_write_text(paths[d], json.dumps(
                    transcribe(self.model, self.tokens, self.domains[d]["states"]), indent=0))
        return {d: json.load(open(path)) for d, path in paths.items()}

    def wer(self, key: str, state, domains) -> dict[str, float]:
        """{domain: corpus WER (basic normaliser)} of `state`."""
        hyps = self.hypotheses(key, state, domains)
        return {d: metrics.wer([e.text for e in self.domains[d]["examples"]], hyps[d], language=None)
                for d in domains}


def utterance_errors(references: list[str], hypotheses: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(word errors, reference words) per utterance after the basic normaliser (summed: the corpus WER)."""
    errors, words = [], []
    for r, h in zip(references, hypotheses):
        r, h = metrics.normalize(r), metrics.normalize(h)
        out = jiwer.process_words(r, h)
        errors.append(out.substitutions + out.deletions + out.insertions)
        words.append(len(r.split()))
    return np.asarray(errors, float), np.asarray(words, float)


def bootstrap_interval(errors: np.ndarray, words: np.ndarray, resamples: np.ndarray, base=None) -> tuple[float, float]:
    """95 % percentile interval of the corpus WER (or, with `base` errors, of WER - base WER) over `resamples`
    (rows of utterance indices, shared by every row of the table: paired)."""
    delta = errors if base is None else errors - base
    values = delta[resamples].sum(1) / words[resamples].sum(1)
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


# --- the experiment -------------------------------------------------------------------------------------------------

def main(argv):
    runtime_flags.init()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    report.run_facts()
    began = time.perf_counter()
    model_dir = loading.resolve_model_dir(_MODEL.value)
    config = loading.load_config(model_dir)
    model = WhisperSeq2Seq.from_pretrained(model_dir)
    tokens = WhisperTokens.from_model_dir(model_dir, model.decoder.config.vocab_size)
    base = model.state_dict()
    domains = build_domains(model, os.path.join(_OUTPUT.value, "clips"))
    data_seconds = time.perf_counter() - began

    trained, train_info = {}, {}
    for name, domain in (("sft_A", "train_A"), ("sft_B", "train_B"), ("joint", "train_AB")):
        trained[name], train_info[name] = finetuned_state(model, base, domains[domain], name, model_dir)
    evaluator = Evaluator(model, tokens, domains)
    scores = merging.head_saliency(base, [trained["sft_A"], trained["sft_B"]], config)
    report.atomic_write_bytes(_HEATMAP.value, plots.plot_saliency(scores, ["SFT-A (child-like, read)",
                                                                           "SFT-B (adult, spontaneous)"]))

    finetunes = [trained["sft_A"], trained["sft_B"]]
    lam_grid = [float(x) for x in _LAM_GRID.value]
    ties_grid = [float(x) for x in _TIES_LAM_GRID.value]
    seeds = [int(s) for s in _DARE_SEEDS.value]
    # row label -> (method, settings without λ, λ grid); λ = None: no λ (linear)
    families = {"linear (average)": ("linear", {}, [None]),
                "task arithmetic": ("task_arithmetic", {}, lam_grid),
                f"TIES (density {_TIES_DENSITY.value:g})": ("ties", dict(density=_TIES_DENSITY.value), ties_grid),
                f"DARE (density {_DARE_DENSITY.value:g})": ("dare", dict(density=_DARE_DENSITY.value), lam_grid),
                f"DARE-TIES (density {_TIES_DENSITY.value:g})": ("dare_ties", dict(density=_TIES_DENSITY.value),
                                                                 ties_grid)}
    for f in _HSA_FRACTIONS.value:
        families[f"HSA layer, K={float(f):.0%}"] = ("hsa", dict(head_fraction=float(f), select="layer"), lam_grid)
    for f in _HSA_GLOBAL_FRACTIONS.value:
        families[f"HSA global, K={float(f):.0%}"] = ("hsa", dict(head_fraction=float(f), select="global"), lam_grid)

    def key(method, settings, lam, seed=None):
        parts = [method] + [f"{k}={v}" for k, v in sorted(settings.items())] + [f"lam={lam}"]
        return "_".join(parts + ([f"seed={seed}"] if seed is not None else []))

    def merged(method, settings, lam, seed):
        kw = dict(settings, **({} if lam is None else dict(lam=lam)), **({} if seed is None else dict(seed=seed)))
        return lambda: merging.merge(base, finetunes, method, config=config, **kw)

    chosen, dev_tables = {}, {}
    for label, (method, settings, grid) in tqdm(families.items(), desc="choosing λ on dev A+B", unit="method"):
        seed = seeds[0] if method in ("dare", "dare_ties") else None
        dev = {}
        for lam in grid:
            k = key(method, settings, lam, seed)
            dev[lam] = float(np.mean(list(evaluator.wer(k, merged(method, settings, lam, seed),
                                                        ("dev_A", "dev_B")).values())))
        dev_tables[label] = dev
        chosen[label] = min(grid, key=lambda lam: (dev[lam], lam if lam is not None else 0))

    rows = {"base (zero-shot)": [("base", base)], "SFT-A": [("sft_A", trained["sft_A"])],
            "SFT-B": [("sft_B", trained["sft_B"])], "joint on A∩B (upper bound)": [("joint", trained["joint"])]}
    for label, (method, settings, _) in families.items():
        lam = chosen[label]
        row_seeds = seeds if method in ("dare", "dare_ties") else [None]
        rows[label] = [(key(method, settings, lam, s), merged(method, settings, lam, s)) for s in row_seeds]
    merge_seconds = {}
    for label, (method, settings, _) in families.items():  # one timed merge per row, at its chosen λ
        start = time.perf_counter()
        rows[label][0][1]()
        merge_seconds[label] = time.perf_counter() - start

    references = {c: [e.text for e in domains[f"test_{c}"]["examples"]] for c in TEST_CONDITIONS}
    results = {}
    for label, variants in tqdm(rows.items(), desc="scoring the test sets", unit="row"):
        per_seed = []
        for k, state in variants:
            found = evaluator.hypotheses(k, state, [f"test_{c}" for c in TEST_CONDITIONS])
            hyps = {c: found[f"test_{c}"] for c in TEST_CONDITIONS}
            per_seed.append(dict(key=k, wer={c: metrics.wer(references[c], hyps[c]) for c in TEST_CONDITIONS},
                                 errors=utterance_errors(references["AB"], hyps["AB"])))
        results[label] = per_seed

    words = results["base (zero-shot)"][0]["errors"][1]
    resamples = np.random.default_rng(_SEED.value).integers(0, len(words), (_BOOTSTRAP.value, len(words)))
    mean_errors = {label: np.mean([s["errors"][0] for s in seeds_], 0) for label, seeds_ in results.items()}
    ab = {label: float(np.mean([s["wer"]["AB"] for s in seeds_])) for label, seeds_ in results.items()}
    best_sft = min(ab["SFT-A"], ab["SFT-B"])
    gap = best_sft - ab["joint on A∩B (upper bound)"]
    ta = mean_errors["task arithmetic"]

    def cell(label, condition):
        values = [s["wer"][condition] for s in results[label]]
        if len(values) == 1:
            return f"{100 * values[0]:.1f}"
        return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"

    lines = ["# Merging whisper-base adaptations for an unseen intersection of shifts (`bench_merging`)", "",
             f"{_MODEL.value}; A = child-like voices, read; B = adult voices, spontaneous; target A∩B = child-like "
             f"and spontaneous (never used by the merges); clean = adult, read. {_TRAIN.value} / {_DEV.value} / "
             f"{_TEST.value} disjoint train / dev / test sentences, disjoint training and evaluation speakers. "
             f"Fine-tuning: `{_TRAINABLE.value}`, {_STEPS.value} steps of {_BATCH.value} clips, AdamW peak "
             f"{_LR.value:g} (warm-up {max(1, _STEPS.value // 10)} steps, linear decay), seed {_SEED.value}. λ of "
             f"every merge chosen on dev A + dev B (mean WER). Decoding: {_DECODING.value} (see the binary's "
             "docstring), WER in % (basic normaliser, verbatim references with fillers).", "",
             "| model | λ | WER A∩B | 95 % CI | Δ vs task arithmetic on A∩B, 95 % CI | WER A | WER B | WER clean "
             "| SFT→joint gap closed |", "|---|---|---|---|---|---|---|---|---|"]
    for label in results:
        lo, hi = bootstrap_interval(mean_errors[label], words, resamples)
        dlo, dhi = bootstrap_interval(mean_errors[label], words, resamples, base=ta)
        lam = chosen.get(label)
        closed = f"{(best_sft - ab[label]) / gap:.0%}" if gap > 0 else "n/a (joint no better than SFT)"
        lines.append(f"| {label} | {'' if lam is None else f'{lam:g}'} | {cell(label, 'AB')} | "
                     f"{100 * lo:.1f}–{100 * hi:.1f} | {100 * dlo:+.1f} to {100 * dhi:+.1f} | {cell(label, 'A')} | "
                     f"{cell(label, 'B')} | {cell(label, 'clean')} | {closed} |")
    lines += ["", f"DARE and DARE-TIES rows: mean ± standard deviation over seeds {seeds} (λ chosen with seed "
              f"{seeds[0]}); their intervals use the per-utterance mean errors over seeds. Gap closed = (WER of the "
              "better SFT on A∩B − WER of the row) / (that − WER of joint fine-tuning); negative: worse than the "
              "better SFT. HSA global ranks heads over all attention modules, including the encoder's, which did "
              "not move (frozen encoder): at K the merge keeps the top K × all heads, all of them decoder heads.",
              "", "## λ on dev (mean WER of dev A and dev B, %)", "", "| merge | " + " | ".join(
                  f"λ={lam:g}" for lam in sorted(set(lam_grid) | set(ties_grid))) + " |",
              "|---|" + "---|" * len(set(lam_grid) | set(ties_grid))]
    for label, dev in dev_tables.items():
        if None in dev:
            continue
        lines.append(f"| {label} | " + " | ".join(f"{100 * dev[lam]:.1f}" if lam in dev else "" for lam in
                                                    sorted(set(lam_grid) | set(ties_grid))) + " |")
    lines += ["", "## Cost", "", "| step | seconds |", "|---|---|",
              f"| synthesise + encode every clip once (or read the cache) | {data_seconds:.0f} |"]
    for name, info in train_info.items():
        if info["flops_per_step"] is None:
            lines.append(f"| fine-tune {name}: not measured (trained by an earlier, interrupted run of this binary, "
                         "restored from its checkpoint) | n/a |")
            continue
        restored = " (measured when trained; restored from its checkpoint here)" if info["resumed_from"] else ""
        lines.append(f"| fine-tune {name}: compile / {len(info['losses'])} steps{restored} "
                     f"({info['flops_per_step'] / 1e9:.0f} GFLOP/step by XLA, {info['trainable_parameters']:,} "
                     f"trainable) | {info['compile_seconds']:.1f} / {info['run_seconds']:.0f} |")
    for label, seconds in merge_seconds.items():
        lines.append(f"| merge {label} (full state dicts, NumPy, one merge) | {seconds:.2f} |")
    lines += [f"| whole run | {time.perf_counter() - began:.0f} |", "",
              f"Head saliency of SFT-A and SFT-B: `{os.path.basename(_HEATMAP.value)}`.", ""]
    report.write_markdown(_RESULTS_MD.value, "\n".join(lines))
    raw = dict(chosen_lambda=chosen, dev_wer=dev_tables, train=train_info, merge_seconds=merge_seconds,
               test={label: [dict(key=s["key"], wer=s["wer"]) for s in seeds_] for label, seeds_ in results.items()})
    report.atomic_write_text(_RESULTS_JSON.value, json.dumps(raw, indent=1, default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
