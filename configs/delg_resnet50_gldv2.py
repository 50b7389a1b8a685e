"""R50-DELG on GLDv2-clean: global (GeM + whitening, ArcFace) and local (attention +
autoencoder) features from one ResNet-50, trained jointly (Cao, Araujo, Sim, ECCV 2020).

  python -m retrieval_jax.data.download gldv2 --dir DATA
  python main.py --config=configs/delg_resnet50_gldv2.py --workdir=WORKDIR \
      --config.data.root=DATA --config.model.pretrained=/path/to/resnet50-0676ba61.pth
  python main.py --config=configs/delg_resnet50_gldv2.py --workdir=WORKDIR --mode=evaluate \
      --config.eval.dataset=roxford5k --config.eval.root=DATA_ROXF \
      --config.eval.rerank=local --config.eval.rerank_top=100

The paper's setting (tensorflow/models research/delf, `train.py --delg_global_features
--use_autoencoder`): the global half is configs/arcface_gldv2_resnet50.py (GeM p = 3 fixed,
2048-D whitening FC, ArcFace margin 0.1, scale 45.25, 81,313 classes, 512 px crops); the
local half reads layer3 (1024 channels) subsampled to stride 32 (`block3_strides`,
`model.local_subsample=2`) under stop_gradient: attention 1x1 conv 512 -> BatchNorm -> ReLU
-> 1x1 conv -> softplus, trained by a softmax classifier on attention-pooled
features (weight 1), and an autoencoder 1024 -> 128 -> 1024 (reconstruction MSE, weight 10)
whose 128-D output is the local descriptor. Extraction as DELG's config
(`r50delg_gldv2clean_config.pbtxt`): image long side 1024, local features over the 7 scales
0.25 ... 2.0 (the config's exact values), attention score threshold 454.6, at most 1000
per image, global descriptor over scales 0.7071, 1, 1.4142. Re-ranking as
`delg/perform_retrieval.py`: the global top 100 (junk of each protocol skipped) matched by
nearest neighbours within descriptor distance 1.0 (no ratio test), verified by RANSAC
(affine, 20 px, 1000 trials, seed 0), sorted by (inliers, global score).

The schedule is the ArcFace config's (SGD + cosine, shorter than DELG's 1.5M steps); read
the DELF training instructions before comparing numbers. The threshold 454.6 is the
reference's for its trained model; a model trained here may put its scores elsewhere.

Expected result (DELG paper, R50-DELG trained on GLDv2-clean, quoted from memory: verify
before relying on it): Revisited Oxford Medium / Hard mAP about 73.6 / 51.0 with the global
feature only and about 78 / 58 after geometric re-ranking of the top 100; Revisited Paris
about 85.7 / 71.5 global-only, with a smaller gain from re-ranking.
"""
from configs import arcface_gldv2_resnet50


def get_config():
  c = arcface_gldv2_resnet50.get_config()
  c.model.local_head = "delg"
  c.model.local_dim = 128
  c.model.local_attention_hidden = 512
  c.model.local_num_classes = 81313  # GLDv2 train-clean landmarks
  c.loss.local_attention_weight = 1.0
  c.loss.local_reconstruction_weight = 10.0
  c.extract.local_scales = (0.25, 0.35355338, 0.5, 0.70710677, 1.0, 1.4142135, 2.0)
  c.extract.local_max_features = 1000
  c.extract.local_score_threshold = 454.6  # r50delg_gldv2clean_config.pbtxt
  c.eval.rerank_top = 100
  return c
