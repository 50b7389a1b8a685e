"""One file per `main.py --mode=<mode>` (registered in `retrieval_jax/run.py`'s `MODES`).

  train.py     train (resuming if a checkpoint exists), evaluating before and after;
  evaluate.py  restore the latest checkpoint (or the off-the-shelf `model.pretrained`), learn
               the requested post-hoc whitening once, run the evaluation pipeline;
  extract.py   descriptors of the test set's queries and database to
               `<workdir>/descriptors/<set>_<part>/` (and their whitened versions); with a
               local head (DELG), local features to `<workdir>/local/<tag>/<set>_<part>/`;
  export.py    the network as a jax.export function + TF SavedModel (`export.py`);
  describe.py  every image of a folder / list file to descriptors, resumable (`describe.py`);
  detect.py    a detector SavedModel's boxes of the test set to `<workdir>/boxes/<set>_<part>/`
               (Detect-to-Retrieve's regions, `eval.rerank=d2r`);
  search.py    top-k of query images in a described folder, JSON + pictures
               (`index_search.py`).
  serve        a search page and JSON API over a described folder (`search_page/`).
  compile      every program above compiled for a TPU topology, nothing run (`aot/`).

`common.py` holds what several modes share: the restored network, its tag, the summary.
"""
