"""CLD-routed Whisper ASR against Whisper's own language detection: accuracy, WER and CER per language and accent.

    python -m experiments.bench.benchmark_cld --flagfile=experiments/configs/benchmark_cld.flags

Every clip is encoded once. On the same encoder states each detector picks a language: Whisper itself
(unrestricted, over all its languages, and restricted to `--languages`), every head in `--heads`
(name=directory, e.g. trained by `experiments.train_cld`) and the oracle (the true language). The clip
is then decoded once per distinct chosen language (greedy at temperature 0 first, with the pipeline's
temperature fallback, repetition penalty and thresholds from the flags), so all detectors are scored on
identical transcripts wherever they agree. Clips come from the same splits as `train_cld` (`test` by
`--data_seed`, and the held-out accents), so no head is scored on its training data.

Per-clip records are appended to `OUTPUT_DIR/predictions.jsonl` batch by batch, so a killed run resumes;
`OUTPUT_DIR/config.json` pins the configuration, and a different one is refused instead of mixing
results. The results go to `results.json` and to the markdown table `--results_md`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os

import numpy as np
from absl import app, flags, logging

from encoders import runtime
from experiments.lib import report, runtime_flags

WHISPER_DETECTORS = ("whisper_unrestricted", "whisper_restricted")


def select_splits(dataset_spec: str, languages: list[str], data_seed: int, splits: list[str],
                  max_examples: int | None) -> dict:
    """{split: examples}: `test` as train_cld splits it (held-out accents excluded) and/or `accent_shift`."""
    from encoders import input_pipeline
    from experiments.lib import cld

    ds = cld.load_dataset(dataset_spec, languages)
    _, _, test = input_pipeline.split(ds, data_seed=data_seed)
    available = {"test": test.examples, "accent_shift": input_pipeline.heldout_accent_test(ds).examples}
    unknown = sorted(set(splits) - set(available))
    if unknown:
        raise ValueError(f"--splits: unknown {unknown}; use test and/or accent_shift")
    out = {s: available[s][:max_examples] for s in splits}
    empty = [s for s, e in out.items() if not e]
    if empty:
        raise ValueError(f"--splits {empty} select no clips of {dataset_spec}")
    return out


def load_heads(specs: list[str], model) -> dict:
    """{name: head} from name=directory pairs, each checked against the model (languages, dim, pooling)."""
    from heads import load_head

    heads = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--heads entries are name=directory, got {spec!r}")
        head = load_head(path)
        model.set_lang_detect_head(head)  # validates; the benchmark calls the detectors itself
        heads[name] = head
    model.head = None
    return heads


def read_records(path: str) -> dict:
    """Records of a predictions.jsonl; a truncated last line (a killed write) is dropped and logged."""
    records = {}
    if not os.path.exists(path):
        return records
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i >= len(lines) - 2:  # only the last line may be cut by a kill
                logging.warning("dropping a truncated last record in %s", path)
                continue
            raise ValueError(f"{path} line {i + 1} is not JSON; delete the file to start again") from None
        records[record["id"]] = record
    return records


def predict_batch(model, heads: dict, batch, languages: list[str]) -> list[dict]:
    """Detections of every detector and one transcript per distinct chosen language, per clip."""
    from encoders import input_pipeline
    from experiments.lib import cld

    encoded = model.encode([input_pipeline.read_audio(e) for e in batch])
    codes = list(model.decodable_languages)
    logprobs = model.language_logprobs(encoded, codes)
    detections = [dict(oracle=e.lang) for e in batch]
    for name, restrict in zip(WHISPER_DETECTORS, (None, languages)):
        for d, lang in zip(detections, cld.whisper_detection(logprobs, codes, restrict)):
            d[name] = lang
    for name, head in heads.items():
        for d, lang in zip(detections, head.predict_languages(model.pooled(encoded, head.metadata.get("pooling", "mean")))):
            d[name] = lang
    pairs = sorted({(i, lang) for i, d in enumerate(detections) for lang in d.values()})
    texts = model.transcribe(encoded.select([i for i, _ in pairs]), [lang for _, lang in pairs])
    transcripts = [{} for _ in batch]
    for (i, lang), text in zip(pairs, texts):
        transcripts[i][lang] = text
    return [dict(id=e.id, lang=e.lang, accent=e.accent, text=e.text, detections=d, transcripts=t)
            for e, d, t in zip(batch, detections, transcripts)]


def score(records: list[dict], detectors: list[str]) -> dict:
    """Per detector: detection accuracy, WER and CER overall, per language and per accent."""
    from asr import metrics

    def block(rows, detector):
        refs = [r["text"] for r in rows]
        hyps = [r["transcripts"][r["detections"][detector]] for r in rows]
        langs = [r["lang"] for r in rows]
        out = {"n": len(rows), "accuracy": sum(r["detections"][detector] == r["lang"] for r in rows) / len(rows)}
        for name, fn in (("wer", metrics.wer), ("cer", metrics.cer)):
            try:
                out[name] = fn(refs, hyps, langs)
            except ValueError:  # no scorable reference
                out[name] = None
        return out

    def grouped(key):
        return {k: {d: block([r for r in records if r[key] == k], d) for d in detectors}
                for k in sorted({r[key] for r in records})}

    return {"overall": {d: block(records, d) for d in detectors}, "per_language": grouped("lang"),
            "per_accent": grouped("accent")}


def error_rate(block: dict, language: str | None) -> str:
    """CER for no-space languages (zh), WER otherwise, as text."""
    from asr.metrics import NO_SPACE_LANGUAGES

    value = block["cer" if language in NO_SPACE_LANGUAGES else "wer"]
    return "n/a" if value is None else f"{value:.3f}"


def markdown(results: dict, config: dict) -> str:
    """The committed tables: per split, detectors x (overall, per language, per accent)."""
    from experiments.lib import report as rep

    detectors = config["detectors"]
    lines = [f"# CLD-routed ASR on {config['encoder']}: detection accuracy and error rate", "",
             f"Machine: {rep.machine()}.", "",
             f"Dataset `{config['dataset']}` (data seed {config['data_seed']}); languages {', '.join(config['languages'])}. "
             "Each cell is detection accuracy / WER (CER for zh) of the transcripts decoded in the language that "
             "detector chose; every clip is encoded once and decoded once per distinct chosen language "
             f"(max {config['max_new_tokens']} tokens, repetition penalty {config['repetition_penalty']}, "
             f"temperature fallback {'on' if config['temperature_fallback'] else 'off'}). English text normaliser: "
             f"{config['english_normalizer']}. Detectors: Whisper's own language token over all "
             f"{config['n_whisper_languages']} languages (unrestricted) or over the benchmark's (restricted); the "
             "heads (" + ", ".join(f"{k}: `{v}`" for k, v in config["heads"].items()) + "); oracle = true language.", ""]
    for split, res in results["splits"].items():
        langs = list(res["per_language"])
        accents = list(res["per_accent"])
        lines += [f"## {split} ({res['overall'][detectors[0]]['n']} clips)", "",
                  "| detector | all: accuracy | all: WER | all: CER | " + " | ".join(langs) + " |",
                  "|---|---|---|---|" + "---|" * len(langs)]
        for d in detectors:
            o = res["overall"][d]
            cells = [f"{res['per_language'][k][d]['accuracy']:.3f} / {error_rate(res['per_language'][k][d], k)}"
                     for k in langs]
            cer = "n/a" if o["cer"] is None else f"{o['cer']:.3f}"
            lines.append(f"| {d} | {o['accuracy']:.3f} | {error_rate(o, None)} | {cer} | " + " | ".join(cells) + " |")
        lines += ["", "Per accent (accuracy / WER, CER for zh accents):", "",
                  "| detector | " + " | ".join(accents) + " |", "|---|" + "---|" * len(accents)]
        accent_lang = {a: next(r["lang"] for r in results["records"][split] if r["accent"] == a) for a in accents}
        for d in detectors:
            cells = [f"{res['per_accent'][a][d]['accuracy']:.3f} / {error_rate(res['per_accent'][a][d], accent_lang[a])}"
                     for a in accents]
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def run(config: dict, output_dir: str, mesh=None) -> dict:
    """Predicts every clip not yet in `output_dir/predictions.jsonl`, then scores all of them. With a `mesh` over
    several processes, all of them decode every batch together and process 0 alone reads and writes `output_dir`
    (a process that exits on an error ends the others within the heartbeat timeout)."""
    from tqdm import tqdm

    from asr import ASRModel, WhisperDecodingConfig, metrics

    decoding = WhisperDecodingConfig(
        max_new_tokens=config["max_new_tokens"], repetition_penalty=config["repetition_penalty"],
        batch_size=config["batch_size"],
        **({} if config["temperature_fallback"] else dict(temperatures=(0.0,), compression_ratio_threshold=None,
                                                          logprob_threshold=None)))
    model = ASRModel.from_pretrained(config["encoder"], languages=config["languages"], config=decoding,
                                     mesh=mesh)
    heads = load_heads([f"{k}={v}" for k, v in config["heads"].items()], model)
    config = {**config, "detectors": [*WHISPER_DETECTORS, *heads, "oracle"],
              "n_whisper_languages": len(model.decodable_languages),
              "english_normalizer": metrics.english_normalizer_name(),
              "head_checksums": {k: _dir_checksum(v) for k, v in config["heads"].items()}}
    writer = runtime.is_writer()
    config_path = os.path.join(output_dir, "config.json")
    pinned = json.loads(json.dumps({k: v for k, v in config.items() if k not in ("max_examples", "batch_size")}))
    other_config = False
    if writer and os.path.exists(config_path):
        with open(config_path) as f:
            other_config = json.load(f) != pinned
    if runtime.broadcast_from_writer(np.array(other_config)):  # every process raises, none waits on the others
        raise ValueError(f"{output_dir} holds predictions of another configuration ({config_path}); use "
                         "another --output_dir or delete it")
    if writer and not os.path.exists(config_path):
        report.atomic_write_text(config_path, json.dumps(pinned, indent=2))
    splits = select_splits(config["dataset"], config["languages"], config["data_seed"], config["splits"],
                           config["max_examples"])
    results = {"config": config, "splits": {}, "records": {}}
    for split, examples in splits.items():
        pred_path = os.path.join(output_dir, f"predictions_{split}.jsonl")
        done = read_records(pred_path) if writer else {}
        if writer and os.path.exists(pred_path):  # rewrite without a truncated tail before appending
            report.atomic_write_text(pred_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done.values()))
        todo_mask = runtime.broadcast_from_writer(np.array([e.id not in done for e in examples], bool))
        todo = [e for e, missing in zip(examples, todo_mask) if missing]
        with (open(pred_path, "a", encoding="utf-8") if writer else contextlib.nullcontext()) as f, \
                tqdm(total=len(examples), initial=len(examples) - len(todo), desc=split, disable=not writer) as bar:
            for i in range(0, len(todo), config["batch_size"]):
                batch = todo[i : i + config["batch_size"]]
                for record in predict_batch(model, heads, batch, config["languages"]):
                    done[record["id"]] = record
                    if writer:
                        f.write(json.dumps(record, ensure_ascii=False) + "\n")
                if writer:
                    f.flush()
                    os.fsync(f.fileno())
                bar.update(len(batch))
        if not writer:
            continue
        records = [done[e.id] for e in examples]
        results["records"][split] = records
        results["splits"][split] = score(records, config["detectors"])
    if writer:
        report.atomic_write_text(os.path.join(output_dir, "results.json"),
                                 json.dumps(results, indent=2, ensure_ascii=False))
    return results


def _dir_checksum(path: str) -> str:
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            digest.update(name.encode() + f.read())
    return digest.hexdigest()[:16]


def define_flags():
    """Defines the binary's flags (only when run as a program, so importing this module defines none)."""
    flags.DEFINE_list("heads", [], "name=head directory pairs, e.g. cvx=outputs/demo/head.")
    flags.DEFINE_string("encoder", "openai/whisper-base", "Whisper checkpoint (id or directory).")
    flags.DEFINE_string("dataset", "embedded", "'embedded', a manifest (.jsonl/.csv) or a saved HF dataset.")
    flags.DEFINE_list("splits", ["test", "accent_shift"], "Splits to score: test and/or accent_shift.")
    flags.DEFINE_list("languages", ["en", "hi", "id", "ms", "zh"], "ISO-639-1 codes in the benchmark.")
    flags.DEFINE_integer("data_seed", 0, "Seed of the train/valid/test split (as train_cld).")
    flags.DEFINE_integer("batch_size", 8, "Clips per encoder/decoder batch.")
    flags.DEFINE_integer("max_examples", None, "Score only the first N clips of each split.")
    flags.DEFINE_integer("max_new_tokens", 96, "Whisper tokens per 30 s window.")
    flags.DEFINE_float("repetition_penalty", 1.1, "Repetition penalty (published CLD pipeline: 1.1).")
    flags.DEFINE_bool("temperature_fallback", True,
                      "Temperature fallback 0.0 ... 1.0 on compression ratio > 1.35 or avg log-prob < -1.")
    flags.DEFINE_string("output_dir", "outputs/benchmark_cld", "predictions_*.jsonl, config.json, results.json.")
    flags.DEFINE_string("results_md", "experiments/results/benchmark_cld.md", "Markdown table to write.")


def main(argv):
    mesh = runtime_flags.init()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    report.run_facts()  # the machine line of the stamp, GEMM rate measured before the work starts
    f = flags.FLAGS
    config = dict(encoder=f.encoder, dataset=f.dataset, splits=list(f.splits), languages=sorted(f.languages),
                  data_seed=f.data_seed, batch_size=f.batch_size, max_examples=f.max_examples,
                  max_new_tokens=f.max_new_tokens, repetition_penalty=f.repetition_penalty,
                  temperature_fallback=f.temperature_fallback, heads=dict(s.partition("=")[::2] for s in f.heads))
    results = run(config, f.output_dir, mesh)
    if runtime.is_writer():
        report.write_markdown(f.results_md, markdown(results, results["config"]))


if __name__ == "__main__":
    define_flags()
    app.run(main)
