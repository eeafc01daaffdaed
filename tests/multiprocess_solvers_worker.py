"""Worker of tests/test_multiprocess_pipelines.py: extraction, cronos, K-means, the NN head (orbax checkpoints in a
shared directory) and SupCon on every device of every process.

argv: manifest, tiny Whisper directory, output directory. Process 0 writes results_0.npz (X, v, w, assignments,
centroids, nn.*, supcon.*); run with 1 process it is the single-process reference (no distributed runtime).
"""

import os
import sys

import jax
import multihost
import numpy as np

from encoders import extraction, input_pipeline, runtime
from encoders.whisper import WhisperEncoder

manifest, encoder_dir, out = sys.argv[1:4]
pid, num_processes = multihost.worker_env()
if num_processes > 1:
    multihost.worker_init()
mesh = runtime.create_mesh()  # (data, model) = (all devices, 1)

dataset = input_pipeline.load_manifest(manifest, languages=["en", "zh"])
X, _ = extraction.extract(WhisperEncoder.from_pretrained(encoder_dir), dataset.examples, batch_size=4, mesh=mesh,
                          cache_dir=os.path.join(out, f"cache_{pid}"), progress=False)

import cronos  # noqa: E402  (after the runtime is up)
from heads import NNHead, clustering, supcon  # noqa: E402

Xs = (X - X.mean(0)) / X.std(0)
y = dataset.labels()
key = jax.random.key(0)
problem = cronos.ConvexReLU(Xs, cronos.encode_targets(y), patterns=np.asarray(cronos.sample_patterns(key, Xs, 8)),
                            beta=1e-3)
solved = cronos.solve(problem, cronos.ADMMConfig(rank=4), key=key, mesh=mesh)
km = clustering.kmeans(Xs, k=3, seed=0, n_init=2, mesh=mesh)
nn = NNHead.fit(X, y, ["en", "zh"], hidden=16, epochs=3, batch_size=6, seed=0, mesh=mesh, checkpoint_every=2,
                checkpoint_dir=os.path.join(out, "nn_checkpoints"))  # one directory shared by every process
projector, _ = supcon.train_projector(Xs, y, hidden=16, out_dim=8, steps=4, classes_per_batch=2,
                                      instances_per_class=3, seed=0, mesh=mesh)
if runtime.is_writer():
    os.makedirs(out, exist_ok=True)
    np.savez(os.path.join(out, f"results_{pid}.npz"), X=X, v=np.asarray(solved.v), w=np.asarray(solved.w),
             assignments=np.asarray(km.assignments), centroids=np.asarray(km.centroids),
             **{f"nn.{k}": v for k, v in nn.params.items()}, **{f"supcon.{k}": np.asarray(v) for k, v in projector.items()})
if num_processes > 1:
    multihost.worker_finish({"process": pid})
else:
    multihost.report({"process": pid})
