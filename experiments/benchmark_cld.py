"""CLD-routed ASR benchmark: language-detection accuracy, WER and CER, overall, per language and per accent.

    python -m experiments.benchmark_cld --flagfile=experiments/configs/benchmark_cld.flags

`--head=cvx|nn|linear` routes decoding by a saved CLD head (`--head_path`);
`--head=vanilla` lets Whisper detect the language itself (restricted to
`--languages`). Predictions are appended to `predictions.jsonl` batch by batch, so
a killed run resumes where it stopped; `results.json` and `results.md` are
written from all predictions at the end.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging

HEAD_TYPES = {"cvx": "convex_relu", "nn": "nn", "linear": "linear"}


def select_examples(spec: str, languages: list[str], split: str, max_examples: int | None):
    """The clips of `split` ('heldout_accent' for the held-out accents) of the dataset."""
    from experiments import cld, cld_data

    ds = cld.load_dataset(spec, languages)
    if split == "heldout_accent":
        examples = cld_data.heldout_accent_test(ds).examples
    else:
        examples = [e for e in ds.examples if e.split == split]
    if not examples:
        raise ValueError(f"--split={split} selects no clips of {spec}")
    return examples[:max_examples]


def build_model(encoder: str, head: str, head_path: str | None, languages: list[str], batch_size: int,
                max_new_tokens: int):
    """ASRModel for `encoder` with the head (or Whisper's own detection for 'vanilla')."""
    import dataclasses

    from asr import ASRModel
    from heads import load_head

    model = ASRModel.from_pretrained(encoder, languages=languages)
    if hasattr(model, "config"):  # Whisper: decoding settings
        model.config = dataclasses.replace(model.config, batch_size=batch_size, max_new_tokens=max_new_tokens)
    if head != "vanilla":
        if not head_path:
            raise ValueError(f"--head={head} needs --head_path")
        loaded = load_head(head_path)
        if loaded.metadata["head_type"] != HEAD_TYPES[head]:
            raise ValueError(f"{head_path} holds a {loaded.metadata['head_type']!r} head, not --head={head}")
        model.set_lang_detect_head(loaded)
    return model


def score(records: list[dict], languages: list[str]) -> dict:
    """Accuracy, WER and CER overall, per language and per accent, plus sklearn's classification report."""
    from sklearn.metrics import classification_report, confusion_matrix

    from asr import metrics

    def block(rows):
        refs, hyps, langs = [r["text"] for r in rows], [r["hypothesis"] for r in rows], [r["lang"] for r in rows]
        out = {"n": len(rows), "accuracy": sum(r["lang"] == r["predicted"] for r in rows) / len(rows)}
        for name, fn in (("wer", metrics.wer), ("cer", metrics.cer)):
            try:
                out[name] = fn(refs, hyps, langs)
            except ValueError:  # no scorable reference (e.g. empty transcripts)
                out[name] = None
        return out

    truth, predicted = [r["lang"] for r in records], [r["predicted"] for r in records]
    labels = sorted(set(languages) | set(predicted))
    return {
        "overall": block(records),
        "per_language": {k: block([r for r in records if r["lang"] == k]) for k in sorted(set(truth))},
        "per_accent": {k: block([r for r in records if r["accent"] == k]) for k in sorted({r["accent"] for r in records})},
        "classification_report": classification_report(truth, predicted, labels=labels, output_dict=True,
                                                       zero_division=0),
        "classification_report_text": classification_report(truth, predicted, labels=labels, zero_division=0),
        "confusion_matrix": {"labels": labels, "matrix": confusion_matrix(truth, predicted, labels=labels).tolist()},
    }


def markdown(results: dict, config: dict) -> str:
    """Tables of `score`'s results."""
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
    def table(title, blocks):
        rows = [f"| {title} | n | detection accuracy | WER | CER |", "|---|---|---|---|---|"]
        rows += [f"| {k} | {b['n']} | {fmt(b['accuracy'])} | {fmt(b['wer'])} | {fmt(b['cer'])} |" for k, b in blocks.items()]
        return rows
    lines = [f"# CLD-routed ASR: {config['head']} head, {config['encoder']}", "",
             f"Dataset `{config['dataset']}`, split `{config['split']}`.", "",
             *table("subset", {"overall": results["overall"]}), "", *table("language", results["per_language"]), "",
             *table("accent", results["per_accent"]), "", "Classification report:", "", "```",
             results["classification_report_text"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def run(config: dict, output_dir: str) -> dict:
    """Predicts every clip not yet in `output_dir/predictions.jsonl`, then scores all of them."""
    from tqdm import tqdm

    from experiments import cld_data

    os.makedirs(output_dir, exist_ok=True)
    pred_path = os.path.join(output_dir, "predictions.jsonl")
    done = {}
    if os.path.exists(pred_path):
        with open(pred_path) as f:
            done = {r["id"]: r for r in map(json.loads, f) if r}
        logging.info("resuming: %d predictions already in %s", len(done), pred_path)
    examples = select_examples(config["dataset"], config["languages"], config["split"], config["max_examples"])
    todo = [e for e in examples if e.id not in done]
    if todo:
        model = build_model(config["encoder"], config["head"], config["head_path"], config["languages"],
                            config["batch_size"], config["max_new_tokens"])
        with open(pred_path, "a") as f, tqdm(total=len(examples), initial=len(examples) - len(todo)) as bar:
            for i in range(0, len(todo), config["batch_size"]):
                batch = todo[i : i + config["batch_size"]]
                langs, texts = model.predict([cld_data.read_audio(e) for e in batch])
                for e, lang, text in zip(batch, langs, texts):
                    done[e.id] = dict(id=e.id, lang=e.lang, accent=e.accent, text=e.text, predicted=lang,
                                      hypothesis=text)
                    f.write(json.dumps(done[e.id], ensure_ascii=False) + "\n")
                f.flush()
                bar.update(len(batch))
    results = {"config": config, **score([done[e.id] for e in examples], config["languages"])}
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(markdown(results, config))
    return results


def define_flags():
    """Defines the binary's flags (only when run as a program, so importing this module defines none)."""
    flags.DEFINE_enum("head", "cvx", ["cvx", "nn", "linear", "vanilla"], "Language selection.")
    flags.DEFINE_string("head_path", None, "Saved head directory (head.json + head.safetensors).")
    flags.DEFINE_string("encoder", "openai/whisper-small", "ASR checkpoint: Whisper or MMS, id or directory.")
    flags.DEFINE_string("dataset", "embedded", "'embedded', a manifest (.jsonl/.csv) or a saved HF dataset.")
    flags.DEFINE_string("split", "test", "Split to score; 'heldout_accent' for the held-out accents.")
    flags.DEFINE_list("languages", ["en", "zh"], "ISO-639-1 codes in the benchmark.")
    flags.DEFINE_integer("batch_size", 8, "Clips per predict() call.")
    flags.DEFINE_integer("max_examples", None, "Score only the first N clips of the split.")
    flags.DEFINE_integer("max_new_tokens", 224, "Whisper tokens per 30 s window.")
    flags.DEFINE_string("output_dir", "outputs/benchmark_cld", "predictions.jsonl, results.json, results.md.")


def main(argv):
    del argv
    f = flags.FLAGS
    config = dict(head=f.head, head_path=f.head_path, encoder=f.encoder, dataset=f.dataset, split=f.split,
                  languages=sorted(f.languages), batch_size=f.batch_size, max_examples=f.max_examples,
                  max_new_tokens=f.max_new_tokens)
    results = run(config, f.output_dir)
    print(markdown(results, config))


if __name__ == "__main__":
    define_flags()
    app.run(main)
