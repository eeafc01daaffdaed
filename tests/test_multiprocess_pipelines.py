"""The pipelines on several real JAX processes (tests/multihost.py): `experiments.train_cld`, extraction, cronos
and K-means on 2 processes x 2 CPU devices give what 1 process x 4 devices gives, and only process 0 writes.

The single-process runs are themselves checked against independent references elsewhere (transformers for the
encoder, CVXPY for cronos, scikit-learn for K-means); here the reference for a multi-process run is the same job
on one process with the same devices, the property a pod user relies on.
"""

import json
import os
import textwrap

import multihost
import numpy as np
import pytest
from encoders_testutil import tiny_whisper
from safetensors.numpy import load_file

from experiments.lib.cld import EMBEDDED_CORPUS

GROUPS_PER_LANGUAGE = 3  # clips per (language, split, held-out) group of the shipped corpus


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A 24-clip manifest of the shipped corpus (en, zh: train, valid, test, held-out accent) and a tiny Whisper."""
    root = tmp_path_factory.mktemp("multiprocess_job")
    corpus = os.path.dirname(EMBEDDED_CORPUS)
    rows, taken = [], {}
    with open(EMBEDDED_CORPUS, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            group = (row["lang"], row.get("split"), bool(row.get("heldout_accent")))
            if row["lang"] in ("en", "zh") and taken.get(group, 0) < GROUPS_PER_LANGUAGE:
                taken[group] = taken.get(group, 0) + 1
                rows.append(dict(row, audio=os.path.join(corpus, row["audio"])))
    assert len(rows) == 2 * 4 * GROUPS_PER_LANGUAGE, taken
    (root / "broken.wav").write_bytes(b"RIFF\x00\x00not audio at all")  # skipped alike by every process
    rows.append(dict(rows[0], audio=str(root / "broken.wav"), id="broken"))
    manifest = root / "mini.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tiny_whisper(str(root / "tiny_whisper"))
    return {"root": root, "manifest": str(manifest), "encoder": str(root / "tiny_whisper")}


TRAIN_CLD = textwrap.dedent("""
    import os, runpy, sys
    import multihost
    pid, n = multihost.worker_env()
    out, cache, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
    distributed = (["--distributed=explicit", "--coordinator_address=" + os.environ["MULTIHOST_COORDINATOR"],
                    f"--num_processes={n}", f"--process_id={pid}", "--collective_timeout=60"] if n > 1
                   else ["--distributed=off"])
    sys.argv = ["train_cld", *flags, f"--output_dir={out}_{pid}", f"--cache_dir={cache}_{pid}", *distributed]
    runpy.run_module("experiments.train_cld", run_name="__main__")
""")


def _train_cld(job, name: str, num_processes: int, devices_per_process: int):
    flags = [f"--encoder={job['encoder']}", f"--dataset={job['manifest']}", "--languages=en,zh", "--neuron=8",
             "--rank=4", "--batch_size=4", "--compilation_cache_dir="]
    root = job["root"] / name
    results = multihost.run_processes(TRAIN_CLD, num_processes, devices_per_process, timeout_s=400,
                                      args=[str(root / "out"), str(root / "cache"), *flags])
    bad = [r for r in results if r.returncode != 0]
    assert not bad, "\n".join(r.summary() for r in results)
    return root, results


def test_train_cld_on_two_processes_equals_one_process_and_only_process_0_writes(job):
    one, _ = _train_cld(job, "one_process", 1, 4)
    two, results = _train_cld(job, "two_processes", 2, 2)
    # only process 0 wrote: process 1 had its own output and cache paths and created neither
    assert not os.path.exists(two / "out_1") and not os.path.exists(two / "cache_1")
    assert sorted(os.listdir(two / "out_0")) == sorted(os.listdir(one / "out_0"))
    assert "wrote" in results[0].stdout and "wrote" not in results[1].stdout
    reference, got = load_file(str(one / "out_0/head/head.safetensors")), load_file(str(two / "out_0/head/head.safetensors"))
    assert sorted(reference) == sorted(got)
    for name in reference:  # float32 sums reduce in another order across processes (gloo): normwise tolerance
        assert np.linalg.norm(got[name] - reference[name]) <= 1e-3 * np.linalg.norm(reference[name]), name
    m1 = json.loads((one / "out_0/metrics.json").read_text())
    m2 = json.loads((two / "out_0/metrics.json").read_text())
    assert (m1["devices"], m1["processes"], m2["devices"], m2["processes"]) == (4, 1, 4, 2)
    assert m2["mesh"] == {"data": 4, "model": 1}
    assert m1["skipped_corrupt"] == m2["skipped_corrupt"] == 1  # each process probed its share of the clips
    for split in ("test", "valid", "accent_shift"):
        assert m2[split]["accuracy"] == m1[split]["accuracy"], split
        assert m2[split]["confusion_matrix"] == m1[split]["confusion_matrix"], split
    # the embedding caches hold the same rows
    (c1,), (c2,) = os.listdir(one / "cache_0"), os.listdir(two / "cache_0")
    assert c1 == c2  # same cache key: same encoder, pooling and inputs


SOLVERS = multihost.TESTS_DIR / "multiprocess_solvers_worker.py"


def _solvers(job, num_processes: int, devices_per_process: int, out):
    results = multihost.run_processes(SOLVERS, num_processes, devices_per_process, timeout_s=300,
                                      args=[job["manifest"], job["encoder"], str(out)])
    multihost.check_ok(results)
    return np.load(out / "results_0.npz")


def test_extraction_cronos_kmeans_nn_head_and_supcon_on_two_processes_equal_one_process(job, tmp_path):
    one = _solvers(job, 1, 4, tmp_path / "one")
    two = _solvers(job, 2, 2, tmp_path / "two")
    assert not os.path.exists(tmp_path / "two" / "results_1.npz")  # process 1 wrote nothing, not even its cache
    assert not os.path.exists(tmp_path / "two" / "cache_1")
    assert one["X"].shape == (2 * 4 * GROUPS_PER_LANGUAGE, 32)
    np.testing.assert_allclose(two["X"], one["X"], rtol=1e-5, atol=1e-6)
    for name in ("v", "w"):  # float32 sums reduce in another order across processes (gloo): normwise tolerance
        assert np.linalg.norm(two[name] - one[name]) <= 1e-3 * np.linalg.norm(one[name]), name
    np.testing.assert_array_equal(two["assignments"], one["assignments"])
    np.testing.assert_allclose(two["centroids"], one["centroids"], rtol=1e-5, atol=1e-6)
    trained = [k for k in one.files if k.startswith(("nn.", "supcon."))]
    assert any(k.startswith("nn.") for k in trained) and any(k.startswith("supcon.") for k in trained)
    for name in trained:  # same batches, same dropout masks (drawn over the global batch): the same weights
        assert np.linalg.norm(two[name] - one[name]) <= 1e-4 * max(np.linalg.norm(one[name]), 1e-12), name
