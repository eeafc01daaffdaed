"""Language-detection heads on pooled speech embeddings (depends on `cronos`, `encoders.runtime` and `encoders.languages` only).

    from heads import ConvexReLUHead, NNHead, LinearHead
    head = ConvexReLUHead.fit(emb, labels, languages=["en", "zh"])
    head.predict_languages(emb); head.save("out/head"); ConvexReLUHead.load("out/head")

Every head saves as head.safetensors + head.json (`heads.io`); released jaxcld pickles load through
`heads.legacy` without jaxcld and without executing pickle code. With a mesh, `ConvexReLUHead`, `NNHead`,
`clustering.kmeans` and `supcon.train_projector` shard rows and batches by the rules of `encoders.runtime`.
"""

from heads.base import load_head
from heads.baselines import LinearHead, NNHead
from heads.convex import ConvexReLUHead

__all__ = ["ConvexReLUHead", "LinearHead", "NNHead", "load_head"]
