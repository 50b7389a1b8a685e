"""Multi-scale NetVLAD with Vaccaro et al.'s triplet mining (ICMR 2020), on a ResNet-50.

Vaccaro, Bertini, Uricchio, Del Bimbo, "Image retrieval using multi-scale CNN features
pooling": conv features max-pooled with 2x2 and 3x3 stride-1 windows, both sets aggregated by
one NetVLAD (K = 64, k-means initialised), trained on GLDv2-clean (1,580,470 images, 81,313
landmarks) with a triplet loss (alpha = 0.1, squared distances) on triplets of Algorithm 1:
512 random landmarks, 2048 images, per query the first negative n of its ranked list and
either the positive just before it (semi-hard, probability 0.5) or the first positive after
it (hard), dropped when that positive is more than t ranks away, one triplet per landmark
(~250 triplets). Adam, lr 1e-5 (later 1e-6), images resized to 336 x 336.

  python -m retrieval_jax.data.download gldv2 --dir DATA
  python main.py --config=configs/msnetvlad_resnet50.py --workdir=WORKDIR \
      --config.data.root=DATA --config.model.pretrained=/path/to/resnet50-0676ba61.pth

Differences from the paper, by design: the paper uses VGG16 (this file: ResNet-50, as the
paper says other trunks plug in; --config.model.backbone=vgg16 restores it); it mines on one
forward pass of 2048 images and then trains mini-batches of 24 triplets, re-mining every 8
iterations, while here each step mines inside the global batch of 512 x 4 images and
back-propagates through the triplets found (`mining.vaccaro_triplet_loss`), so the global
batch must fit the devices (lower data.classes_per_batch otherwise: the triplets per step
scale with it); the paper's t is not given (loss.vaccaro_t = 10 is ours); the lr drop to 1e-6
"after a few epochs" is a cosine decay here; the 336 x 336 resize ignores the aspect ratio in
the paper, a random resized crop keeps it roughly here.

Expected result (paper, Table 3, VGG16, scales 224 + 336 + 504, power normalisation):
Holidays 93.2, Oxford5k 83.8, Paris6k 89.3 mAP.
"""
from configs import common


def get_config():
  c = common.base_config()
  c.data.name = "gldv2"
  c.data.split = "train_clean"
  c.data.image_size = 336
  c.data.crop_scale = (0.8, 1.0)
  c.data.classes_per_batch = 512         # Algorithm 1's k landmarks
  c.data.images_per_class = 4            # 2048 images per mining batch
  c.data.num_threads = 16
  c.model.backbone = "resnet50"
  c.model.backbone_kwargs.bn_mode = "frozen_stats"
  c.model.pretrained = "resnet50-0676ba61.pth"  # torchvision ImageNet weights (a path)
  c.model.pooling = "ms_netvlad"
  c.model.pooling_kwargs = {"num_clusters": 64, "alpha": 100.0, "windows": (2, 3)}
  c.model.netvlad_init = "kmeans"  # the docstring's "k-means initialised" (faiss, before step 0)
  c.loss.name = "vaccaro_triplet"
  c.loss.margin = 0.1
  c.loss.vaccaro_t = 10
  c.loss.vaccaro_mode = "mixed"
  c.loss.semi_hard_prob = 0.5
  c.loss.reduction = "mean"
  c.optim.name = "adam"
  c.optim.lr = 1e-5
  c.optim.weight_decay = 0.0
  c.optim.pool_lr_mult = 1.0             # the NetVLAD layer trains at the trunk's lr
  c.optim.schedule = "cosine"
  c.optim.cosine_alpha = 0.1             # 1e-5 -> 1e-6
  c.train.num_steps = 20000
  c.train.checkpoint_every = 1000
  c.train.log_every = 50
  c.extract.long_side = 504
  c.extract.scales = (224 / 504, 336 / 504, 1.0)
  c.extract.multiscale_combine = "mean"
  c.eval.dataset = "holidays"
  return c
