"""VGG16-NetVLAD (K = 64) fine-tuned on SfM-120k with epoch-mined tuples and a triplet loss.

NetVLAD (Arandjelović et al., CVPR 2016) was trained on Pittsburgh / Tokyo Time Machine with
weakly supervised triplets (margin 0.1 on squared distances, 10 negatives per query); those
sets are not in our registry, so this config trains the same architecture on the retrieval
data with the reference pipeline of configs/gem_resnet101.py:

  python main.py --config=configs/netvlad_vgg16.py --workdir=WORKDIR --config.data.root=DATA \
      --config.model.pretrained=/path/to/vgg16-397923af.pth

Choices (ours, not a published recipe): tuples (q, p, n_1..n_10), `losses.triplet_tuple_loss`
(sum over the 10 triplets, margin 0.1, squared distances: NetVLAD's and Vaccaro's form), Adam
lr 1e-6, 30 epochs. NetVLAD's centroids start from a faiss k-means of conv5 features of
`model.netvlad_init_images` training images (`model.netvlad_init="kmeans"`,
`postprocess/clustering.py`), as the NetVLAD paper initialises them; the data's suggested
alpha is logged (set `model.pooling_kwargs.alpha` to use it). With random unit centroids
(`--config.model.netvlad_init=""`) the first epochs only sort the codebook out. The
descriptor is 64 x 512 = 32768-D; a learned whitening to 4096-D (`eval.whitening_dim`)
follows NetVLAD's PCA-whitened 4096-D setting.

Expected result: the NetVLAD paper's off-the-shelf VGG16-NetVLAD (Pittsburgh-trained,
4096-D whitened) reaches 71.6 Oxford5k / 79.7 Paris6k / 87.5 Holidays mAP (as quoted in
Vaccaro et al., ICMR 2020, Table 3); no number is published for this SfM-120k training.
"""
from configs import gem_resnet101


def get_config():
  c = gem_resnet101.get_config()
  c.model.backbone = "vgg16"
  c.model.backbone_kwargs = {}
  c.model.pretrained = "vgg16-397923af.pth"
  c.model.pooling = "netvlad"
  c.model.pooling_kwargs = {"num_clusters": 64, "alpha": 100.0}
  c.model.netvlad_init = "kmeans"
  c.loss.name = "triplet"
  c.loss.margin = 0.1
  c.loss.num_negatives = 10
  c.optim.lr = 1e-6
  c.train.num_epochs = 30
  c.extract.scales = (1.0,)
  c.extract.multiscale_combine = "mean"
  c.eval.whitening_dim = 4096
  return c
