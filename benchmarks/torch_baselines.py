"""The PyTorch side of the benchmarks: the same work as this project, two ways.

* "cirtorch": as cnnimageretrieval-pytorch's `extract_vectors` does it: float32, one image
  at a time at its own size (its DataLoader has batch_size=1), `net(input).cpu()` per image;
  multi-scale as its `extract_ms` (bilinear `interpolate` of the input per scale, sum of
  v^msp, mean, ^(1/msp), L2).
* "careful": what a careful PyTorch user would write: batched (the same size buckets as
  ours), channels_last, bf16 autocast on accelerators, no host round trip per batch.

The trunks are the test suite's torch transcriptions (tests/torch_reference.py: torchvision's
ResNet; MobileNetV2 below, torchvision's layout), so no torchvision is needed. Weights are
random: throughput does not depend on them.
"""
import os
import sys
import time
from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# Networks: trunk -> GeM -> L2 (cirtorch's ImageRetrievalNet without whitening).


class _ConvBNReLU6(nn.Sequential):

  def __init__(self, cin, cout, k=3, s=1, groups=1):
    super().__init__(nn.Conv2d(cin, cout, k, s, (k - 1) // 2, groups=groups, bias=False),
                     nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class _InvertedResidual(nn.Module):

  def __init__(self, cin, cout, s, t):
    super().__init__()
    hidden = int(round(cin * t))
    self.use_res = s == 1 and cin == cout
    layers = [] if t == 1 else [_ConvBNReLU6(cin, hidden, 1)]
    layers += [_ConvBNReLU6(hidden, hidden, 3, s, groups=hidden),
               nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
    self.conv = nn.Sequential(*layers)

  def forward(self, x):
    return x + self.conv(x) if self.use_res else self.conv(x)


def mobilenet_v2_features() -> nn.Sequential:
  """torchvision's `mobilenet_v2().features` (width 1.0), 1280 output channels."""
  setting = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
             (6, 160, 3, 2), (6, 320, 1, 1))
  layers, cin = [_ConvBNReLU6(3, 32, 3, 2)], 32
  for t, c, n, s in setting:
    for i in range(n):
      layers.append(_InvertedResidual(cin, c, s if i == 0 else 1, t))
      cin = c
  layers.append(_ConvBNReLU6(cin, 1280, 1))
  return nn.Sequential(*layers)


def resnet_features(depth: int, width: int = 64) -> nn.Sequential:
  r = torch_reference.ResNet(depth, width=width)
  return nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3,
                       r.layer4)


class GeMNet(nn.Module):
  """uint8 NCHW images -> normalised -> trunk -> GeM (learnable p) -> L2: [B, C]."""

  def __init__(self, features: nn.Module, p: float = 3.0):
    super().__init__()
    self.features = features
    self.p = nn.Parameter(torch.ones(1) * p)
    self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255)
    self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255)

  def normalise(self, images: torch.Tensor) -> torch.Tensor:
    return (images.float() - self.mean) / self.std

  def pool(self, fmap: torch.Tensor) -> torch.Tensor:
    # cirtorch's gem: avg_pool2d(x.clamp(min=eps).pow(p), (H, W)).pow(1/p), then l2n.
    v = fmap.float().clamp(min=1e-6).pow(self.p).mean((2, 3)).pow(1.0 / self.p)
    return v / (v.norm(dim=-1, keepdim=True) + 1e-6)

  def forward(self, normalised: torch.Tensor) -> torch.Tensor:
    return self.pool(self.features(normalised))


def make_net(arch: str, width: int = 64) -> GeMNet:
  """"mobilenet_v2" or "resnet<depth>" (`width` scales ResNets for quick runs)."""
  if arch == "mobilenet_v2":
    return GeMNet(mobilenet_v2_features())
  if arch.startswith("resnet"):
    return GeMNet(resnet_features(int(arch[len("resnet"):]), width))
  raise ValueError(f"no torch baseline for arch {arch!r}")


def sync(device: torch.device) -> None:
  if device.type == "cuda":
    torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# Extraction.


@torch.no_grad()
def extract_cirtorch(net: GeMNet, images: Sequence[np.ndarray], device: torch.device,
                     scales: Sequence[float] = (1.0,), msp: float = 1.0) -> np.ndarray:
  """cnnimageretrieval-pytorch's `extract_vectors`: one [1, 3, h, w] fp32 image at a time.

  Args:
    net: the network (eval mode, fp32, on `device`).
    images: uint8 [h, w, 3] each, already resized (its loader resizes on the host).
    device: where the network is.
    scales: `extract_ms` scales; (1,) is `extract_ss`.
    msp: the multi-scale power (the GeM p for GeM networks).
  Returns:
    [N, D] float32.
  """
  out = []
  for im in images:
    x = net.normalise(torch.from_numpy(im).to(device).permute(2, 0, 1)[None])
    if len(scales) == 1:
      out.append(net(x).cpu().squeeze(0))
      continue
    v = 0
    for s in scales:
      xs = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear",
                                          align_corners=False)
      v = v + net(xs).pow(msp).cpu().squeeze(0)
    v = (v / len(scales)).pow(1.0 / msp)
    out.append(v / v.norm())
  return torch.stack(out).numpy()


def careful_net(net: GeMNet, device: torch.device) -> GeMNet:
  """The network moved to `device` in channels_last (eval mode)."""
  return net.to(device).eval().to(memory_format=torch.channels_last)


@torch.no_grad()
def extract_batched(net: GeMNet, batches: Sequence[torch.Tensor], device: torch.device,
                    bf16: bool) -> List[torch.Tensor]:
  """Careful batched extraction: uint8 NCHW device batches -> descriptors left on device.

  Nothing is copied to the host per batch (the caller syncs once), as a careful user's
  loop with pinned, prefetched inputs would overlap it.
  """
  out = []
  dtype = torch.bfloat16
  for x in batches:
    x = net.normalise(x).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=dtype, enabled=bf16):
      out.append(net(x))
  return out


# ----------------------------------------------------------------------------------------------
# Training: one step of in-batch mined contrastive loss (as this project's "in_batch" mining).


def mined_contrastive_loss(desc: torch.Tensor, labels: torch.Tensor, margin: float,
                           num_negatives: int, eps: float = 1e-6) -> torch.Tensor:
  """Contrastive loss over every same-label pair and each anchor's k hardest negatives."""
  desc = desc.float()
  sim = desc @ desc.t()
  same = labels[:, None] == labels[None, :]
  eye = torch.eye(len(labels), dtype=torch.bool, device=desc.device)
  neg_sim = sim.masked_fill(same, -float("inf"))
  k = min(num_negatives, len(labels) - 1)
  neg_idx = neg_sim.topk(k, dim=1).indices
  d_neg = (desc[:, None, :] - desc[neg_idx] + eps).norm(dim=-1)
  neg_valid = torch.gather(~same, 1, neg_idx)
  d_all = torch.cdist(desc, desc)
  pos = same & ~eye
  loss = 0.5 * (d_all.pow(2) * pos).sum()
  loss = loss + 0.5 * (F.relu(margin - d_neg).pow(2) * neg_valid).sum()
  return loss


def make_train_step(net: GeMNet, device: torch.device, bf16: bool, lr: float = 1e-6,
                    margin: float = 0.85, num_negatives: int = 5):
  """A careful train step (channels_last, bf16 autocast, BN frozen): (images, labels) -> loss.

  BatchNorm stays in eval mode (cirtorch's `set_batchnorm_eval`), Adam as the reference.
  """
  net = net.to(device).to(memory_format=torch.channels_last)
  net.eval()  # frozen BN statistics, as the reference trains
  opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-6)

  def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    x = net.normalise(images).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
      desc = net(x)
    loss = mined_contrastive_loss(desc, labels, margin, num_negatives)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()

  return step


# ----------------------------------------------------------------------------------------------
# Exact search.


@torch.no_grad()
def knn(queries: torch.Tensor, database: torch.Tensor, k: int, query_batch: int
        ) -> Tuple[torch.Tensor, torch.Tensor]:
  """Top-k inner products: query chunks x the whole database (bf16 matmul), topk per chunk."""
  scores, index = [], []
  for start in range(0, queries.shape[0], query_batch):
    s = queries[start:start + query_batch].to(database.dtype) @ database.t()
    top = s.float().topk(k, dim=1)
    scores.append(top.values)
    index.append(top.indices)
  return torch.cat(scores), torch.cat(index)


def timed(fn, device: torch.device, repeats: int = 1) -> float:
  """Seconds per call of `fn` (after one warm-up call), device-synchronised."""
  fn()
  sync(device)
  t = time.perf_counter()
  for _ in range(repeats):
    fn()
  sync(device)
  return (time.perf_counter() - t) / repeats
