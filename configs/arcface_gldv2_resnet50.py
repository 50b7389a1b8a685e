"""ResNet50-GeM + whitening FC trained with ArcFace on GLDv2-clean (DELG's global branch).

The global half of DELG (Cao et al., ECCV 2020; tensorflow/models research/delf): ResNet-50,
GeM with a fixed p = 3, a 2048-D fully connected whitening, L2, and an ArcFace head (margin
0.1, scale sqrt(2048) = 45.25) over the 81,313 landmarks of GLDv2's train-clean split,
plain shuffled batches of random crops. The head lives in the train state beside the model
and is dropped at extraction.

  python -m retrieval_jax.data.download gldv2 --dir DATA
  python main.py --config=configs/arcface_gldv2_resnet50.py --workdir=WORKDIR \
      --config.data.root=DATA --config.model.pretrained=/path/to/resnet50-0676ba61.pth

Our schedule (SGD, momentum 0.9, lr 0.01 with a cosine decay, batch 256 crops of 512 px,
BatchNorm frozen) approximates DELG's and is shorter than its 1.5M steps; read the DELF
training instructions before comparing numbers. CosFace: --config.loss.name=cosface
--config.loss.margin=0.35.

Expected result: the DELG paper reports about 73.6 (M) / 51.0 (H) ROxford and 85.7 / 71.5
RParis mAP for its global-only R50 feature trained on GLDv2-clean (multi-scale, 1024 px);
quoted from the paper from memory: verify before relying on it.
"""
from configs import common


def get_config():
  c = common.base_config()
  c.data.name = "gldv2"
  c.data.split = "train_clean"
  c.data.sampler = "shuffle"
  c.data.batch_size = 256
  c.data.image_size = 512
  c.data.crop_scale = (0.25, 1.0)
  c.data.num_threads = 16
  c.model.backbone = "resnet50"
  c.model.backbone_kwargs.bn_mode = "frozen_stats"
  c.model.pretrained = "resnet50-0676ba61.pth"  # torchvision ImageNet weights (a path)
  c.model.pooling = "gem"
  c.model.pooling_kwargs = {"p_init": 3.0, "trainable": False}
  c.model.whitening_dim = 2048
  c.loss.name = "arcface"
  c.loss.margin = 0.1
  c.loss.scale = 45.25
  c.optim.name = "sgd"
  c.optim.momentum = 0.9
  c.optim.lr = 0.01
  c.optim.weight_decay = 1e-4
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 1000
  c.train.num_steps = 200000
  c.train.checkpoint_every = 5000
  c.train.log_every = 100
  c.train.eval_before = False
  c.extract.long_side = 1024
  c.extract.scales = (2 ** -0.5, 1.0, 2 ** 0.5)
  c.extract.multiscale_combine = "mean"
  c.eval.dataset = "roxford5k"
  return c
