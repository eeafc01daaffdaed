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


def english_normalizer_name() -> str:
    """Which English normaliser `normalize` uses here (recorded with every result)."""
    normalizer = _english_normalizer()
    return "basic (openai-whisper not installed)" if normalizer is basic_normalize else \
        "openai-whisper EnglishTextNormalizer"


def normalize(text: str, language: str | None = None) -> str:
    """Normalised text for scoring; no-space languages lose their spaces."""
    text = _english_normalizer()(text) if language == "en" else basic_normalize(text)
    text = " ".join(text.split())
    return text.replace(" ", "") if language in NO_SPACE_LANGUAGES else text


def _pairs(references, hypotheses, language, split_chars: bool):
    """Normalised (refs, hyps); `language` is one code (or None) or one code per pair. With `split_chars`,
    no-space languages become space-separated characters (WER over characters)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("no references to score")
    langs = [language] * len(references) if language is None or isinstance(language, str) else list(language)
    if len(langs) != len(references):
        raise ValueError(f"{len(langs)} languages for {len(references)} references")
    refs, hyps = [], []
    for r, h, lang in zip(references, hypotheses, langs):
        r, h = normalize(r, lang), normalize(h, lang)
        if r:  # references that normalise to nothing cannot be scored by jiwer
            spaced = split_chars and lang in NO_SPACE_LANGUAGES
            refs.append(" ".join(r) if spaced else r)
            hyps.append(" ".join(h) if spaced else h)
    if not refs:
        raise ValueError("every reference is empty after normalisation")
    return refs, hyps


def wer(references, hypotheses, language=None) -> float:
    """Corpus word error rate; for no-space languages (zh, ja, ...) each character counts as a word.

    `language`: one ISO-639-1 code, or one per pair (mixed-language corpora). References that normalise
    to nothing are skipped.
    """
    return float(jiwer.wer(*_pairs(references, hypotheses, language, split_chars=True)))


def cer(references, hypotheses, language=None) -> float:
    """Corpus character error rate (spaces count as characters, except for zh/ja/... which have none)."""
    return float(jiwer.cer(*_pairs(references, hypotheses, language, split_chars=False)))
