"""WER and CER with jiwer after Whisper-style text normalisation.

`normalize(text, language)`: English uses openai-whisper's `EnglishTextNormalizer`
(spelling, numbers, contractions) when the optional `openai-whisper` package is
installed, else the basic normaliser; every other language uses the basic
normaliser (lower-case, bracketed spans and punctuation/symbols removed,
whitespace collapsed; CJK punctuation included). Chinese, Japanese and Thai are
scored without spaces: CER over characters, WER over characters as words.
"""

from __future__ import annotations

import functools
import re
import unicodedata

import jiwer

NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})


def basic_normalize(text: str) -> str:
    """Lower-case, drop [..] / (..) spans, replace punctuation and symbols by spaces, collapse whitespace."""
    text = re.sub(r"[<\[][^>\]]*[>\]]|\([^)]*\)", " ", text.lower())
    text = "".join(" " if unicodedata.category(c)[0] in "PSZC" else c for c in unicodedata.normalize("NFKC", text))
    return " ".join(text.split())


@functools.lru_cache(maxsize=1)
def _english_normalizer():
    try:
        from whisper.normalizers import EnglishTextNormalizer
    except ImportError:
        return basic_normalize
    return EnglishTextNormalizer()


def normalize(text: str, language: str | None = None) -> str:
    """Normalised text for scoring; no-space languages lose their spaces."""
    text = _english_normalizer()(text) if language == "en" else basic_normalize(text)
    text = " ".join(text.split())
    return text.replace(" ", "") if language in NO_SPACE_LANGUAGES else text


def _pairs(references, hypotheses, language):
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("no references to score")
    refs = [normalize(r, language) for r in references]
    hyps = [normalize(h, language) for h in hypotheses]
    keep = [i for i, r in enumerate(refs) if r]
    if not keep:
        raise ValueError("every reference is empty after normalisation")
    return [refs[i] for i in keep], [hyps[i] for i in keep]


def wer(references, hypotheses, language: str | None = None) -> float:
    """Corpus word error rate; for no-space languages (zh, ja, ...) each character counts as a word.

    References that normalise to nothing are skipped (jiwer cannot score them).
    """
    refs, hyps = _pairs(references, hypotheses, language)
    if language in NO_SPACE_LANGUAGES:
        refs, hyps = [" ".join(r) for r in refs], [" ".join(h) for h in hyps]
    return float(jiwer.wer(refs, hyps))


def cer(references, hypotheses, language: str | None = None) -> float:
    """Corpus character error rate (spaces count as characters, except for zh/ja/... which have none)."""
    refs, hyps = _pairs(references, hypotheses, language)
    return float(jiwer.cer(refs, hyps))
