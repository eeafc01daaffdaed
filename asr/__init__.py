"""ASR pipelines with language selection: Whisper generation and MMS CTC decoding in JAX."""
