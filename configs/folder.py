"""Fine-tune on your own photos: one sub-folder per landmark (retrieval_jax/data/folder.py).

  python main.py --config=configs/folder.py --workdir=workdir/photos \
      --config.data.root=/photos                    # train, evaluating held-out landmarks
  python main.py --config=configs/folder.py --workdir=workdir/photos \
      --config.data.root=/photos --mode=evaluate    # the final checkpoint, fresh process

(`--config.data.list=photos.tsv` with `path<TAB>label` lines instead of `data.root` for
photos not sorted into folders.) 30% of the landmarks with two or more photos
(`data.heldout_fraction`, split by `seed`) are held out: one query each against the rest of
their photos plus the one-photo landmarks as distractors, mAP before and after training
and pictures in <workdir>/results/. The rest train with the demo's recipe
(configs/demo.py: ImageNet MobileNetV2-GeM, top blocks fine-tuned, contrastive loss with
in-batch hard negatives over 8 landmarks x 4 photos). Another ImageNet trunk by name:
`--config=configs/folder.py:resnet50` (any `imagenet-<trunk>` of README "Pretrained
models": resnet18/34/50/101/152, vgg16; fetched once into the cache, the whole trunk
fine-tuned), or a weight file with `--config.model.pretrained=<file>`. Fewer than 8
training landmarks: lower `data.classes_per_batch`.

Then export, describe, search and serve with the same flags (README "Your own photos").
"""
from configs import demo


def get_config(trunk: str = "mobilenet_v2"):
  c = demo.get_config()
  if trunk and trunk != "mobilenet_v2":
    c.model.backbone = trunk
    c.model.backbone_kwargs = {"bn_mode": "frozen_stats"}  # demo's frozen_blocks: MobileNetV2 only
    c.model.pretrained = f"name:imagenet-{trunk}"
    c.optim.freeze = ""
  c.data.name = "folder"
  c.eval.dataset = "folder"
  c.eval.extra_splits = ()  # the demo's real-views split is the demo set's own
  # Photos are larger than the demo's 192 px views; the test images are described at 512.
  c.extract.long_side = 512
  return c
