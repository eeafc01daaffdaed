"""`ASRModel.from_pretrained`: the Whisper or MMS pipeline, chosen by the checkpoint's config."""

from __future__ import annotations

from encoders import loading


class ASRModel:
    """Factory for the pipelines; both expose `set_lang_detect_head(head)` and `predict(audio) -> (langs, texts)`."""

    @staticmethod
    def from_pretrained(name_or_path: str, languages=None, **kwargs):
        """`WhisperASR` for a Whisper checkpoint, `MMSASR` for a wav2vec2 CTC (MMS) checkpoint.

        `languages` (ISO-639-1) restricts Whisper's own language detection and is
        checked against the languages the checkpoint can decode.
        """
        model_dir = loading.resolve_model_dir(name_or_path)
        config = loading.load_config(model_dir)
        model_type = config.get("model_type", "")
        if model_type == "whisper":
            from asr.whisper_pipeline import WhisperASR

            return WhisperASR.from_pretrained(model_dir, languages, **kwargs)
        if model_type == "wav2vec2" and "Wav2Vec2ForCTC" in config.get("architectures", ["Wav2Vec2ForCTC"]):
            from asr.mms import MMSASR

            return MMSASR.from_pretrained(model_dir, languages, **kwargs)
        raise ValueError(f"{name_or_path} has model_type {model_type!r}; expected a Whisper or a wav2vec2 CTC "
                         "(MMS) checkpoint")
