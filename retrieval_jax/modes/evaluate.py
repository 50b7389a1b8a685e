"""--mode=evaluate: the restored network through the evaluation pipeline, once.

The latest checkpoint (or the off-the-shelf `model.pretrained`), the requested post-hoc
whitening learned once per checkpoint, then `evaluation/pipeline.py`.
"""
from typing import Any, Callable, Dict, Optional, Tuple

from retrieval_jax import extract as extract_lib
from retrieval_jax import paths
from retrieval_jax import restore
from retrieval_jax.data import datasets
from retrieval_jax.data import integrity
from retrieval_jax.evaluation import pipeline as evaluate_lib
from retrieval_jax.local import benchmark as local_benchmark
from retrieval_jax.modes import common
from retrieval_jax.postprocess import whitening_store


def prepare(config, workdir: str) -> Tuple[restore.Restored, Any, Any, Callable[..., Any],
                                            Optional[Dict[str, Any]]]:
  """(restored network, mesh, test set, describe fn, whitening or None) for `config`.

  The whitening is learned after training from training pairs (or PCA), once per
  checkpoint (`postprocess/whitening_store.py`); None unless `config.eval.whitening` asks.
  """
  root = config.eval.root or paths.data_root(config, workdir)
  test_set = datasets.get_dataset(config.eval.dataset, root, config.eval.split)
  # Every image of the benchmark must be there before any compute (data/integrity.py); a
  # cheap existence check here, the full one (headers, counts) where the set is described.
  integrity.check_retrieval_set(test_set, root=root, check="exists",
                                allow_missing=config.eval.allow_missing)
  net, mesh = common.network(config, workdir)
  describe = extract_lib.make_describe_fn(net.model, mesh)  # compiled once for every set
  white = whitening_store.get_or_compute(config, workdir, net.model, net.variables, mesh,
                                         net.step, describe_fn=describe)
  return net, mesh, test_set, describe, white


def evaluate(config, workdir: str) -> common.Summary:
  net, mesh, test_set, describe, white = prepare(config, workdir)
  result = evaluate_lib.evaluate(net.model, net.variables, test_set, mesh=mesh,
                                 extract_config=config.extract, workdir=workdir,
                                 tag=f"evaluate_{common.tag(net)}", pictures=config.eval.pictures,
                                 whitening=white, describe_fn=describe,
                                 rerank=evaluate_lib.rerank_config(config.eval),
                                 allow_missing=config.eval.allow_missing,
                                 data_root=config.eval.root or paths.data_root(config, workdir),
                                 approximate=evaluate_lib.approximate_config(config))
  if config.eval.rerank:
    # Local features (model.local_head): the re-ranked numbers beside the global ones.
    extra = local_benchmark.evaluate_rerank(config, workdir, net.model, net.variables, mesh,
                                           test_set, tag=f"evaluate_{common.tag(net)}",
                                           whitening=white, describe_fn=describe)
    suffix = f"_{config.eval.rerank}"
    result = dict(result, **{k: v for k, v in extra.items() if k.endswith(suffix)})
    result["lines"] = list(result["lines"]) + extra["rerank_lines"]
  label = common.label(net)
  return common.summary(workdir, {label: result}, net.step)


