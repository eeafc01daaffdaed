"""Tiny random Whisper checkpoints with the real multilingual vocabulary, shared by the asr tests."""

from __future__ import annotations

import torch
import transformers


def whisper_ids() -> dict:
    """Special-token ids of the multilingual Whisper vocabulary (from openai-whisper's tiktoken files)."""
    from whisper.tokenizer import LANGUAGES, get_tokenizer

    tok = get_tokenizer(True, num_languages=99)
    lang_to_id = {f"<|{code}|>": tok.sot + 1 + i for i, code in enumerate(LANGUAGES)}
    return dict(sot=tok.sot, eot=tok.eot, transcribe=tok.transcribe, translate=tok.translate,
                no_timestamps=tok.no_timestamps, lang_to_id=lang_to_id)


def tiny_whisper_asr(path, d_model=32, layers=2, init_std=0.5, seed=0):
    """Saves a random tiny WhisperForConditionalGeneration (vocabulary 51865) with a generation config.

    A large `init_std` makes the logits peaked, so greedy/beam choices are not decided by round-off.
    Returns the torch model.
    """
    ids = whisper_ids()
    torch.manual_seed(seed)
    cfg = transformers.WhisperConfig(
        vocab_size=51865, d_model=d_model, encoder_layers=layers, encoder_attention_heads=4, encoder_ffn_dim=2 * d_model,
        decoder_layers=layers, decoder_attention_heads=4, decoder_ffn_dim=2 * d_model, max_target_positions=64,
        pad_token_id=ids["eot"], bos_token_id=ids["eot"], eos_token_id=ids["eot"],
        decoder_start_token_id=ids["sot"], init_std=init_std)
    model = transformers.WhisperForConditionalGeneration(cfg).eval()
    gen = transformers.GenerationConfig(
        decoder_start_token_id=ids["sot"], eos_token_id=ids["eot"], pad_token_id=ids["eot"],
        bos_token_id=ids["eot"], lang_to_id=ids["lang_to_id"],
        task_to_id={"transcribe": ids["transcribe"], "translate": ids["translate"]},
        no_timestamps_token_id=ids["no_timestamps"], is_multilingual=True, max_length=64,
        suppress_tokens=[], begin_suppress_tokens=[220, ids["eot"]])
    model.generation_config = gen
    model.save_pretrained(path)
    return model
