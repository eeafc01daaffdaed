"""`ASRModel.from_pretrained`: the Whisper or MMS pipeline, chosen by the checkpoint's config."""

from __future__ import annotations

import warnings

from encoders import loading


def check_head(head, *, embedding_dim: int, poolings: dict[str, str | None], encoder_name: str | None,
               pipeline: str) -> None:
    """Refuses a CLD head that cannot run on a pipeline's embeddings; warns where it may not fit.

    - The head's input dimension must equal the encoder's `embedding_dim` (ValueError).
    - Its pooling (metadata "pooling", default "mean") must be a key of `poolings` (ValueError); a non-None
      value there is a caveat, issued as a warning.
    - When both are known and differ, the encoder the head was trained on (metadata "encoder") and
      `encoder_name` give a warning, not an error: a name is not an identity (a local copy of a checkpoint
      and its Hub id are the same weights), so the user decides.
    """
    if head.embedding_dim != embedding_dim:
        raise ValueError(f"head embedding dim {head.embedding_dim} != the {pipeline} encoder's {embedding_dim}: "
                         "train the head on this encoder's embeddings")
    pooling = head.metadata.get("pooling", "mean")
    if pooling not in poolings:
        raise ValueError(f"{pipeline} pipelines pool their encoder states by {sorted(poolings)}, but the head was "
                         f"trained on {pooling!r} embeddings: retrain it with one of those poolings")
    if poolings[pooling]:
        warnings.warn(poolings[pooling], stacklevel=3)
    trained_on = head.metadata.get("encoder")
    if trained_on and encoder_name and trained_on != encoder_name:
        warnings.warn(f"the head was trained on embeddings of {trained_on!r}, but this pipeline's encoder is "
                      f"{encoder_name!r}: unless they are the same weights, its language choices are meaningless",
                      stacklevel=3)


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

            model = WhisperASR.from_pretrained(model_dir, languages, **kwargs)
        elif model_type == "wav2vec2" and "Wav2Vec2ForCTC" in config.get("architectures", ["Wav2Vec2ForCTC"]):
            from asr.mms import MMSASR

            model = MMSASR.from_pretrained(model_dir, languages, **kwargs)
        else:
            raise ValueError(f"{name_or_path} has model_type {model_type!r}; expected a Whisper or a wav2vec2 CTC "
                             "(MMS) checkpoint")
        model.encoder_name = name_or_path  # the name heads record (metadata "encoder"), not the resolved path
        return model
