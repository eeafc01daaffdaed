"""Encoder–projector–LLM ASR on real weights: a frozen whisper-base encoder, a trained projector, a frozen
SmolLM2-135M-Instruct (GGUF Q4_1), against whisper-base's own decoder on the same clips (`asr.llm_asr`).

    python -m experiments.train_llm_asr --flagfile=experiments/configs/train_llm_asr.flags

Data: English espeak-ng speech of the project's sentences and ../shared's (`--sentence_files`), one seeded
permutation cut into disjoint train / dev / test sentence sets. Training clips are spoken by every voice of
`--train_voices`; test clips by the first training voice (seen) and by `--heldout_voice` (never trained on).
Every clip is encoded once by the frozen encoder; its first `keep_frames` frames (the longest clip plus a margin:
the rest of Whisper's 30 s window is padding) are cached on disk with the resumable embedding cache
(`encoders.extraction.cached_rows`). Only the projector trains (`asr.llm_asr.train_projector`, checkpoints in
`--output_dir`; rerunning resumes). Both systems decode greedily: whisper-base with its forced English prompt
(no temperature fallback), the LLM after the chat prompt "Transcribe: " + audio. WER uses `asr.metrics` with
Whisper's English normaliser when installed. RTF = decoding wall time (encoder excluded, the same for both) /
audio duration; the encoder's own time is reported apart.

Writes `--results_md` (stamped table and model card), `--results_json`, `--loss_png` and the projector
(`--output_dir/projector.safetensors` + `projector.json`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
from absl import app, flags
from flax import nnx
from tqdm.auto import tqdm

from asr import llm, llm_asr, metrics
from asr.whisper_pipeline import WhisperASR, WhisperDecodingConfig
from encoders import extraction, runtime
from encoders.audio import SAMPLE_RATE
from encoders.input_pipeline import Example
from experiments.lib import plots, report, runtime_flags, tts

_ENCODER = flags.DEFINE_string("encoder", "openai/whisper-base", "Whisper checkpoint whose encoder is frozen.")
_LLM = flags.DEFINE_string("llm", "smollm2-135m-instruct-q4_1", "Frozen LLM: offline GGUF name, .gguf or HF dir.")
_SENTENCES = flags.DEFINE_list("sentence_files", ["../shared/corpora/sentences/en.txt",
                                                  "experiments/data/tts_sentences/en.txt"], "English sentences.")
_TRAIN = flags.DEFINE_integer("train_sentences", 170, "Training sentences.")
_DEV = flags.DEFINE_integer("dev_sentences", 16, "Dev sentences (loss and WER during the run).")
_TEST = flags.DEFINE_integer("test_sentences", 60, "Test sentences.")
_TRAIN_VOICES = flags.DEFINE_list("train_voices", ["en-us+m1", "en+f2", "en-us+f4"], "espeak-ng voices for training.")
_HELDOUT = flags.DEFINE_string("heldout_voice", "en+m3", "espeak-ng voice of the held-out test clips.")
_PROJECTOR = flags.DEFINE_enum("projector", "conv_mlp", list(llm_asr.PROJECTORS), "Projector kind.")
_STACK = flags.DEFINE_integer("stack", 5, "frame_stack: frames per LLM position.")
_HIDDEN = flags.DEFINE_integer("hidden_dim", 2048, "frame_stack: hidden width.")
_OUTPUT_NORM = flags.DEFINE_bool("output_norm", True, "RMSNorm on the projector output.")
_MARGIN = flags.DEFINE_integer("margin_frames", 8, "Encoder frames kept past the longest clip.")
_DEFAULTS = llm_asr.ProjectorTrainConfig()
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Global batch size.")
_LR = flags.DEFINE_float("learning_rate", _DEFAULTS.learning_rate, "Peak AdamW learning rate.")
_WARMUP = flags.DEFINE_integer("warmup_steps", 30, "Linear warm-up steps (cosine decay after).")
_CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", 50, "Steps between checkpoints.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Decoding limit per clip (both systems).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sentence split, the projector initialisation and batches.")
_OUTPUT = flags.DEFINE_string("output_dir", "outputs/llm_asr", "Run directory: cache, checkpoints, projector.")
_RESULTS_MD = flags.DEFINE_string("results_md", "experiments/results/llm_asr.md", "Results table.")
_RESULTS_JSON = flags.DEFINE_string("results_json", "experiments/results/llm_asr.json", "Raw results.")
_LOSS_PNG = flags.DEFINE_string("loss_png", "experiments/results/llm_asr_loss.png", "Loss curve.")


def synthesize_split(name: str, sentences: list[str], voices: list[str]) -> list[Example]:
    """Every sentence in every voice (rate 150-175 wpm, pitch 40-60, seeded by split and voice)."""
    out = []
    for voice in voices:
        rng = np.random.default_rng([_SEED.value, sum(map(ord, name + voice))])
        for k, text in enumerate(tqdm(sentences, desc=f"synthesising {name} ({voice})", unit="clip")):
            audio = tts.trim_silence(tts.synthesize(text, voice, int(rng.integers(150, 176)),
                                                    int(rng.integers(40, 61))))
            out.append(Example(id=f"{name}-{voice}-{k:03d}", lang="en", text=text, speaker=voice, audio=audio,
                               num_samples=len(audio)))
    return out


def encoded_frames(whisper: WhisperASR, examples: list[Example], keep: int) -> np.ndarray:
    """(N, keep, d_model) first encoder frames of every clip, cached and resumable under `--output_dir/frames`."""
    spec = dict(extraction.cache_spec(whisper.encoder, pooling="frames", pad_to=None), keep_frames=keep)

    def compute(shard, update):
        states = whisper.encode([e.audio for e in shard]).states[:, :keep]
        update(len(shard))
        return states.reshape(-1, states.shape[-1])

    rows = extraction.cached_rows(os.path.join(_OUTPUT.value, "frames"), spec, examples,
                                  extraction.example_keys(examples), 64, compute, desc="encoder frames",
                                  rows_per_item=[keep] * len(examples))
    return rows.reshape(len(examples), keep, -1)


def timed(fn):
    """(seconds, result) of fn()."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv):
    mesh = runtime_flags.init()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    report.run_facts()
    began = time.perf_counter()
    sentences = tts.split_sentences(tts.read_sentences(_SENTENCES.value),
                                {"train": _TRAIN.value, "dev": _DEV.value, "test": _TEST.value}, _SEED.value)
    if _HELDOUT.value in _TRAIN_VOICES.value:
        raise app.UsageError(f"--heldout_voice {_HELDOUT.value} is also a training voice")
    splits = {"train": synthesize_split("train", sentences["train"], _TRAIN_VOICES.value),
              "dev": synthesize_split("dev", sentences["dev"], _TRAIN_VOICES.value[:1]),
              "test_seen": synthesize_split("test", sentences["test"], _TRAIN_VOICES.value[:1]),
              "test_heldout": synthesize_split("test", sentences["test"], [_HELDOUT.value])}
    keep = llm_asr.keep_frames([e.num_samples for s in splits.values() for e in s], _MARGIN.value)
    greedy = WhisperDecodingConfig(max_new_tokens=_MAX_NEW.value, repetition_penalty=1.0, temperatures=(0.0,),
                                   compression_ratio_threshold=None, logprob_threshold=None, batch_size=8)
    whisper = WhisperASR.from_pretrained(_ENCODER.value, languages=["en"], config=greedy)
    encode_seconds, frames = timed(lambda: {name: encoded_frames(whisper, ex, keep) for name, ex in splits.items()})

    lm = llm.CausalLM.from_pretrained(_LLM.value)
    tokenizer = llm.load_tokenizer(_LLM.value)
    prompt = llm_asr.ChatPrompt.from_tokenizer(tokenizer)
    pconfig = llm_asr.ProjectorConfig(kind=_PROJECTOR.value, encoder_dim=whisper.encoder.config.d_model,
                                      llm_dim=lm.config.hidden_size, hidden_dim=_HIDDEN.value, stack=_STACK.value,
                                      output_norm=_OUTPUT_NORM.value)
    projector = llm_asr.Projector(pconfig, rngs=nnx.Rngs(_SEED.value))
    ids, mask = prompt.answer_tokens(tokenizer, [e.text for e in splits["train"]])
    tconfig = llm_asr.ProjectorTrainConfig(steps=_STEPS.value, batch_size=_BATCH.value, learning_rate=_LR.value,
                                           warmup_steps=_WARMUP.value, checkpoint_every=_CHECKPOINT_EVERY.value,
                                           seed=_SEED.value)
    run = dict(encoder=_ENCODER.value, llm=_LLM.value, keep_frames=keep, prompt=dataclasses.asdict(prompt),
               data=extraction.example_keys(splits["train"])[:3] + [len(splits["train"])])
    result = llm_asr.train_projector(lm, projector, prompt, frames["train"], ids, mask, tconfig,
                                     checkpoint_dir=os.path.join(_OUTPUT.value, "checkpoints"), run=run, mesh=mesh)
    info = result.info

    rows, hypotheses = {}, {}
    for name in ("dev", "test_seen", "test_heldout"):
        examples = splits[name]
        audio_seconds = sum(e.num_samples for e in examples) / SAMPLE_RATE
        refs = [e.text for e in examples]
        encoded = whisper.encode([e.audio for e in examples])
        whisper.transcribe(encoded.select(list(range(min(8, len(examples))))), ["en"] * min(8, len(examples)))
        w_seconds, w_hyps = timed(lambda: whisper.transcribe(encoded, ["en"] * len(examples)))
        batches = [frames[name][i: i + 8] for i in range(0, len(examples), 8)]
        pad = lambda b: np.concatenate([b, np.repeat(b[-1:], 8 - len(b), 0)])
        llm_asr.transcribe(lm, result.projector, prompt, pad(batches[0]), tokenizer,
                           max_new_tokens=_MAX_NEW.value)  # compiles
        l_seconds, l_hyps = timed(lambda: [t for b in batches for t in llm_asr.transcribe(
            lm, result.projector, prompt, pad(b), tokenizer, max_new_tokens=_MAX_NEW.value)[: len(b)]])
        rows[name] = dict(clips=len(examples), audio_seconds=audio_seconds,
                          whisper_wer=metrics.wer(refs, w_hyps, "en"), llm_wer=metrics.wer(refs, l_hyps, "en"),
                          whisper_rtf=w_seconds / audio_seconds, llm_rtf=l_seconds / audio_seconds)
        hypotheses[name] = [dict(id=e.id, reference=r, whisper=w, llm=h)
                            for e, r, w, h in zip(examples, refs, w_hyps, l_hyps)]
    if runtime.is_writer():
        write_outputs(result, info, rows, hypotheses, keep, encode_seconds, pconfig, tconfig,
                      time.perf_counter() - began, len(splits["train"]))


def write_outputs(result, info, rows, hypotheses, keep, encode_seconds, pconfig, tconfig, wall, train_clips):
    """The projector, the loss curve, the results table (stamped) and the raw results."""
    from safetensors.numpy import save

    params = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v.get_value())
              for path, v in nnx.iter_graph(result.projector) if isinstance(v, nnx.Param)}
    report.atomic_write_bytes(os.path.join(_OUTPUT.value, "projector.safetensors"), save(params))
    report.atomic_write_text(os.path.join(_OUTPUT.value, "projector.json"),
                             json.dumps(dict(projector=dataclasses.asdict(pconfig), keep_frames=keep), indent=1))
    report.atomic_write_bytes(_LOSS_PNG.value, plots.plot_losses(info["losses"], info["resumed_from"]))
    names = {"dev": "dev (seen voice)", "test_seen": "test, seen voice", "test_heldout": "test, held-out voice"}
    lines = ["# Encoder–projector–LLM ASR: whisper-base encoder + projector + SmolLM2-135M-Instruct", "",
             f"Frozen encoder `{_ENCODER.value}`, frozen LLM `{_LLM.value}`, projector `{pconfig.kind}` "
             f"({info['trainable_parameters']:,} trainable parameters; output RMSNorm: {pconfig.output_norm}); "
             f"{keep} of 1500 encoder frames kept. {train_clips} training clips ({_TRAIN.value} sentences × "
             f"{len(_TRAIN_VOICES.value)} voices {', '.join(_TRAIN_VOICES.value)}), held-out voice "
             f"{_HELDOUT.value}; disjoint train / dev / test sentences. Training: {tconfig.steps} steps of "
             f"{tconfig.batch_size} ({tconfig.steps * tconfig.batch_size} samples seen), AdamW peak "
             f"{tconfig.learning_rate:g}, warm-up {tconfig.warmup_steps}, cosine. Greedy decoding, WER with "
             f"{metrics.english_normalizer_name()}.", "",
             "| set | clips | audio s | WER whisper-base decoder | WER projector + SmolLM2 | RTF whisper decoder "
             "| RTF SmolLM2 |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {names[name]} | {r['clips']} | {r['audio_seconds']:.0f} | {100 * r['whisper_wer']:.1f} | "
                     f"{100 * r['llm_wer']:.1f} | {r['whisper_rtf']:.3f} | {r['llm_rtf']:.3f} |")
    lines += ["", "| cost | value |", "|---|---|",
              f"| encoder, every clip once (cached) | {encode_seconds:.0f} s |",
              f"| projector training: compile / run ({tconfig.steps - info['resumed_from']} steps this call) | "
              f"{info['compile_seconds']:.1f} s / {info['run_seconds']:.0f} s |",
              f"| XLA FLOPs per training step | {(info['flops_per_step'] or float('nan')) / 1e9:.0f} G |",
              f"| final training loss | {info['losses'][-1] if info['losses'] else float('nan'):.3f} |",
              f"| whole run | {wall:.0f} s |", "",
              f"Loss curve: `{os.path.basename(_LOSS_PNG.value)}`. RTF: decoding seconds per second of audio "
              "(after a compiling warm-up call; the shared encoder excluded).", ""]
    report.write_markdown(_RESULTS_MD.value, "\n".join(lines))
    report.atomic_write_text(_RESULTS_JSON.value, json.dumps(dict(rows=rows, train=info, hypotheses=hypotheses),
                                                             indent=1, default=float))
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
