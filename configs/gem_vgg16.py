"""VGG16-GeM fine-tuned on SfM-120k (cnnimageretrieval-pytorch, TPAMI 2018).

The cirtorch README publishes the ResNet-101 command only (configs/gem_resnet101.py); this is
the same recipe on VGG16:

  python3 -m cirtorch.examples.train YOUR_EXPORT_DIR --gpu-id '0' \
      --training-dataset 'retrieval-SfM-120k' --test-datasets 'roxford5k,rparis6k' \
      --arch 'vgg16' --pool 'gem' --loss 'contrastive' --loss-margin 0.75 \
      --optimizer 'adam' --lr 1e-6 --neg-num 5 --query-size=2000 --pool-size=22000 \
      --batch-size 5 --image-size 362

with two values that are ours, not the README's: margin 0.75 (the TPAMI paper's VGG margin,
as we read it) and lr 1e-6 (cirtorch's train.py default; the README lowered ResNet-101's to
5e-7). Check them against the paper before comparing numbers.

  python main.py --config=configs/gem_vgg16.py --workdir=WORKDIR --config.data.root=DATA \
      --config.model.pretrained=/path/to/vgg16-397923af.pth

Expected result (cirtorch README, "VGG16-GeM (PyTorch)", learned whitening, 3 scales):
Oxford5k 87.3, Paris6k 87.8, ROxford M 60.9 / H 32.9, RParis M 69.3 / H 44.2 mAP.
"""
from configs import gem_resnet101


def get_config():
  c = gem_resnet101.get_config()
  c.model.backbone = "vgg16"
  c.model.backbone_kwargs = {}           # VGG16 has no BatchNorm
  c.model.pretrained = "vgg16-397923af.pth"  # torchvision ImageNet weights (a path)
  c.loss.margin = 0.75
  c.optim.lr = 1e-6
  return c
