"""asr.merging against NumPy references written here, entry by entry, and a merged directory against transformers."""

import itertools

import numpy as np
import pytest
import torch
import transformers

from asr import merging

HEADS = {"encoder": 2, "decoder": 2}
D = 8  # d_model; d_h = 4


def _state(seed: int) -> dict[str, np.ndarray]:
    """A small Whisper-named state: 2 encoder layers (self-attention), 1 decoder layer (self + cross), MLP, norms."""
    rng = np.random.default_rng(seed)
    state = {"model.encoder.conv1.weight": rng.standard_normal((D, 3, 3)),
             "model.decoder.embed_tokens.weight": rng.standard_normal((11, D))}
    modules = [f"model.encoder.layers.{i}.self_attn" for i in range(2)]
    modules += ["model.decoder.layers.0.self_attn", "model.decoder.layers.0.encoder_attn"]
    for m in modules:
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            state[f"{m}.{proj}.weight"] = rng.standard_normal((D, D))
            if proj != "k_proj":  # Whisper's k_proj has no bias
                state[f"{m}.{proj}.bias"] = rng.standard_normal(D)
    for side in ("encoder", "decoder"):
        state[f"model.{side}.layers.0.fc1.weight"] = rng.standard_normal((16, D))
        state[f"model.{side}.layers.0.final_layer_norm.weight"] = rng.standard_normal(D)
    return {k: v.astype(np.float32) for k, v in state.items()}


@pytest.fixture(scope="module")
def models():
    base = _state(0)
    fts = [{k: v + (0.1 * (i + 1)) * np.random.default_rng(10 + i).standard_normal(v.shape).astype(np.float32)
            for k, v in base.items()} for i in range(2)]
    return base, fts


def _close(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_linear_and_task_arithmetic(models):
    base, fts = models
    _close(merging.merge(base, fts, "linear", weights=[3.0, 1.0]), {k: 0.75 * fts[0][k] + 0.25 * fts[1][k] for k in base})
    _close(merging.merge(base, fts[:1], "linear", weights=[1.0]), fts[0])
    want = {k: base[k] + 0.5 * ((fts[0][k] - base[k]) + (fts[1][k] - base[k])) for k in base}
    _close(merging.merge(base, fts, "task_arithmetic", lam=0.5), want)


def _ties_reference(base, fts, density, lam, trim):
    names = sorted(base)
    taus = [{k: ft[k].astype(np.float64) - base[k] for k in names} for ft in fts]
    trimmed = []
    for tau in taus:
        groups = [names] if trim == "global" else [[k] for k in names]
        kept = {k: np.zeros_like(tau[k]) for k in names}
        for group in groups:
            entries = [(abs(tau[k].flat[i]), -pos, k, i) for k in group for i in range(tau[k].size)
                       for pos in [sum(tau[g].size for g in group[:group.index(k)]) + i]]
            entries.sort(reverse=True)  # largest magnitude first; equal magnitudes: lower position first
            for _, _, k, i in entries[:int(round(density * len(entries)))]:
                kept[k].flat[i] = tau[k].flat[i]
        trimmed.append(kept)
    out = {}
    for k in names:
        merged = np.zeros_like(base[k], np.float64)
        for i in range(base[k].size):
            values = [t[k].flat[i] for t in trimmed]
            sign = np.sign(sum(values))
            agree = [v for v in values if v != 0 and np.sign(v) == sign]
            merged.flat[i] = np.mean(agree) if agree else 0.0
        out[k] = base[k] + lam * merged
    return out


@pytest.mark.parametrize("trim", ["global", "tensor"])
def test_ties(models, trim):
    base, fts = models
    _close(merging.merge(base, fts, "ties", density=0.2, lam=1.0, trim=trim), _ties_reference(base, fts, 0.2, 1.0, trim))


def test_dare_and_dare_ties(models):
    base, fts = models
    rng = np.random.default_rng(0)  # the documented stream: models in order, tensors in name order
    dropped = [{k: np.where(rng.random(base[k].shape) < 0.3, (ft[k] - base[k]) / 0.3, 0.0) for k in sorted(base)}
               for ft in fts]
    _close(merging.merge(base, fts, "dare", density=0.3, seed=0), {k: base[k] + dropped[0][k] + dropped[1][k] for k in base})
    want = {}
    for k in base:
        stack = np.stack([d[k] for d in dropped])
        sign = np.sign(stack.sum(0))
        agree = (stack != 0) & (np.sign(stack) == sign)
        want[k] = base[k] + 0.5 * np.where(agree.any(0), (stack * agree).sum(0) / np.maximum(agree.sum(0), 1), 0)
    _close(merging.merge(base, fts, "dare_ties", density=0.3, lam=0.5, seed=0), want)
    again = merging.merge(base, fts, "dare", density=0.3, seed=0)
    other = merging.merge(base, fts, "dare", density=0.3, seed=1)
    k = "model.encoder.layers.0.fc1.weight"
    assert np.array_equal(again[k], merging.merge(base, fts, "dare", density=0.3, seed=0)[k])
    assert not np.array_equal(again[k], other[k])


def _head_norms(tau, prefix, heads=2, d_h=4):
    """Per-head L2 norm over q/k/v rows (weights and biases) and out_proj columns, written out directly."""
    norms = []
    for h in range(heads):
        rows = slice(h * d_h, (h + 1) * d_h)
        total = sum(np.sum(tau[f"{prefix}.{p}.weight"][rows] ** 2) for p in ("q_proj", "k_proj", "v_proj"))
        total += sum(np.sum(tau[f"{prefix}.{p}.bias"][rows] ** 2) for p in ("q_proj", "v_proj"))
        total += np.sum(tau[f"{prefix}.out_proj.weight"][:, rows] ** 2)
        norms.append(np.sqrt(total))
    return np.array(norms)


def test_head_saliency_and_hsa_changes_exactly_the_top_heads(models):
    base, fts = models
    taus = [{k: ft[k].astype(np.float64) - base[k] for k in base} for ft in fts]
    scores = merging.head_saliency(base, fts, num_heads=HEADS)
    assert len(scores) == 4
    for prefix, s in scores.items():
        np.testing.assert_allclose(s, np.stack([_head_norms(t, prefix) for t in taus]), rtol=1e-5)
    merged = merging.merge(base, fts, "hsa", head_fraction=0.25, lam=1.0, select="global", num_heads=HEADS)
    chosen = []  # per model: its 2 (= 0.25 * 8) best heads over all modules
    for m in range(2):
        ranked = sorted(((scores[p][m, h], p, h) for p in scores for h in range(2)), reverse=True)
        chosen.append({(p, h) for _, p, h in ranked[:2]})
    for p, h in itertools.product(scores, range(2)):
        for proj, part in (("q_proj.weight", np.s_[4 * h:4 * h + 4]), ("out_proj.weight", np.s_[:, 4 * h:4 * h + 4])):
            name = f"{p}.{proj}"
            expected = base[name][part] + sum(tau[name][part] for m, tau in enumerate(taus) if (p, h) in chosen[m])
            np.testing.assert_allclose(merged[name][part], expected, rtol=1e-5, atol=1e-6)
    for k in ("model.encoder.layers.0.fc1.weight", "model.encoder.layers.0.self_attn.out_proj.bias"):
        np.testing.assert_array_equal(merged[k], base[k])  # non_attention="base"


def test_hsa_limits(models):
    base, fts = models
    _close(merging.merge(base, fts, "hsa", head_fraction=1.0, lam=0.7, non_attention="task_arithmetic", num_heads=HEADS),
           merging.merge(base, fts, "task_arithmetic", lam=0.7))
    _close(merging.merge(base, fts, "hsa", head_fraction=0.0, non_attention="base", num_heads=HEADS), base)
    layer = merging.merge(base, fts, "hsa", head_fraction=0.5, select="layer", num_heads=HEADS)
    scores = merging.head_saliency(base, fts, num_heads=HEADS)
    for p in scores:  # per module: each model's better head of the two
        rows = [slice(4 * h, 4 * h + 4) for h in range(2)]
        want = base[f"{p}.v_proj.weight"].copy()
        for m, ft in enumerate(fts):
            h = int(np.argmax(scores[p][m]))
            want[rows[h]] += ft[f"{p}.v_proj.weight"][rows[h]] - base[f"{p}.v_proj.weight"][rows[h]]
        np.testing.assert_allclose(layer[f"{p}.v_proj.weight"], want, rtol=1e-5, atol=1e-6)


def test_bad_input(models):
    base, fts = models
    with pytest.raises(ValueError, match="unknown merge method"):
        merging.merge(base, fts, "slerp")
    with pytest.raises(ValueError, match=r"head_fraction=1.5 must lie in \[0, 1\]"):
        merging.merge(base, fts, "hsa", head_fraction=1.5, num_heads=HEADS)
    with pytest.raises(ValueError, match="density=0.0"):
        merging.merge(base, fts, "ties", density=0.0)
    bad = dict(fts[0], **{"model.encoder.layers.0.fc1.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match="other shapes"):
        merging.merge(base, [bad], "task_arithmetic")
    with pytest.raises(ValueError, match="missing"):
        merging.merge(base, [{k: v for k, v in fts[0].items() if "fc1" not in k}], "linear")
    with pytest.raises(ValueError, match="num_heads"):
        merging.merge(base, fts, "hsa")


def test_merged_directory_loads_in_transformers_with_our_logits(tmp_path):
    from asr_testutil import tiny_whisper_asr

    from asr.whisper_decoder import WhisperDecoder
    from encoders.whisper import WhisperEncoder

    base_dir, a_dir, b_dir = tmp_path / "base", tmp_path / "a", tmp_path / "b"
    ref = tiny_whisper_asr(str(base_dir))
    config = ref.config.to_dict()
    base = merging.load_state(str(base_dir))
    fts = [{k: v + 0.05 * np.random.default_rng(i).standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
           for i in range(2)]
    merging.save_hf(fts[0], str(base_dir), str(a_dir))
    merging.save_hf(fts[1], str(base_dir), str(b_dir))
    merged = merging.merge(merging.load_state(str(base_dir)), [merging.load_state(str(a_dir)),
                                                               merging.load_state(str(b_dir))],
                           "hsa", head_fraction=0.5, config=config)
    out = tmp_path / "merged"
    merging.save_hf(merged, str(base_dir), str(out))
    model = transformers.WhisperForConditionalGeneration.from_pretrained(str(out)).eval()
    for k, v in model.state_dict().items():
        if k in merged:
            np.testing.assert_array_equal(v.numpy(), merged[k], err_msg=k)
    mel = np.random.default_rng(3).standard_normal((1, config["num_mel_bins"], 3000)).astype(np.float32)
    tokens = np.array([[config["decoder_start_token_id"], 5, 7]])
    with torch.no_grad():
        want = model(input_features=torch.from_numpy(mel), decoder_input_ids=torch.from_numpy(tokens)).logits.numpy()
    states = WhisperEncoder.from_pretrained(str(out))(mel)
    got = np.asarray(WhisperDecoder.from_pretrained(str(out))(tokens, states))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_merge_whisper_binary(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from asr_testutil import tiny_whisper_asr

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base_dir = tmp_path / "base"
    tiny_whisper_asr(str(base_dir))
    base = merging.load_state(str(base_dir))
    dirs = []
    for i in range(2):
        ft = {k: v + 0.05 * np.random.default_rng(i).standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
        dirs.append(merging.save_hf(ft, str(base_dir), str(tmp_path / f"ft{i}")))
    for method, extra in (("task_arithmetic", ["--lam=0.5"]), ("hsa", ["--head_fraction=0.5"])):
        out = tmp_path / method
        proc = subprocess.run([sys.executable, "-m", "experiments.merge_whisper", f"--base={base_dir}",
                               f"--finetuned={','.join(dirs)}", f"--method={method}", f"--output_dir={out}", *extra],
                              cwd=repo, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        model = transformers.WhisperForConditionalGeneration.from_pretrained(str(out))
        assert json.loads((out / "merge.json").read_text())["method"] == method
        if method == "task_arithmetic":
            fts = [merging.load_state(d) for d in dirs]
            for k, v in model.state_dict().items():
                if k in base:
                    want = base[k] + 0.5 * ((fts[0][k] - base[k]) + (fts[1][k] - base[k]))
                    np.testing.assert_allclose(v.numpy(), want, rtol=1e-6, atol=1e-6, err_msg=k)
        else:
            assert (out / "head_saliency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
