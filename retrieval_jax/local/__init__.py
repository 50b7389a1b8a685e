"""Local features (DELF / DELG) and their use in retrieval.

heads.py           attention head, autoencoder, attention pooling, the local losses
model.py           DelfNet (trunk + local head), DelgNet (a RetrievalNet + local head)
receptive_field.py receptive boxes of a trunk stage, derived from its layers
delg_input.py      DELG's input rule: PIL load + size bound, tf.image.resize pyramid levels
keypoints.py       image pyramid -> top-scoring positions -> NMS -> keypoints (masked, batched)
extract.py         an image collection -> a store (resumable)
store.py           per-image keypoints on disk (streaming, resumable)
matching.py        mutual-NN / ratio-test matching + RANSAC verification
geometric_rerank.py re-ranking a global top-N by verified inliers, per protocol's junk
asmk_index.py      ASMK aggregation over local descriptors (the `asmk` package)
aggregation.py     Detect-to-Retrieve's VLAD / ASMK / ASMK* and R-VLAD / R-ASMK / R-ASMK*
boxes.py           detected boxes (`--mode=detect`) and the regions they make

The modes use them through `retrieval_jax/networks.py` (which network a config builds) and
the evaluation pipeline's re-rankers (`retrieval_jax/evaluation/local_rerankers.py`,
`eval.rerank`).
"""
