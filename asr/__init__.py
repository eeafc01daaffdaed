"""ASR pipelines with language selection: Whisper generation and MMS CTC decoding in JAX.

`ASRModel.from_pretrained(path, languages=[...])` returns the pipeline for the
checkpoint; `set_lang_detect_head(head)` routes decoding by a CLD head;
`predict(audio) -> (langs, texts)`. `asr.metrics` holds WER/CER.
"""

from asr.model import ASRModel
from asr.whisper_pipeline import WhisperDecodingConfig

__all__ = ["ASRModel", "WhisperDecodingConfig"]
