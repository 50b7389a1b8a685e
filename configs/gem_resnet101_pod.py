"""ResNet101-GeM on SfM-120k for a TPU pod slice: in-step mining over a global batch of 8192.

configs/gem_resnet101.py reproduces the reference's update of 5 tuples (35 images); on a
v5e-256 slice that batch is padded with zero-weight tuples to one tuple per chip, so ~98% of
the pod computes nothing. Here every image of a balanced batch of K x M = 512 landmarks
(SfM-120k 3D models) x 16 whole images (long side 362, padded, as the reference trains) is an
anchor: its hardest positive and its 5 hardest negatives among the 8192 images of the step
(all-gathered over the slice, `retrieval_jax/mining/in_batch.py`), the contrastive loss with
the reference's margin, averaged. 32 images per v5e chip on 256 chips (configs' batch is
global: on another slice size scale data.classes_per_batch with the chips).

Learning rate. The reference trains Adam at 5e-7 on 5 tuples per update. For Adam the
square-root rule keeps the update's noise scale when the batch grows by k: lr x sqrt(k)
(Malladi et al., "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms", NeurIPS
2022; the linear rule of Goyal et al. is SGD's). k = 8192 anchors / 5 tuples = 1638, so
lr = 5e-7 x 40.5 = 2e-5 (GeM p x10, as the reference). Warm-up: a linear ramp from 0 over the
first 5% of the updates (Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1
Hour", 2017: large-batch training diverges early without it, as Adam's moment estimates are
still noisy), then a cosine decay instead of the reference's per-epoch exp(-0.01), which has
no epochs to step here. Length: the reference sees 100 x 2000 tuples (1.4M image passes); at
8192 images per step that is ~170 updates, too few to warm up and decay, so this recipe takes
2000 (16M image passes, ~140 over SfM-120k's 117k images).

Expected result: the reference's (configs/gem_resnet101.py: ROxford M 65.4 / H 40.1, RParis
M 76.7 / H 55.2 with learned whitening and 3 scales); not yet trained on a pod, so check it
before relying on this recipe.

Before renting the slice:
  python main.py --config=configs/gem_resnet101_pod.py --workdir=W --mode=compile \
      --config.compile.topology=v5e:16x16 [--config.compile.max_batch=True]
Then on the pod (launch/): as configs/gem_resnet101.py, with this config.
"""
from configs import gem_resnet101


def get_config():
  c = gem_resnet101.get_config()
  c.data.classes_per_batch = 512         # K landmarks per global batch
  c.data.images_per_class = 16           # M images each: 8192 images = 32 per v5e-256 chip
  c.data.sampler = "balanced"
  c.data.train_resize = "long_side"      # whole images, long side 362, padded (the reference)
  c.model.dtype = "bfloat16"             # trunk compute; params stay float32
  c.loss.name = "contrastive"
  c.loss.margin = 0.85
  c.loss.num_negatives = 5
  c.loss.positives = "hardest"           # one positive + 5 negatives per anchor: a tuple
  c.loss.reduction = "mean"
  c.loss.mining_scope = "global"         # multislice: "slice" keeps the all-gather off DCN
  c.optim.lr = 5e-7 * (8192 / 5) ** 0.5  # sqrt scaling for Adam (Malladi et al. 2022)
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 100             # 5% of the run, linear from 0 (Goyal et al. 2017)
  c.train.mining = "in_batch"
  c.train.num_epochs = 0
  c.train.num_steps = 2000
  c.train.checkpoint_every = 200
  c.train.log_every = 10
  c.extract.batch_size = 256             # one 1024 px image per v5e-256 chip
  return c
