"""experiments.bench.bench_heads: seeded sentence-level splits, the time-to-target search and the computed winner."""

import numpy as np
import pytest

from encoders import input_pipeline
from experiments.bench import bench_heads


def _corpus(n_sentences=20, accents=("a", "b", "c"), heldout="d", languages=("en", "zh")):
    """Sentence-level split column as build_tts_corpus writes it: a sentence's clips share one split."""
    rng = np.random.default_rng(0)
    examples = []
    for lang in languages:
        names = rng.permutation(["train"] * 14 + ["valid"] * 3 + ["test"] * 3)[:n_sentences]
        for accent in (*accents, heldout):
            for i, name in enumerate(names):
                examples.append(input_pipeline.Example(
                    id=f"{lang}/{accent}/{i:03d}", lang=lang, text=f"{lang} sentence {i}", accent=accent,
                    split="test" if accent == heldout else str(name), heldout_accent=accent == heldout))
    return input_pipeline.Dataset(examples, tuple(languages), input_pipeline.Stats())


def test_seed_zero_is_the_corpus_split_and_other_seeds_redraw_by_sentence():
    ds = _corpus()
    assert [[e.id for e in p.examples] for p in bench_heads.seeded_split(ds, 0)] == \
        [[e.id for e in p.examples] for p in input_pipeline.split(ds)]
    reference = {e.id: e.split for e in ds.examples if not e.heldout_accent}
    for seed in (1, 2):
        parts = bench_heads.seeded_split(ds, seed)
        assigned = {e.id: name for name, part in zip(input_pipeline.SPLITS, parts) for e in part.examples}
        assert sorted(assigned) == sorted(reference)  # every seen-accent clip once, no held-out clip
        assert assigned != reference
        for lang in ds.languages:  # per language: same number of clips per split as the corpus split
            for name in input_pipeline.SPLITS:
                assert sum(1 for i, n in assigned.items() if n == name and i.startswith(lang)) == \
                    sum(1 for i, n in reference.items() if n == name and i.startswith(lang))
        text = {e.id: (e.lang, e.text) for e in ds.examples}
        by_sentence = {}
        for i, name in assigned.items():
            by_sentence.setdefault(text[i], set()).add(name)
        assert all(len(names) == 1 for names in by_sentence.values())  # a sentence never spans two splits
    assert [e.id for e in bench_heads.seeded_split(ds, 1)[0].examples] == \
        [e.id for e in bench_heads.seeded_split(ds, 1)[0].examples]


def test_without_a_split_column_seeds_use_cld_data_split():
    ds = _corpus()
    ds = ds.subset([input_pipeline.Example(id=e.id, lang=e.lang, text=e.text, accent=e.accent) for e in ds.examples])
    for seed in (0, 3):
        assert [[e.id for e in p.examples] for p in bench_heads.seeded_split(ds, seed)] == \
            [[e.id for e in p.examples] for p in input_pipeline.split(ds, data_seed=seed)]


class _FakeHead:
    def __init__(self, accuracy, n):
        self.languages = ("en", "zh")
        self.predictions = ["en"] * round(accuracy * n) + ["zh"] * (n - round(accuracy * n))

    def predict_languages(self, X):
        return self.predictions


class _FakeFitter(bench_heads.Fitter):
    """Validation accuracy as a known function of the count; records the counts fitted."""

    curves = {"cvx": lambda k: min(0.2 * k, 0.9), "nn": lambda e: min(0.1 + 0.05 * e, 0.8)}

    def fit(self, head, X, y, pooling, norm, count=None):
        count = self.count(head, count)
        self.fitted.append((head, count))
        self.first_compile.setdefault((head, count, X.shape), 1.0)
        return _FakeHead(self.curves[head](count), 20), 0.0, 0.01 * count, 0.02 * count


def test_time_to_target_finds_the_smallest_counts():
    fitter = _FakeFitter(["en", "zh"], "fake", nn_epochs=100)
    fitter.fitted = []
    data = {"Xtr": np.zeros((4, 3)), "ytr": np.array([0, 1, 0, 1]), "Xva": np.zeros((20, 3)),
            "yva": np.zeros(20, int), "valid_truth": (["en"] * 20, ["a"] * 20)}
    finals = {"cvx": 0.9, "nn": 0.8}
    result = bench_heads.time_to_target(fitter, data, "mean", "none", finals, rounds=3)
    assert result["target"] == 0.8
    assert result["found"] == {"cvx": 4, "nn": 14}  # 0.2 * 4 >= 0.8; 0.1 + 0.05 * 14 >= 0.8 > 0.1 + 0.05 * 13
    assert set(result["searched"]["nn"]) >= {1, 2, 4, 8, 16, 13, 14}
    timed = [f for f in fitter.fitted[-6:]]
    assert timed == [("cvx", 4), ("nn", 14), ("nn", 14), ("cvx", 4), ("cvx", 4), ("nn", 14)]  # alternated
    lines = "\n".join(bench_heads.time_lines(result, "test", 20, 100, 0))
    assert "cvx is 3.50x faster" in lines  # run 0.14 s vs 0.04 s


def _summary(test_means):
    out = {}
    for (p, n, h), mean in test_means.items():
        s = {"mean": mean, "median": mean, "min": mean - 0.01, "max": mean + 0.01, "n": 3}
        out[(p, n, h)] = {"valid": s, "test": s, "heldout": dict(s, mean=mean - 0.1), "run": s, "per_accent": {}}
    return out


def test_winner_is_computed_from_the_numbers():
    means = {(p, n, h): 0.5 for p in bench_heads.POOLINGS for n in bench_heads.INPUT_NORMS for h in bench_heads.HEADS}
    means[("masked_mean", "center", "cvx")] = 0.9
    means[("mean", "none", "cvx")] = 0.7
    lines, best = bench_heads.winner_lines(_summary(means), 3)
    assert best == ("masked_mean", "center")
    text = "\n".join(lines)
    assert "pooling `masked_mean`, input_norm `center`" in text and "+0.200 for the winner" in text
    assert "gap +0.200" in text and "do not overlap" in text  # runner-up is the published convention at 0.7


def test_feature_stats():
    X = np.array([[3.0, 0.0], [3.0, 4.0], [3.0, 8.0]])
    s = bench_heads.feature_stats(X)
    assert s["norm"] == pytest.approx((3 + 5 + np.hypot(3, 8)) / 3)
    assert (s["std_min"], s["std_max"]) == pytest.approx((0.0, np.std([0, 4, 8])))
