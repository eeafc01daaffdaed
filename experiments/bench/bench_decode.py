"""Greedy Whisper decoding speed on real weights: ours (JAX) against transformers (PyTorch) and CTranslate2.

The same clips (espeak-ng speech from the shipped corpus, `experiments/data/tts_corpus/manifest.jsonl`,
2-4 s each, spread over `--languages` and their accents) are turned into 30 s log-mel windows once,
outside all timing, with `encoders.audio.log_mel_spectrogram`; every system then runs encoder + greedy
decoder from those same features, with the same forced prompt
`<|startoftranscript|><|lang|><|transcribe|><|notimestamps|>` (each clip's true language) and the same
limit of `--max_new_tokens` generated tokens:

- `ours`: `WhisperASR.from_pretrained(--model)` (float32) with temperatures=(0.0,), repetition_penalty=1.0 and
  no thresholds; its encoder, then `asr.generate.generate` with the pipeline's suppress / begin-suppress
  tokens (exactly what `WhisperASR` runs for one window at temperature 0);
- `transformers`: `WhisperForConditionalGeneration.generate` (float32, greedy, no timestamps) on the same
  weights (the Hugging Face directory `--model` resolves to);
- `ct2 float32` / `ct2 int8`: `ctranslate2.models.Whisper` (the engine of faster-whisper) on the original
  float16 CTranslate2 model.bin of `--model`, converted at load by `compute_type="float32"` / `"int8"`
  (int8 weights, float32 activations), `encode` + `generate(beam_size=1)` with its default suppression
  (the model config's suppress_ids; suppress_blank = `<|endoftext|>` and blank at the first step).

Token ids are compared with ours clip by clip. Each batch size runs a warm-up pass per system (ours: its
first call, which compiles, is reported separately), then `--rounds` timed rounds; within a round every
system processes all clips, in an order rotated from round to round. Speed-ups are computed round by round
(same round, same machine state) and reported as the median with the min-max spread.

    python -m experiments.bench.bench_decode --flagfile=experiments/configs/bench_decode.flags
    python -m experiments.bench.bench_decode --flagfile=experiments/configs/bench_decode.flags \
        --num_clips=2 --batch_sizes=1,2 --rounds=1 --results_md=/tmp/bench_decode_smoke.md   # smoke run
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import time

import numpy as np
from absl import app, flags

from experiments.lib import report, runtime_flags

FLAGS = flags.FLAGS


# --- clips ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Clip:
    id: str
    lang: str
    accent: str
    text: str
    seconds: float
    audio: np.ndarray


def select_clips(manifest: str, languages, num_clips: int, min_seconds: float, max_seconds: float,
                 exclude_accents=()) -> list[Clip]:
    """`num_clips` clips of `languages` (as equal a share each as possible) lasting [min, max] seconds, taken
    in turn from each accent (ids sorted), sentences not yet chosen first, so the choice is deterministic and
    spans the accents and the sentences."""
    from encoders.input_pipeline import decode_audio

    rows = [json.loads(line) for line in open(manifest) if line.strip()]
    base = os.path.dirname(os.path.abspath(manifest))
    chosen = []
    for k, lang in enumerate(languages):
        want = num_clips // len(languages) + (k < num_clips % len(languages))
        by_accent: dict[str, list[dict]] = {}
        for r in sorted(rows, key=lambda r: r["id"]):
            if r["lang"] == lang and r["accent"] not in exclude_accents and min_seconds <= r["seconds"] <= max_seconds:
                by_accent.setdefault(r["accent"], []).append(r)
        pool, texts, left = [], set(), [list(group) for _, group in sorted(by_accent.items())]
        while any(left) and len(pool) < want:  # each accent in turn: its first clip of a sentence not yet taken
            progress = False
            for group in left:
                new = next((r for r in group if r["text"] not in texts), None)
                if new is not None and len(pool) < want:
                    pool.append(new)
                    group.remove(new)
                    texts.add(new["text"])
                    progress = True
            if not progress:  # every sentence taken: repeat sentences, in the same turns
                texts.clear()
        if len(pool) < want:
            raise ValueError(f"{manifest}: only {len(pool)} {lang} clips of {min_seconds}-{max_seconds} s, need {want}")
        chosen += pool[:want]
    clips = []
    for r in chosen:
        audio = decode_audio(os.path.join(base, r["audio"]))
        clips.append(Clip(r["id"], r["lang"], r["accent"], r["text"], len(audio) / 16000, audio))
    return clips


# --- systems --------------------------------------------------------------------------------------------------------

class System:
    """One decoder under test. `run(mel, langs)` -> token ids per row (prompt and EOS excluded), synchronous;
    `encode(mel)` -> an encoder output handle (finished), `decode(handle, langs)` -> token ids."""

    name = ""

    def run(self, mel: np.ndarray, langs: list[str]) -> list[list[int]]:
        return self.decode(self.encode(mel), langs)


class Ours(System):
    name = "ours (JAX)"

    def __init__(self, model: str, max_new_tokens: int):
        from asr.generate import DecodeOptions
        from asr.whisper_pipeline import WhisperASR, WhisperDecodingConfig

        config = WhisperDecodingConfig(max_new_tokens=max_new_tokens, temperatures=(0.0,), repetition_penalty=1.0,
                                       compression_ratio_threshold=None, logprob_threshold=None)
        self.asr = WhisperASR.from_pretrained(model, config=config)
        tokens = self.asr.tokens
        # as WhisperASR._decode_windows builds them for temperature 0
        self.options = DecodeOptions(min(config.max_new_tokens, self.asr.decoder.config.max_target_positions - 4),
                                     tokens.eot, config.num_beams, config.length_penalty, tokens.suppress_tokens,
                                     tokens.begin_suppress_tokens)

    def encode(self, mel):
        import jax

        return jax.block_until_ready(self.asr.encoder(mel))

    def decode(self, states, langs):
        from asr.generate import generate

        cfg = self.asr.config
        out = generate(self.asr.decoder, states, np.array([self.asr.tokens.prompt(lang) for lang in langs]),
                       self.options, repetition_penalty=cfg.repetition_penalty, temperature=cfg.temperatures[0])
        return [out.tokens[r, : out.lengths[r]].tolist() for r in range(len(langs))]

    def run(self, mel, langs):  # no block between encoder and decoder, as in the pipeline
        return self.decode(self.asr.encoder(mel), langs)


class Transformers(System):
    name = "transformers (PyTorch)"

    def __init__(self, model: str, max_new_tokens: int, eot: int, prompt_of):
        import torch
        import transformers

        from encoders import loading

        transformers.logging.set_verbosity_error()  # per-call notices (max_length vs max_new_tokens, no mask:
        # the inputs are unpadded 30 s windows and equal-length prompts, so no attention mask is needed)
        self.torch = torch
        self.model = transformers.WhisperForConditionalGeneration.from_pretrained(
            loading.resolve_model_dir(model), dtype=torch.float32).eval()
        self.max_new_tokens, self.eot, self.prompt_of = max_new_tokens, eot, prompt_of

    def _strip(self, sequences, langs):
        out = []
        for row, lang in zip(sequences.tolist(), langs):
            prompt = self.prompt_of(lang)
            if row[: len(prompt)] == prompt:
                row = row[len(prompt):]
            if self.eot in row:
                row = row[: row.index(self.eot)]
            out.append(row)
        return out

    def _generate(self, langs, **inputs):
        with self.torch.inference_mode():
            return self.model.generate(**inputs, language=list(langs), task="transcribe", return_timestamps=False,
                                       do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens)

    def encode(self, mel):
        with self.torch.inference_mode():
            return self.model.model.encoder(self.torch.from_numpy(mel))

    def decode(self, encoder_outputs, langs):
        return self._strip(self._generate(langs, encoder_outputs=encoder_outputs), langs)

    def run(self, mel, langs):
        return self._strip(self._generate(langs, input_features=self.torch.from_numpy(mel)), langs)


class CTranslate2(System):
    def __init__(self, model: str, compute_type: str, threads: int, max_new_tokens: int, prompt_of):
        import ctranslate2

        from encoders import pretrained

        if model not in pretrained.OFFLINE_MODELS:
            raise ValueError(f"the CTranslate2 side needs an offline model ({sorted(pretrained.OFFLINE_MODELS)}), "
                             f"got {model!r}")
        data, files_dir, _ = pretrained.offline_model_bytes(model)  # SHA-256 checked
        files = {"model.bin": data}
        for name in ("config.json", "tokenizer.json", "vocabulary.json", "vocabulary.txt"):
            if os.path.exists(os.path.join(files_dir, name)):
                with open(os.path.join(files_dir, name), "rb") as f:
                    files[name] = f.read()
        self.ct2 = ctranslate2
        self.model = ctranslate2.models.Whisper(model, device="cpu", compute_type=compute_type,
                                                intra_threads=threads, inter_threads=1, files=files)
        self.name = f"ct2 {compute_type}"
        self.compute_type = self.model.compute_type
        # ctranslate2's Whisper generates at most max_length // 2 tokens (measured with 4.8.5: 60 -> 30,
        # 100 -> 50, 448 -> 224, prompt not counted; faster-whisper's 448 gives Whisper's 224), so twice the
        # limit gives the same `max_new_tokens` as the other systems; `decode` checks it
        self.max_length = 2 * max_new_tokens
        self.max_new_tokens = max_new_tokens
        self.prompt_of = prompt_of

    def encode(self, mel):
        return self.model.encode(self.ct2.StorageView.from_array(mel), to_cpu=False)

    def decode(self, features, langs):
        results = self.model.generate(features, [self.prompt_of(lang) for lang in langs], beam_size=1,
                                      max_length=self.max_length, suppress_blank=True, suppress_tokens=[-1])
        tokens = [list(r.sequences_ids[0]) for r in results]
        if max(map(len, tokens)) > self.max_new_tokens:
            raise RuntimeError(f"{self.name} generated {max(map(len, tokens))} tokens, over the limit of "
                               f"{self.max_new_tokens}: max_length={self.max_length} means something else here")
        return tokens

    def run(self, mel, langs):
        return self.decode(self.ct2.StorageView.from_array(mel), langs)


# --- timing ---------------------------------------------------------------------------------------------------------

def batches(n: int, batch: int):
    """Row indices of each batch over n clips; the last one padded with its last clip to `batch` rows."""
    for i in range(0, n, batch):
        idx = list(range(i, min(i + batch, n)))
        yield idx, idx + [idx[-1]] * (batch - len(idx))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def full_pass(system: System, mel, langs, batch: int, mode: str, handles=None):
    """(seconds, tokens per clip, first call seconds) of one pass over all clips; mode run / encode / decode."""
    tokens: list[list[int] | None] = [None] * len(langs)
    first, total, outs = None, 0.0, []
    for k, (idx, rows) in enumerate(batches(len(langs), batch)):
        m = np.ascontiguousarray(mel[rows])
        rl = [langs[j] for j in rows]
        if mode == "run":
            t, out = timed(lambda: system.run(m, rl))
        elif mode == "encode":
            t, out = timed(lambda: system.encode(m))
            outs.append(out)
        else:
            t, out = timed(lambda: system.decode(handles[k], rl))
        first = t if first is None else first
        total += t
        if mode != "encode":
            for r, j in enumerate(idx):
                tokens[j] = out[r]
    return total, (outs if mode == "encode" else tokens), first


def spread(values) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def bench_batch(systems: list[System], mel, langs, batch: int, rounds: int, splits: bool) -> dict:
    """Warm-up pass (first call kept), then `rounds` rotated rounds; per system the per-round seconds."""
    res = {s.name: dict(first=None, warmup=None, run=[], encode=[], decode=[], tokens=None, stable=True)
           for s in systems}
    handles = {}
    for s in systems:
        r = res[s.name]
        r["warmup"], r["tokens"], r["first"] = full_pass(s, mel, langs, batch, "run")
        print(f"batch {batch} {s.name}: first call {r['first']:.2f} s, warm-up pass {r['warmup']:.2f} s", flush=True)
        if splits:
            _, handles[s.name], r["first_encode"] = full_pass(s, mel, langs, batch, "encode")
            _, tok, r["first_decode"] = full_pass(s, mel, langs, batch, "decode", handles[s.name])
            r["stable"] &= tok == r["tokens"]
    for i in range(rounds):
        order = systems[i % len(systems):] + systems[: i % len(systems)]
        for s in order:
            r = res[s.name]
            t, tok, _ = full_pass(s, mel, langs, batch, "run")
            r["run"].append(t)
            r["stable"] &= tok == r["tokens"]
            if splits:
                t_enc, handles[s.name], _ = full_pass(s, mel, langs, batch, "encode")
                t_dec, tok, _ = full_pass(s, mel, langs, batch, "decode", handles[s.name])
                r["encode"].append(t_enc)
                r["decode"].append(t_dec)
                r["stable"] &= tok == r["tokens"]
        print(f"batch {batch} round {i + 1}/{rounds}: "
              + ", ".join(f"{s.name} {res[s.name]['run'][-1]:.2f} s" for s in systems), flush=True)
    return res


# --- report ---------------------------------------------------------------------------------------------------------


def _ratio(num, den) -> list[float]:
    return [a / b for a, b in zip(num, den)]


def _verdict(ratios, a: str, b: str) -> str:
    """Sentence from per-round ratios of b's time over a's time."""
    med, lo, hi = spread(ratios)
    word = "faster" if med > 1 else "slower"
    factor = med if med > 1 else 1 / med
    consistent = "in every round" if lo > 1 or hi < 1 else "but not in every round"
    return (f"{a} is {factor:.2f}x {word} than {b} (median over rounds of {b} s / {a} s = {med:.2f}, "
            f"range {lo:.2f}-{hi:.2f}; {word} {consistent})")


def espeak_version() -> str:
    try:
        out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
        return out.split("Data")[0].strip()
    except (OSError, subprocess.CalledProcessError):
        return "espeak-ng not installed"


def build_report(clips, results: dict, systems, threads: int, token_text, load_before) -> str:
    import ctranslate2
    import faster_whisper
    import torch
    import transformers

    ours = systems[0].name
    machine = report.machine(f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
                             f"transformers {transformers.__version__}", f"ctranslate2 {ctranslate2.__version__}",
                             f"faster-whisper {faster_whisper.__version__} (engine only)", espeak_version())
    audio_seconds = sum(c.seconds for c in clips)
    n = len(clips)
    limit = FLAGS.max_new_tokens
    lines = [
        f"# Greedy Whisper decoding on real weights ({FLAGS.model}): ours (JAX) vs transformers vs CTranslate2", "",
        f"- {n} espeak-ng clips from `{os.path.relpath(FLAGS.manifest)}` ({', '.join(FLAGS.languages)}; "
        f"{FLAGS.min_seconds:g}-{FLAGS.max_seconds:g} s, {audio_seconds:.1f} s of audio in all), each one 30 s "
        "log-mel window computed once with `encoders.audio.log_mel_spectrogram`, outside timing, and fed to "
        "every system.",
        "- Greedy decoding after `<|startoftranscript|><|lang|><|transcribe|><|notimestamps|>` (the clip's true "
        f"language), at most {limit} new tokens; Whisper's suppress tokens at every step, blank and "
        "`<|endoftext|>` at the first.",
        "- ours: `WhisperASR.from_pretrained` float32 with temperatures=(0.0,), repetition_penalty=1.0, no "
        "thresholds (`asr.generate.generate`); transformers: `WhisperForConditionalGeneration.generate` float32; "
        "ct2: `ctranslate2.models.Whisper` on the float16 model.bin, converted at load to "
        + " / ".join(f"`{s.compute_type}`" for s in systems if isinstance(s, CTranslate2))
        + " (`compute_type` float32 / int8), `encode` + `generate(beam_size=1)`.",
        f"- Threads: ctranslate2 intra_threads={threads}, inter_threads=1; torch.set_num_threads({threads}); JAX/XLA "
        "default (all cores).",
        f"- Per batch size: one warm-up pass per system (the first call is shown on its own: for ours it includes "
        f"jit compilation), then {FLAGS.rounds} timed round{'s' if FLAGS.rounds != 1 else ''}; in each round "
        f"every system decodes all {n} clips, "
        "in an order rotated round by round. Times are seconds for all clips: median (min-max over rounds). "
        "A last partial batch is padded with its last clip, for every system alike.",
        f"- Machine: {machine}. Load average (1, 5, 15 min) at the start: "
        f"{', '.join(f'{x:.2f}' for x in load_before)}; timings are only meaningful on an otherwise idle machine.",
        "",
    ]
    headline = []
    for batch, res in results.items():
        r0 = res[ours]
        lines += [f"## Batch {batch}", "",
                  "| system | first call s | warm-up pass s | end to end s | tokens/s | RTF | ours speed-up | "
                  + ("encoder s | decode s | " if FLAGS.splits else "")
                  + "same tokens as ours | mean tokens/clip | at limit |",
                  "|---|---|---|---|---|---|---|" + ("---|---|" if FLAGS.splits else "") + "---|---|---|"]
        for s in systems:
            r = res[s.name]
            toks = r["tokens"]
            ntok = sum(map(len, toks))
            med = statistics.median(r["run"])
            same = np.mean([a == b for a, b in zip(toks, r0["tokens"])])
            speedup = "1 (reference)" if s.name == ours else report.median_range(_ratio(r["run"], r0["run"]))
            split = f"{report.median_range(r['encode'])} | {report.median_range(r['decode'])} | " if FLAGS.splits else ""
            stable = "" if r["stable"] else " (varied between passes)"
            lines.append(f"| {s.name} | {r['first']:.2f} | {r['warmup']:.2f} | {report.median_range(r['run'])} | {ntok / med:.1f} | "
                         f"{med / audio_seconds:.3f} | {speedup} | {split}{same:.2f}{stable} | {ntok / n:.1f} | "
                         f"{sum(len(t) >= limit for t in toks)} |")
        lines.append("")
        pairs = [(ours, "ct2 float32"), ("ct2 int8", "ct2 float32"), (ours, "ct2 int8"),
                 (ours, "transformers (PyTorch)")]
        for a, b in pairs:
            if a in res and b in res:
                headline.append(f"- Batch {batch}: {_verdict(_ratio(res[b]['run'], res[a]['run']), a, b)}.")
    lines += ["## Speed, end to end (from these numbers)", "", *headline, ""]
    first = next(iter(results.values()))
    lines += ["## Transcripts (ours) and agreement", "",
              "| clip | lang | seconds | reference text | ours | " + " | ".join(s.name for s in systems[1:]) + " |",
              "|---|---|---|---|---|" + "---|" * (len(systems) - 1)]
    for i, c in enumerate(clips):
        agree = [("same" if first[s.name]["tokens"][i] == first[ours]["tokens"][i] else
                  f"differs: {token_text(first[s.name]['tokens'][i])}") for s in systems[1:]]
        lines.append(f"| {c.id} | {c.lang} | {c.seconds:.2f} | {c.text} | {token_text(first[ours]['tokens'][i])} | "
                     + " | ".join(a.replace("|", "/") for a in agree) + " |")
    lines += ["", "Columns: *first call s*: the first batch call of the warm-up pass (ours: jit compilation of the "
              "encoder and the decoding loop for this batch shape, plus one run); *warm-up pass s*: that whole first "
              "pass over all clips; *end to end s*: log-mel features to token ids, encoder + decoder, all clips, "
              "median (min-max) over rounds; *tokens/s*: generated tokens (EOS excluded) over the median time; "
              "*RTF*: median seconds per second of audio (clip durations, not the 30 s windows); *ours speed-up*: "
              "per round, this system's time over ours (>1: ours is faster), median (min-max); *encoder s* / "
              "*decode s*: the encoder alone, and greedy decoding from precomputed encoder outputs; *same tokens as "
              "ours*: fraction of clips whose greedy token ids equal ours exactly; *mean tokens/clip*: generated "
              "tokens per clip, EOS excluded; *at limit*: clips that reached the token limit without EOS. The "
              "transcript table is from the first batch size."]
    return "\n".join(lines)


# --- binary ---------------------------------------------------------------------------------------------------------

SYSTEMS = ("ours", "transformers", "ct2_float32", "ct2_int8")


def define_flags():
    """Defines the binary's flags (only when run as a program, so importing this module defines none)."""
    from experiments.lib.cld import EMBEDDED_CORPUS

    flags.DEFINE_string("model", "openai/whisper-base", "Whisper checkpoint (offline name for the CTranslate2 side).")
    flags.DEFINE_list("systems", list(SYSTEMS), f"Systems to compare, ours first; any of {', '.join(SYSTEMS)}.")
    flags.DEFINE_list("batch_sizes", ["1", "16"], "Batch sizes.")
    flags.DEFINE_integer("num_clips", 16, "Clips, shared as equally as possible among --languages.")
    flags.DEFINE_list("languages", ["en", "zh"], "Languages of the clips.")
    flags.DEFINE_string("manifest", EMBEDDED_CORPUS, "Clip manifest (the shipped espeak-ng corpus).")
    flags.DEFINE_float("min_seconds", 2.0, "Shortest clip.")
    flags.DEFINE_float("max_seconds", 4.0, "Longest clip.")
    flags.DEFINE_list("exclude_accents", ["yue"], "Accents left out (yue is Cantonese, not Mandarin).")
    flags.DEFINE_integer("max_new_tokens", 96, "Generated-token limit per clip, every system.")
    flags.DEFINE_integer("rounds", 3, "Timed rounds after the warm-up pass (sides rotated round by round).")
    flags.DEFINE_bool("splits", True, "Also time encoder-only and decode-only passes.")
    flags.DEFINE_integer("threads", 0, "ctranslate2 intra_threads and torch threads (0: the machine's core count).")
    flags.DEFINE_bool("quick", False, "Smoke run: 2 clips, batch sizes 1 and 2, 1 round.")
    flags.DEFINE_string("results_md", "experiments/results/bench_decode.md", "Markdown table.")


def main(argv):
    runtime_flags.init()
    del argv
    report.run_facts()  # the machine line of the stamp, GEMM rate measured before the work starts
    import torch

    if FLAGS.quick:
        FLAGS.num_clips, FLAGS.batch_sizes, FLAGS.rounds = 2, ["1", "2"], 1
    unknown = sorted(set(FLAGS.systems) - set(SYSTEMS))
    if unknown or not FLAGS.systems or FLAGS.systems[0] != "ours":
        raise app.UsageError(f"--systems must start with ours and name only {SYSTEMS}, got {FLAGS.systems}")
    if any(name.startswith("ct2") for name in FLAGS.systems) and FLAGS.max_new_tokens > 224:
        raise app.UsageError("ctranslate2's Whisper generates at most 224 tokens: --max_new_tokens must be <= 224")
    if FLAGS.rounds < 1:
        raise app.UsageError("--rounds must be at least 1")
    threads = FLAGS.threads or os.cpu_count()
    torch.set_num_threads(threads)

    from encoders.audio import log_mel_spectrogram, pad_or_trim

    clips = select_clips(FLAGS.manifest, FLAGS.languages, FLAGS.num_clips, FLAGS.min_seconds, FLAGS.max_seconds,
                         FLAGS.exclude_accents)
    langs = [c.lang for c in clips]
    ours = Ours(FLAGS.model, FLAGS.max_new_tokens)
    mel = np.ascontiguousarray(log_mel_spectrogram(np.stack([pad_or_trim(c.audio) for c in clips]),
                                                   ours.asr.encoder.config.num_mel_bins), np.float32)
    systems: list[System] = [ours]
    prompt_of = ours.asr.tokens.prompt
    for name in FLAGS.systems[1:]:
        if name == "transformers":
            systems.append(Transformers(FLAGS.model, ours.options.max_new_tokens, ours.asr.tokens.eot, prompt_of))
        else:
            systems.append(CTranslate2(FLAGS.model, name.split("_")[1], threads, ours.options.max_new_tokens,
                                       prompt_of))
    print(f"{len(clips)} clips ({sum(c.seconds for c in clips):.1f} s of audio); systems: "
          + ", ".join(s.name for s in systems), flush=True)
    load_before = os.getloadavg()
    start = time.perf_counter()
    results = {int(b): bench_batch(systems, mel, langs, int(b), FLAGS.rounds, FLAGS.splits) for b in FLAGS.batch_sizes}
    print(f"benchmark time {time.perf_counter() - start:.0f} s", flush=True)
    text = build_report(clips, results, systems, threads, ours.asr.tokens.decode, load_before)
    print(text)
    report.write_markdown(FLAGS.results_md, text)


if __name__ == "__main__":
    define_flags()
    app.run(main)
