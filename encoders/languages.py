"""ISO-639-1 language codes: the one validation of the languages a dataset, a head or a binary is given."""

from __future__ import annotations

from collections.abc import Sequence

ISO_639_1 = frozenset(
    "aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce ch co cr cs cu cv cy da de dv dz "
    "ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht hu hy hz ia id ie ig ii ik "
    "io is it iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky la lb lg li ln lo lt lu lv mg mh mi mk ml "
    "mn mr ms mt my na nb nd ne ng nl nn no nr nv ny oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd "
    "se sg si sk sl sm sn so sq sr ss st su sv sw ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi "
    "vo wa wo xh yi yo za zh zu".split()
)


def check_language_codes(languages: Sequence[str]) -> list[str]:
    """Validates a sequence of distinct lower-case ISO-639-1 codes; returns it as a list (order kept)."""
    if isinstance(languages, str) or languages is None:
        raise ValueError(f"languages must be a sequence of ISO-639-1 codes such as ['en', 'zh'], got {languages!r}.")
    languages = list(languages)
    unknown = [lang for lang in languages if not isinstance(lang, str) or lang not in ISO_639_1]
    if unknown:
        raise ValueError(f"unknown language code(s) {unknown}: expected lower-case ISO-639-1 codes such as 'en', 'zh'.")
    duplicated = sorted({lang for lang in languages if languages.count(lang) > 1})
    if duplicated:
        raise ValueError(f"languages must be distinct; repeated: {duplicated}.")
    return languages


def check_languages(languages: Sequence[str]) -> tuple[str, ...]:
    """Validates distinct ISO-639-1 codes (at least two) and returns them sorted: a head's label order."""
    languages = check_language_codes(languages)
    if len(languages) < 2:
        raise ValueError(f"a language-detection head needs at least two languages, got {languages}.")
    return tuple(sorted(languages))
