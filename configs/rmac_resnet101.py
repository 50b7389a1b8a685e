"""ResNet101-R-MAC fine-tuned on SfM-120k with the TPAMI recipe (cirtorch's `--pool rmac`).

  python3 -m cirtorch.examples.train YOUR_EXPORT_DIR --gpu-id '0' \
      --training-dataset 'retrieval-SfM-120k' --test-datasets 'roxford5k,rparis6k' \
      --arch 'resnet101' --pool 'rmac' --loss 'contrastive' --loss-margin 0.85 \
      --optimizer 'adam' --lr 5e-7 --neg-num 5 --query-size=2000 --pool-size=22000 \
      --batch-size 5 --image-size 362

  python main.py --config=configs/rmac_resnet101.py --workdir=WORKDIR --config.data.root=DATA \
      --config.model.pretrained=/path/to/resnet101-63fe2227.pth

R-MAC (the reference's version: the global MAC counts as one region, regions max-pooled and
L2-normalised, summed, L2) has no parameters, so there is no pool group and no 10x lr. The
descriptors are combined over scales by their mean (`multiscale_combine="mean"`: GeM's p
does not exist here).

Expected result: cirtorch publishes no fine-tuned R-MAC number for this command; the
off-the-shelf ImageNet ResNet101-R-MAC (the "before" evaluation) is the baseline to beat,
and the fine-tuned GeM network (configs/gem_resnet101.py) the number to approach.
"""
from configs import gem_resnet101


def get_config():
  c = gem_resnet101.get_config()
  c.model.pooling = "rmac"
  c.model.pooling_kwargs = {"levels": 3}
  c.extract.multiscale_combine = "mean"
  c.train.eval_before = True
  return c
