"""Whisper decoding (and MMS CTC) on a (data, model) mesh of 8 fake CPU devices gives transformers' tokens.

A tiny random Whisper decodes a batch of 3 (divisible by neither data axis: padded, the dummy rows dropped)
greedily and by beam search on (data=4, model=2) and (data=2, model=4) meshes; the tokens must equal
transformers' `generate`, and parameters, cross-attention states and the self-attention cache must be split
over `model`. The pipeline (`WhisperASR` with a mesh) must predict what it predicts without one. Runs in a
subprocess so that XLA_FLAGS only affects this check.
"""

import textwrap

import multihost

SCRIPT = textwrap.dedent("""
    import dataclasses, sys, tempfile
    sys.path.insert(0, "tests")
    import jax, jax.numpy as jnp, numpy as np, torch
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    from asr_testutil import tiny_whisper_asr, whisper_ids
    from asr.generate import DecodeOptions, generate
    from asr.whisper_decoder import WhisperDecoder
    from asr.whisper_pipeline import WhisperASR, WhisperDecodingConfig
    from encoders import runtime
    from encoders.whisper import WhisperEncoder

    assert len(jax.devices()) == 8
    path = tempfile.mkdtemp()
    ref = tiny_whisper_asr(path)
    mel = np.random.default_rng(1).standard_normal((3, 80, 3000)).astype(np.float32)
    states = np.asarray(WhisperEncoder.from_pretrained(path)(mel))
    decoder = WhisperDecoder.from_pretrained(path)
    ids = whisper_ids()
    prompt = np.array([[ids["sot"], ids["lang_to_id"]["<|en|>"], ids["transcribe"], ids["no_timestamps"]]] * 3)

    def trim(row):
        row = [int(t) for t in row]
        return row[: row.index(ids["eot"])] if ids["eot"] in row else row

    expected = {}
    for beams in (1, 2):
        with torch.no_grad():
            hf = ref.generate(torch.from_numpy(mel), language="en", task="transcribe", return_timestamps=False,
                              max_new_tokens=10, num_beams=beams, begin_suppress_tokens=[220, ids["eot"]])
        expected[beams] = [trim(row) for row in hf.numpy()]
    for data, model in ((4, 2), (2, 4)):
        mesh = runtime.create_mesh(data, model)
        for beams in (1, 2):
            opts = DecodeOptions(max_new_tokens=10, eos_token_id=ids["eot"], num_beams=beams,
                                 begin_suppress_tokens=(220, ids["eot"]))
            out = generate(decoder, states, prompt, opts, mesh=mesh)
            got = [list(map(int, row[:n])) for row, n in zip(out.tokens, out.lengths)]
            print(data, model, "beams", beams, got)
            assert out.tokens.shape == (3, 10) and got == expected[beams], (got, expected[beams])
        q = decoder.layers[0].self_attn.q_proj.kernel.get_value()
        assert q.sharding.spec == P(None, "model"), q.sharding
        assert decoder.embed_tokens.embedding.get_value().sharding.is_fully_replicated  # 51865 does not split

    # the caches are split like the attention they serve: batch over data, heads over model (2 heads: model=2)
    mesh = runtime.create_mesh(4, 2)
    with runtime.mesh_context(mesh):
        x = runtime.place(np.concatenate([states, states[:1]]), runtime.logical_sharding(mesh, ("batch", None, None)))
        cross = nnx.jit(lambda d, s: d.cross_kv(s))(decoder, x)
        step = nnx.jit(lambda d, c, cr: d.decode(jnp.zeros((4, 2), jnp.int32), 0, c, cr))
        _, cache = step(decoder, nnx.jit(lambda d: d.init_cache(4, 8))(decoder), cross)
    for entry in cross + cache:
        assert tuple(entry.sharding.spec)[:3] == (None, "data", "model"), entry.sharding

    config = WhisperDecodingConfig(max_new_tokens=6, batch_size=3, temperatures=(0.0,), repetition_penalty=1.0,
                                   compression_ratio_threshold=None, logprob_threshold=None)
    clips = [0.1 * np.random.default_rng(i).standard_normal(8000 * (i + 1)).astype(np.float32) for i in range(3)]
    expected = WhisperASR.from_pretrained(path, ["en", "zh"], config=config).predict(clips)
    sharded = WhisperASR.from_pretrained(path, ["en", "zh"], config=config, mesh=runtime.create_mesh(4, 2))
    assert sharded.batch_size == 4
    got = sharded.predict(clips)
    print("pipeline", got)
    assert got == expected, (got, expected)
    print("OK")
""")


def test_sharded_decoding_matches_transformers():
    multihost.run_on_fake_devices(SCRIPT)


MMS_SCRIPT = textwrap.dedent("""
    import json, sys, tempfile
    sys.path.insert(0, "tests")
    import jax, numpy as np, torch, transformers
    from encoders_testutil import random_audio, tiny_wav2vec2
    from flax import nnx
    from asr.mms import MMSASR
    from encoders import runtime
    from encoders.audio import normalize

    assert len(jax.devices()) == 8
    path = tempfile.mkdtemp()
    tiny_wav2vec2(path, "mms", languages=("eng", "fra"))
    base = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4}
    with open(f"{path}/vocab.json", "w") as f:
        json.dump({lang: {**base, **{c: 5 + i for i, c in enumerate("abcdefg")}} for lang in ("eng", "fra")}, f)
    audio = random_audio(batch=3, samples=16000, seed=3)
    model = MMSASR.from_pretrained(path, ["en", "fr"], batch_size=3, mesh=runtime.create_mesh(4, 2))
    assert model.batch_size == 4
    for lang, code in (("fr", "fra"), ("en", "eng")):
        reference = transformers.Wav2Vec2ForCTC.from_pretrained(path).eval()
        reference.load_adapter(code)
        with torch.no_grad():
            expected = reference(torch.from_numpy(normalize(audio))).logits.numpy()
        got = np.stack(model.logits(list(audio), lang))
        err = float(np.abs(got - expected).max())
        print(lang, "max abs error", err)
        assert err < 1e-4, err
    kernel = next(v for p, v in nnx.iter_graph(model.encoder)
                  if "q_proj" in p and p[-1] == "kernel")
    assert "model" in tuple(kernel.get_value().sharding.spec), kernel.get_value().sharding
    print("OK")
""")


def test_sharded_mms_matches_transformers():
    multihost.run_on_fake_devices(MMS_SCRIPT)
