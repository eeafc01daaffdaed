"""asr.metrics against hand-computed edit distances and jiwer directly."""

import jiwer
import pytest

from asr import metrics


def test_basic_normalisation():
    assert metrics.normalize("Hello, World!  [noise] (laughs)") == "hello world"
    assert metrics.normalize("你好，世界。", "zh") == "你好世界"
    assert metrics.normalize("Apa kabar?", "id") == "apa kabar"


def test_wer_hand_computed():
    # "the cat sat" vs "the cat sit down": 1 substitution + 1 insertion over 3 words
    assert metrics.wer(["The cat sat."], ["the cat, sit down"], "id") == pytest.approx(2 / 3)
    assert metrics.wer(["a b", "c d e"], ["a b", "c e"], "ms") == pytest.approx(1 / 5)
    assert metrics.wer(["a b"], ["a b"], "en") == 0.0


def test_cer_zh_ignores_spaces():
    # 今天天气很好 vs 今天 天器很好: one substitution over six characters, spaces do not count
    assert metrics.cer(["今天天气很好。"], ["今天 天器很好"], "zh") == pytest.approx(1 / 6)
    assert metrics.wer(["今天天气很好"], ["今天天器很好"], "zh") == pytest.approx(1 / 6)
    assert metrics.cer(["abc d"], ["abd d"], "id") == pytest.approx(jiwer.cer("abc d", "abd d")) == pytest.approx(1 / 5)


def test_mixed_languages_pool_edits():
    # zh: 1 char error / 6 chars; id: 1 word error / 2 words -> 2 / 8 pooled
    assert metrics.wer(["今天天气很好", "apa kabar"], ["今天天器很好", "apa kabur"], ["zh", "id"]) == pytest.approx(2 / 8)


def test_english_normaliser_and_errors():
    # the test command installs openai-whisper, so its EnglishTextNormalizer is the one in use
    assert metrics.english_normalizer_name() == "openai-whisper EnglishTextNormalizer"
    assert metrics.wer(["I'm going to the colour show"], ["i am going to the color show"], "en") == 0.0
    with pytest.raises(ValueError, match="hypotheses"):
        metrics.wer(["a"], [], "en")
    with pytest.raises(ValueError, match="empty"):
        metrics.cer(["...", "!"], ["a", "b"], "id")
