"""Sharded (data x model mesh on 8 fake CPU devices) outputs equal unsharded ones.

Runs in a subprocess so that XLA_FLAGS only affects this check.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from flax import nnx
    from encoders import sharding, wav2vec2, whisper
    assert len(jax.devices()) == 8
    mesh = sharding.create_mesh(data=4, model=2)
    models = {
        "whisper": (whisper.WhisperEncoder(whisper.WhisperConfig(d_model=32, encoder_layers=2,
                     encoder_attention_heads=4, encoder_ffn_dim=64), rngs=nnx.Rngs(0)),
                    np.random.default_rng(0).standard_normal((4, 80, 3000)).astype(np.float32), None),
        "xlsr": (wav2vec2.Wav2Vec2Encoder(wav2vec2.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2),
                  conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                  feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=True, adapter_attn_dim=8),
                  rngs=nnx.Rngs(0)),
                 np.random.default_rng(0).standard_normal((4, 4000)).astype(np.float32),
                 np.arange(4000)[None, :] < np.array([[4000], [3000], [2000], [1000]])),
    }
    for name, (model, x, mask) in models.items():
        expected = [np.asarray(s) for s in model(x, attention_mask=mask, output_hidden_states=True)]
        sharding.shard_model(model, mesh)
        q = model.encoder.layers[0].attention.q_proj.kernel.get_value() if name == "xlsr" else \\
            model.layers[0].self_attn.q_proj.kernel.get_value()
        assert q.sharding.spec == jax.sharding.PartitionSpec(None, "model"), q.sharding
        xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
        with jax.set_mesh(mesh):
            got = model(xs, attention_mask=mask, output_hidden_states=True)
        assert got[-1].sharding.spec[0] == "data", got[-1].sharding
        err = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(got, expected))
        print(name, "sharded vs unsharded max error", err)
        assert err < 1e-5, err
    print("OK")
""")


def test_sharded_equals_unsharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(proc.stdout)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]
