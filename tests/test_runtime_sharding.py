"""Sharded (data x model mesh on 8 fake CPU devices) outputs equal unsharded ones.

Runs in a subprocess so that XLA_FLAGS only affects this check.
"""

import textwrap

import multihost

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from flax import nnx
    from encoders import runtime, wav2vec2, whisper
    assert len(jax.devices()) == 8
    mesh = runtime.create_mesh(data=4, model=2)
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
        runtime.shard_model(model, mesh)
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


MESH_CHECKS = textwrap.dedent("""
    import jax, numpy as np, pytest
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from encoders import layers, runtime
    devices = jax.devices()
    assert len(devices) == 8
    for data, model in ((4, 2), (8, 1), (1, 8), (None, 2), (None, 1)):
        mesh = runtime.create_mesh(data, model)
        assert mesh.axis_names == ("data", "model")
        assert mesh.devices.shape == (8 // model, model) and list(mesh.devices.flat) == devices
    for data, model in ((3, 2), (2, 1), (None, 3), (16, 1), (2, 8)):
        with pytest.raises(ValueError, match=f"uses {(data or 8 // model) * model} devices, but 8 were given"):
            runtime.create_mesh(data, model)
    with pytest.raises(ValueError, match="positive"):
        runtime.create_mesh(model=0)
    subset = runtime.create_mesh(2, 2, devices=devices[4:])
    assert list(subset.devices.flat) == devices[4:] and subset.devices.shape == (2, 2)

    data_only = jax.sharding.Mesh(np.asarray(devices), ("data",))
    x = np.arange(8 * 4 * 6, dtype=np.float32).reshape(8, 4, 6)
    with jax.set_mesh(data_only):
        with pytest.raises(ValueError, match="'heads' -> 'model'.*map those logical axes to None"):
            jax.jit(lambda y: runtime.constrain(y, ("batch", "length", "heads")))(x)
        rules = dict(runtime.LOGICAL_AXIS_RULES) | {"heads": None}
        y = jax.jit(lambda y: runtime.constrain(y, ("batch", "length", "heads"), tuple(rules.items())))(x)
    assert y.sharding.is_equivalent_to(NamedSharding(data_only, P("data", None, None)), 3), y.sharding
    np.testing.assert_array_equal(np.asarray(y), x)
    with pytest.raises(ValueError, match="'mlp' -> 'model'"):
        runtime.shard_model(layers.Dense(6, 12, ("embed", "mlp"), rngs=nnx.Rngs(0)), data_only)
    print("OK")
""")


def test_sharded_equals_unsharded():
    multihost.run_on_fake_devices(SCRIPT)


def test_mesh_uses_every_device_and_constrain_refuses_missing_axes():
    multihost.run_on_fake_devices(MESH_CHECKS)
