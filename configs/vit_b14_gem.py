"""DINOv2 ViT-B/14 with GeM over its patch tokens, fine-tuned on SfM-120k for a TPU pod slice.

The trunk is `models/vit.py`'s `vit_b14` (DINOv2's layout: patch 14, layer scale, 37 x 37
positional grid resampled to any image size, padded images masked); the descriptor is GeM
(p 3, learned) over the final patch tokens, L2-normalised: the ResNet-GeM recipe of this
project on a ViT, as in-domain fine-tuning of DINOv2 features is usually done. Training is
configs/gem_resnet101_pod.py's (in-step mining over a global batch of 8192 whole images,
512 landmarks x 16, contrastive loss, Adam with sqrt-scaled lr, warm-up then cosine, bf16
compute) at 224 px: 32 images per chip on a v5e-256. Evaluation describes images at 518 px
long side, the resolution DINOv2's positional grid was learned at (no resampling).

Weights: DINOv2's `dinov2_vitb14_pretrain.pth` (facebookresearch/dinov2) or timm's
`vit_base_patch14_dinov2` `.safetensors`, by path (not shipped here).

  python -m retrieval_jax.data.download retrieval-sfm-120k --dir DATA
  python -m retrieval_jax.data.download roxford5k --dir DATA
  # Before renting the slice: the compiled train step's memory, FLOPs and roofline
  # (BENCHMARKS.md "Pod rehearsal", case vit_b14_v5e):
  python main.py --config=configs/vit_b14_gem.py --workdir=W --mode=compile \
      --config.compile.topology=v5e:16x16 --config.compile.programs='("train",)'
  # Off the shelf (no training; DINOv2's features with GeM, ROxford / RParis E/M/H):
  python main.py --config=configs/vit_b14_gem.py --workdir=W --mode=evaluate \
      --config.eval.root=DATA --config.model.pretrained=/path/to/dinov2_vitb14_pretrain.pth
  # Fine-tune on the pod (launch/), then evaluate as above:
  python main.py --config=configs/vit_b14_gem.py --workdir=W --config.data.root=DATA \
      --config.model.pretrained=/path/to/dinov2_vitb14_pretrain.pth
  # Paris: --config.eval.dataset=rparis6k

Expected result: none published for this recipe; it has not been trained yet (no
accelerator so far). What it compiles to on a v5e-256 is in BENCHMARKS.md.
"""
from configs import gem_resnet101_pod


def get_config():
  c = gem_resnet101_pod.get_config()
  c.data.image_size = 224              # long side of the whole training images (16 x 16 patches)
  c.model.backbone = "vit_b14"         # embed 768, depth 12, 12 heads; pos_grid 37 (DINOv2)
  c.model.pretrained = "dinov2_vitb14_pretrain.pth"  # a path (facebookresearch/dinov2)
  c.model.pooling = "gem"              # over the patch tokens ("cls", "cls_gem" also exist)
  c.model.pooling_kwargs.p_init = 3.0
  c.extract.long_side = 518            # 37 x 37 patches: DINOv2's own grid
  c.extract.scales = (1.0,)
  c.extract.batch_size = 256           # one image per v5e-256 chip
  c.eval.whitening = ""
  c.eval.whitening_dataset = ""
  return c
