"""ResNet101-GeM fine-tuned on SfM-120k: the TPAMI 2018 recipe of cnnimageretrieval-pytorch.

Reference command (cirtorch README, "to train our best network described in the TPAMI 2018
paper"; the options it does not give take cirtorch's train.py defaults: 100 epochs,
weight decay 1e-6, Adam with coupled L2, pool lr x10 without weight decay, lr decayed by
exp(-0.01) per epoch, BatchNorm in eval mode):

  python3 -m cirtorch.examples.train YOUR_EXPORT_DIR --gpu-id '0' \
      --training-dataset 'retrieval-SfM-120k' --test-datasets 'roxford5k,rparis6k' \
      --arch 'resnet101' --pool 'gem' --loss 'contrastive' --loss-margin 0.85 \
      --optimizer 'adam' --lr 5e-7 --neg-num 5 --query-size=2000 --pool-size=22000 \
      --batch-size 5 --image-size 362

Here:

  python -m retrieval_jax.data.download retrieval-sfm-120k --dir DATA
  python -m retrieval_jax.data.download roxford5k --dir DATA
  python main.py --config=configs/gem_resnet101.py --workdir=WORKDIR --config.data.root=DATA \
      --config.model.pretrained=/path/to/resnet101-63fe2227.pth
  python main.py --config=configs/gem_resnet101.py --workdir=WORKDIR --config.data.root=DATA \
      --mode=evaluate                                     # learned whitening, 3 scales
  # Paris: add --config.eval.dataset=rparis6k

Every epoch: 2000 (query, positive) pairs of SfM-120k, a pool of 22000 random images described
by the current network, 5 hardest negatives per query (one per 3D model, never the query's),
tuples of 7 whole images (long side 362, not enlarged, no crop); 400 steps of 5 tuples (padded
to the device count with zero-weight tuples, so the update equals the reference's batch of 5);
the contrastive loss summed over pairs and tuples. 100 epochs = 40000 updates.

Expected result (cirtorch README table, "ResNet101-GeM (PyTorch)", evaluated with learned
whitening on SfM-120k and scales (1, 2^-1/2, 1/2) at 1024 px): Oxford5k 88.2, Paris6k 92.5,
ROxford M 65.4 / H 40.1, RParis M 76.7 / H 55.2 mAP. Differences to expect: the reference
starts from its own Caffe-converted ImageNet weights (`imagenet-caffe-resnet101-features-
10a101d.pth`); torchvision's weights are a different ImageNet model.
"""
from configs import common


def get_config():
  c = common.base_config()
  c.data.name = "retrieval-sfm-120k"
  c.data.image_size = 362                # --image-size: long side of whole training images
  c.data.query_size = 2000               # --query-size
  c.data.pool_size = 22000               # --pool-size (README command; train.py default 20000)
  c.data.tuples_per_batch = 5            # --batch-size
  c.data.num_threads = 8
  c.model.backbone = "resnet101"
  c.model.backbone_kwargs.bn_mode = "frozen_stats"  # model.apply(set_batchnorm_eval)
  c.model.pretrained = "resnet101-63fe2227.pth"     # torchvision ImageNet weights (a path)
  c.model.pooling = "gem"
  c.model.pooling_kwargs.p_init = 3.0
  c.loss.name = "contrastive"
  c.loss.margin = 0.85                   # --loss-margin
  c.loss.num_negatives = 5               # --neg-num
  c.loss.reduction = "sum"
  c.optim.name = "adam"
  c.optim.lr = 5e-7                      # --lr
  c.optim.weight_decay = 1e-6            # train.py default
  c.optim.decoupled_weight_decay = False  # torch.optim.Adam(weight_decay=...)
  c.optim.pool_lr_mult = 10.0
  c.optim.schedule = "exp"               # ExponentialLR(gamma=exp(-0.01)) per epoch
  c.optim.accumulate_steps = 1
  c.train.mining = "epoch"
  c.train.num_epochs = 100               # --epochs default
  c.train.checkpoint_every = 400         # once per epoch
  c.train.log_every = 20
  c.train.eval_before = False
  c.extract.long_side = 1024
  c.extract.scales = (1.0, 2 ** -0.5, 0.5)
  c.extract.multiscale_combine = "gem"
  c.extract.batch_size = 8
  c.eval.dataset = "roxford5k"
  c.eval.whitening = "learned"
  c.eval.whitening_dataset = "retrieval-sfm-120k"
  return c
