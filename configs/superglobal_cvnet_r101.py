"""SuperGlobal (Shao et al., ICCV 2023) on CVNet's ResNet-101 global network, off the shelf.

Reference (ShihaoShao-GH/SuperGlobal README, with the CVNet weights of sungonce/CVNet,
`CVPR2022_CVNet_R101.pyth`, trained on GLDv2-clean with CurricularFace, 2048-d reduction):

  python test.py MODEL.DEPTH 101 TEST.WEIGHTS ./weights TEST.DATA_DIR ./revisitop \
      SupG.gemp SupG.rgem SupG.sgem SupG.relup SupG.rerank SupG.onemeval False

Here (evaluation only; the weights file is imported once by path, models/cvnet.py):

  python -m retrieval_jax.data.download roxford5k --dir DATA
  python main.py --config=configs/superglobal_cvnet_r101.py --workdir=WORKDIR --mode=evaluate \
      --config.eval.root=DATA --config.model.pretrained=/path/to/CVPR2022_CVNet_R101.pyth
  # Paris: add --config.eval.dataset=rparis6k

What it runs: the CVNet ResNet-101 trunk with ReLU+ where the official code puts it (the
block outputs of stages 1-3 and stage 1's inner activations clamped at 0.014:
`backbone_kwargs.superglobal_relup`; `model.relup_alpha` is the trunk-agnostic variant on the
pooled map), regional GeM (p 2.5, 5x5),
GeM+ (fixed p 4.6, the file's learned p unused), L2, CVNet's 2048-d reduction, L2; three
scales (2^-1/2, 1, 2^1/2) combined by scale-GeM (max of the L2-normalised scales); then
SuperGlobal's re-ranking (M 400, K 9, beta 0.15), reported as `mAP_*_superglobal` beside the
global numbers.

Expected result (published: the paper's SuperGlobal with re-ranking on ResNet-101, as
listed by Papers with Code's ROxford / RParis Hard leaderboards): ROxford H 80.2,
RParis H 86.7 mAP. Differences to expect: the official images are OpenCV-decoded at full size with the other scales resized on the host
(INTER_AREA down, INTER_LINEAR up), here the scales are made on the device
(`F.interpolate`-style bilinear, extract.multiscale_resize="interpolate").
"""
from configs import common


def get_config():
  c = common.base_config()
  c.model.backbone = "resnet101"
  c.model.backbone_kwargs.bn_mode = "frozen_stats"
  c.model.pretrained = ""  # CVPR2022_CVNet_R101.pyth, by path (not redistributable here)
  c.model.pooling = "gem"
  c.model.pooling_kwargs = {"p_init": 4.6, "trainable": False, "eps": 1e-8}  # GeM+
  c.model.whitening_dim = 2048       # CVNet's reduction layer
  c.model.backbone_kwargs.superglobal_relup = 0.014  # ReLU+, where the official code has it
  c.model.regional_gem = True        # regional GeM
  c.model.regional_gem_p = 2.5
  c.model.regional_gem_size = 5
  c.extract.long_side = 1024         # revisitop's images are at most 1024 px: full size
  c.extract.scales = (0.7071, 1.0, 1.4142)
  c.extract.multiscale_combine = "sgem"
  c.extract.multiscale_resize = "interpolate"
  c.eval.dataset = "roxford5k"
  c.eval.rerank = "superglobal"
  c.eval.superglobal_m = 400
  c.eval.superglobal_k = 9
  c.eval.superglobal_beta = 0.15
  c.eval.pictures = 0
  return c
