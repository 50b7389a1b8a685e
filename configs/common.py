"""Defaults shared by every experiment; each configs/<name>.py overrides what it needs.

Every field can be overridden on the command line: `--config.optim.lr=1e-6`. The config is
locked, so a mistyped key fails with its name.
"""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "demo"            # datasets registry name (retrieval_jax/data/datasets.py)
  c.data.root = ""                # dataset folder; "" = <workdir>/data
  c.data.split = "train"          # training split ("train_clean" for GLDv2-clean)
  # data.name="folder" (retrieval_jax/data/folder.py): your photos, one sub-folder per landmark
  # under data.root, or `path<TAB>label` lines in data.list; this share of the landmarks
  # (seeded by `seed`) is held out and evaluated (eval.dataset="folder").
  c.data.list = ""
  c.data.heldout_fraction = 0.3
  c.data.backend = "grain"         # "grain", "tfdata" (same batches) or "tfds" (from records)
  c.data.tfds_dir = ""             # data.backend="tfds": TFDS records; "" = <workdir>/tfds
  c.data.image_size = 362         # training crop side (the reference's --image-size)
  c.data.crop_scale = (0.5, 1.0)  # random resized crop area range
  c.data.classes_per_batch = 8    # K landmarks per global batch (in-step mining)
  c.data.images_per_class = 4     # M images per landmark
  c.data.sampler = "balanced"      # "balanced" (K x M, in-step mining) or "shuffle" (margin heads)
  c.data.batch_size = 0            # "shuffle" sampler's global batch; 0 = K * M
  c.data.train_resize = "crop"     # "crop" (random resized) or "long_side" (whole image, padded)
  # Epoch-level mining (train.mining = "epoch"), the reference's TuplesDataset:
  c.data.query_size = 2000         # (query, positive) pairs per epoch (--query-size)
  c.data.pool_size = 20000         # negative pool images per epoch (--pool-size)
  c.data.tuples_per_batch = 5      # tuples per train step (--batch-size); padded to the devices
  c.data.num_threads = 2

  c.model = ml_collections.ConfigDict()
  c.model.backbone = "resnet101"
  c.model.backbone_kwargs = ml_collections.ConfigDict({"bn_mode": "frozen_stats"})
  c.model.pretrained = ""          # .pth / .npz path, or "package:<module>/<relative path>"
  c.model.pooling = "gem"
  # GeM / regional: p_init, trainable (False: a fixed p; SuperGlobal's GeM+ is p_init=4.6).
  c.model.pooling_kwargs = ml_collections.ConfigDict({"p_init": 3.0, "trainable": True})
  c.model.whitening_dim = 0
  c.model.multi_layer = False
  # SuperGlobal (models/superglobal.py) on the feature map before pooling, any trunk:
  c.model.relup_alpha = 0.0        # ReLU+: clamp below at alpha (SuperGlobal: 0.014); 0 = off
  c.model.regional_gem = False     # regional GeM: 0.5 LPPool(reflect-padded) + 0.5 map
  c.model.regional_gem_p = 2.5
  c.model.regional_gem_size = 5    # odd window side
  # NetVLAD / ms_netvlad codebook before step 0: "" (random unit centres) or "kmeans" (faiss
  # k-means of the trunk's local features of netvlad_init_images training images).
  c.model.netvlad_init = ""
  c.model.netvlad_init_images = 64
  c.model.dtype = "float32"        # trunk compute dtype; "bfloat16" on TPU/GPU
  # DELG local head (retrieval_jax/local/, networks.py): "" none; "delg": attention (+ the
  # autoencoder when local_dim > 0) on the trunk's earlier stage, trained with the global loss,
  # its losses stopped at the trunk.
  c.model.local_head = ""
  c.model.local_dim = 128          # autoencoder output = local descriptor size; 0: raw stage
  c.model.local_attention_hidden = 512
  # The reference's BatchNorm between the attention convolutions (False: checkpoints written
  # before it, which have no `local_head/attention/bn_conv1`).
  c.model.local_attention_bn = True
  # The local stage subsampled by a 1x1 stride-2 max-pool, as DELG's block3_strides (ResNet
  # layer3: a stride-32 grid); the global trunk keeps its own layout unless
  # local_block3_strides feeds the subsampled layer3 to layer4 (then at stride 1), the
  # reference's trunk (ResNet only; changes the global descriptor of torchvision weights).
  c.model.local_subsample = 2
  c.model.local_block3_strides = False
  c.model.local_classifier = "softmax"  # attention classifier: "softmax", "arcface", "cosface"
  c.model.local_num_classes = 0    # its classes (>= the training set's labels)

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "contrastive"
  c.loss.margin = 0.85
  c.loss.num_negatives = 5
  c.loss.positives = "all"         # "all" same-landmark images, or the "hardest" one
  c.loss.reduction = "sum"         # the reference sums over the tuple
  c.loss.scale = 30.0              # ArcFace / CosFace logit scale s
  c.loss.vaccaro_t = 10            # Vaccaro: rank gap beyond which a triplet is "extremely hard"
  c.loss.vaccaro_mode = "mixed"    # "mixed", "semi-hard" or "hard"
  c.loss.semi_hard_prob = 0.5      # Vaccaro "mixed": probability of a semi-hard triplet
  # In-step mining pool: "global" (the whole global batch), "slice" (multislice meshes,
  # mesh.axes starting with "slice": each slice mines among its own rows, no DCN all-gather)
  # or "chip" (each device's rows alone: no all-gather).
  c.loss.mining_scope = "global"
  c.loss.local_attention_weight = 1.0       # DELG: attention CE weight (train.py flags)
  c.loss.local_reconstruction_weight = 10.0  # DELG: autoencoder MSE weight

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adam"
  c.optim.lr = 1e-6
  c.optim.weight_decay = 1e-6
  c.optim.decoupled_weight_decay = False  # the reference's Adam(weight_decay=..) is coupled
  c.optim.pool_lr_mult = 10.0      # GeM p: larger lr, no weight decay
  c.optim.head_lr_mult = 1.0       # ArcFace / CosFace head: lr multiplier (weight decay kept)
  c.optim.momentum = 0.9           # sgd only
  c.optim.schedule = "exp"         # "exp" (the reference: lr * exp(-0.01 * epoch)), "cosine", "constant"
  c.optim.steps_per_epoch = 400    # optimiser updates per epoch ("exp"); derived in epoch mining
  c.optim.warmup_steps = 0         # linear warmup (optimiser updates)
  c.optim.decay_steps = 0          # cosine length in updates; 0 = the whole run
  c.optim.cosine_alpha = 0.0       # cosine floor, as a fraction of lr
  c.optim.freeze = ""              # regex over param paths to keep fixed
  c.optim.grad_clip = 0.0
  c.optim.accumulate_steps = 1     # sum the gradients of k train steps per update (MultiSteps)

  c.train = ml_collections.ConfigDict()
  c.train.mining = "in_batch"      # "in_batch" (K x M batches) or "epoch" (the reference's tuples)
  c.train.num_steps = 1000         # train steps (micro-steps when accumulating)
  c.train.num_epochs = 0           # epoch mining: epochs of qsize tuples; 0 = use num_steps
  c.train.stop_after = 0           # stop (checkpointed) after this step, as if preempted; 0 = off
  c.train.log_every = 10
  c.train.checkpoint_every = 200
  c.train.keep_checkpoints = 3
  c.train.eval_before = True
  c.train.eval_every = 0           # 0: only at the end
  # Training evaluates with --mode=evaluate's pipeline (retrieval_jax/evaluation/pipeline.py);
  # stages named here are not run there (said in the results): "whitening", "qe_dba",
  # "rerank", "approximate", "pictures".
  c.train.eval_skip = ()

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1,)             # -1: all devices
  c.mesh.axes = ("data",)

  c.extract = ml_collections.ConfigDict()
  c.extract.long_side = 1024
  c.extract.batch_size = 8
  # --mode=extract / describe on a CPU host: XLA CPU devices, each describing its own image
  # (0: one per core; 1: one device; retrieval_jax/cpu_devices.py). XLA_FLAGS' count wins.
  c.extract.cpu_devices = 0
  c.extract.scales = (1.0,)        # e.g. (1, 2 ** -0.5, 0.5) for multi-scale
  c.extract.multiscale_combine = "gem"  # "gem" (the reference: learned p), "mean", "early_fusion"
  # or SuperGlobal's scale-GeM: "sgem" (max of L2-normalised scales), "sgem_power" (sgem_p)
  c.extract.sgem_p = 10.0
  c.extract.checkpoint_step = -1   # -1: latest
  # Evaluation input protocol (retrieval_jax/data/protocol.py); defaults = cirtorch's test.py:
  c.extract.query_resize = "reference"  # crop scaled as its whole image; or "long_side"
  c.extract.upscale = False        # never enlarge (PIL thumbnail); True: enlarge to long_side
  c.extract.resample = "lanczos"   # PIL LANCZOS (= the reference's ANTIALIAS) or "bilinear"
  c.extract.exif_transpose = "auto"  # "auto": off for benchmark datasets, on for user folders
  c.extract.multiscale_resize = "interpolate"  # F.interpolate on the device; "decode": re-decode
  # Local features (model.local_head): DELG's pyramid, top scores, NMS (retrieval_jax/local/).
  c.extract.local_long_side = 0    # 0: extract.long_side
  c.extract.local_scales = (0.7071, 1.0, 1.4142)
  c.extract.local_max_features = 1000
  # Attention score threshold, a per-config value tied to a trained model (the reference:
  # 454.6 for R50-DELG on GLDv2-clean, 100 for DELF); softplus scores are > 0, so 0 keeps
  # the top local_max_features.
  c.extract.local_score_threshold = 0.0
  c.extract.local_iou = 1.0        # NMS IoU on receptive boxes; 1.0 (DELF's default): none

  c.eval = ml_collections.ConfigDict()
  c.eval.dataset = "demo"
  c.eval.split = "test"
  # Further splits of eval.dataset scored beside it by every evaluation, under their names
  # in the results (the demo's "real": real multi-view photos of unseen places).
  c.eval.extra_splits = ()
  c.eval.root = ""
  c.eval.pictures = 4              # queries drawn with their top results; 0: none
  # Post-hoc whitening (retrieval_jax/postprocess/), the reference's test.py --whitening:
  c.eval.whitening = ""            # "" (none), "learned" (Lw from pairs), "pca" or "pfa"
  c.eval.whitening_dim = 0         # components kept; 0 = all ("pfa": features kept, > 0)
  c.eval.whitening_dataset = ""    # dataset to learn it on; "" = data.name
  c.eval.whitening_split = ""      # "" = "whiten" for SfM-120k/30k, else "train"
  c.eval.whitening_max_pairs = 0   # subsample the pairs (seeded); 0 = all
  c.eval.whitening_pca_dim = 0     # "learned": reduce to this many PCA components first; 0 = no
  c.eval.qe_k = 0                  # alpha query expansion: top-k added to each query; 0 = off
  c.eval.qe_alpha = 3.0
  c.eval.dba_k = 0                 # alpha-DBA: neighbours ITSELF INCLUDED (n_DBA + 1); 0 = off
  c.eval.allow_missing = False     # True: evaluate without missing images (recorded in the result)
  c.eval.dba_alpha = 3.0
  # Second-stage ranking (retrieval_jax/evaluation/rerankers.py, evaluation/local_rerankers.py), reported
  # beside the global-only numbers: "" off, "local" (DELG: RANSAC inliers), "asmk".
  # "superglobal": SuperGlobal's global-only MDescAug + RerankwMDA (evaluation/superglobal.py)
  # of the top superglobal_m, any network.
  c.eval.rerank = ""
  c.eval.superglobal_m = 400
  c.eval.superglobal_k = 9         # neighbours, the image itself excluded
  c.eval.superglobal_beta = 0.15
  # DELG's delg/perform_retrieval.py by default: the top 100 (each Revisited protocol's
  # junk skipped), nearest neighbours closer than 1.0, no ratio test, affine RANSAC 20 px,
  # sorted by raw (inliers, global score).
  c.eval.rerank_top = 100          # global top-N verified by eval.rerank=local
  c.eval.rerank_min_inliers = 0    # > 0: counts below it taken as 0 (not the reference's)
  c.eval.rerank_matcher = "distance"  # "distance" (DELG), "ratio" (Lowe), "mutual_nn"
  c.eval.rerank_distance = 1.0     # descriptor distance bound of "distance" (exclusive)
  c.eval.rerank_ratio = 0.9        # Lowe's threshold of "ratio"
  c.eval.rerank_model = "affine"   # RANSAC model: "affine" (DELG) or "homography"
  c.eval.rerank_backend = "skimage"  # "skimage" or "pydegensac" (homography)
  c.eval.rerank_residual = 20.0    # RANSAC inlier threshold, pixels of the loaded image
  c.eval.rerank_max_trials = 1000
  c.eval.rerank_stop_probability = 1.0  # < 1 lets RANSAC stop early on clear matches
  c.eval.rerank_threads = 2
  # eval.rerank=asmk: the HOW/ASMK protocol ranks the whole database by ASMK similarity
  # (-1); N > 0 re-orders only the global top N instead.
  c.eval.asmk_top = -1
  c.eval.asmk_codebook_size = 65536
  c.eval.asmk_train_images = 2000  # training images whose local features learn the codebook
  # The set the codebook is learned from ("" = data.name, the config's training set; HOW
  # learns it from SfM-120k's 20k-image subset: a HOW-style config names that set).
  c.eval.asmk_codebook_dataset = ""
  # eval.rerank=d2r: Detect-to-Retrieve (retrieval_jax/evaluation/d2r.py), the reference's
  # aggregation_config.proto defaults; queries plain, database regional (whole image + the
  # boxes of --mode=detect scored >= detect.score_threshold); L2 normalisation on for the
  # plain kernels, off for the regional ones. -1 ranks the whole database; N > 0 re-orders
  # the global top N.
  c.eval.d2r_aggregation = "asmk_star"  # "vlad", "asmk" or "asmk_star"
  c.eval.d2r_regional = True       # R-VLAD / R-ASMK / R-ASMK* for the database
  c.eval.d2r_regions = "crop"      # box features: "crop" extracted anew (reference), "select"
  c.eval.d2r_codebook_size = 65536
  c.eval.d2r_num_assignments = 1
  c.eval.d2r_alpha = 3.0
  c.eval.d2r_tau = 0.0
  c.eval.d2r_top = -1
  c.eval.d2r_train_images = 2000   # images whose local features learn the codebook
  c.eval.d2r_codebook_dataset = ""  # "" = data.name
  c.eval.d2r_kmeans_iterations = 50

  # --mode=detect (retrieval_jax/modes/detect.py): a landmark detector (TF SavedModel
  # folder, e.g. D2R's Faster R-CNN / MobileNet-SSD) on the test set's images; all boxes
  # go to <workdir>/boxes/<set>_<part>/, the threshold picks those used.
  c.detect = ml_collections.ConfigDict()
  c.detect.model = ""
  c.detect.score_threshold = 0.1   # extract_index_boxes_and_features.py's detector_thresh

  # --mode=export (retrieval_jax/export.py): the network with its input rule for serving.
  c.export = ml_collections.ConfigDict()
  c.export.dir = ""                # "" = <workdir>/export
  c.export.long_side = 0           # 0 = extract.long_side
  c.export.scales = ()             # () = extract.scales
  c.export.multiscale_combine = ""  # "" = extract.multiscale_combine ("gem" or "mean")
  c.export.normalize = True        # L2 the final descriptor
  # Bake in the post-hoc whitening of eval.whitening: "auto" follows eval.whitening (the
  # exported descriptor is the evaluated one); True / False force it.
  c.export.whitening = "auto"
  c.export.platforms = ("cpu", "cuda", "tpu")  # jax.export / SavedModel lowering platforms
  c.export.saved_model = True      # also the TF SavedModel (needs the `tf` extra)
  # The SavedModel's "serving_default": "auto" = "delg" for a DELG network (the reference's
  # input_image, input_scales, ... -> boxes, features, ... signature, retrieval_jax/
  # export_delg.py), else "describe" (image -> descriptor); both stay under their names.
  c.export.serving_default = "auto"
  c.export.local_max_scale = 0.0   # largest DELG input_scales accepted; 0 = max(local_scales)

  # --mode=describe (retrieval_jax/describe.py): a folder or list file of photos.
  c.describe = ml_collections.ConfigDict()
  c.describe.images = ""           # folder (recursive) or text file with one path per line
  c.describe.out = ""              # "" = <workdir>/describe
  c.describe.chunk = 1024          # images per resumable unit

  # --mode=search (retrieval_jax/index_search.py): top-k in a described folder.
  c.search = ml_collections.ConfigDict()
  c.search.index = ""              # a describe output folder; "" = <workdir>/describe
  c.search.query = ""              # an image, a folder or a list file
  c.search.k = 10
  c.search.backend = "exact"       # "exact" (device mesh) or "faiss" (index saved once)
  c.search.faiss_factory = "HNSW32"  # or e.g. "IVF4096,PQ32"
  c.search.nprobe = 16             # IVF lists visited per query
  c.search.out = ""                # "" = <workdir>/search
  c.search.pictures = 20           # queries drawn with their results
  # --mode=serve (retrieval_jax/search_page/): a search page + JSON API over the index of
  # search.index / describe.out / <workdir>/describe, with search.k and search.backend.
  c.serve = ml_collections.ConfigDict()
  c.serve.host = "127.0.0.1"       # "0.0.0.0" makes the page reachable from other machines
  c.serve.port = 8080
  c.serve.max_bytes = 20 * 2 ** 20  # largest query upload; larger ones get a 413
  # Evaluation at scale (roxford5k+1m): also the faiss top-k (factory / nprobe above) with
  # its mAP and recall@k against the exact top-k.
  c.eval.search_backend = "exact"  # "exact" or "faiss" (both reported)
  c.eval.approx_k = 100

  # --mode=compile (retrieval_jax/aot/): the run's programs compiled ahead of time for a TPU
  # topology on this machine (libtpu; nothing runs, no data is read), with memory, cost and
  # collectives per chip, written to <workdir>/compile/<topology>[_x<slices>].json.
  c.compile = ml_collections.ConfigDict()
  c.compile.topology = "v5e:16x16"  # <generation>:<chips>, as jax.experimental.topologies names it
  c.compile.num_slices = 1         # > 1: multislice over DCN, a leading "slice" mesh axis
  c.compile.programs = ("train", "extract", "local", "search")  # those to compile
  c.compile.batch_per_chip = 0     # train images (in_batch) / tuples (epoch) per chip; 0: config's
  c.compile.max_batch = False      # also bisect the largest per-chip train batch that fits
  c.compile.max_batch_limit = 512  # the search's upper end (per chip)
  c.compile.num_classes = 0        # margin-head classes; 0: the dataset's published count
  c.compile.steps_per_epoch = 0    # lr schedule's updates per epoch; 0: as training derives it
  c.compile.extract_buckets = "all"  # "all" of extraction's bucket shapes, or "largest" (square)
  c.compile.search_db_size = 1_000_000  # exact search: database rows (sharded over the chips)
  c.compile.search_queries = 10_000  # queries searched (in batches of search_query_batch)
  c.compile.search_query_batch = 1024
  c.compile.search_k = 100
  c.compile.search_dtype = "bfloat16"  # matmul inputs, "float32" or "bfloat16"
  c.compile.save_hlo = False       # also write each program's partitioned HLO beside the report
  return c
