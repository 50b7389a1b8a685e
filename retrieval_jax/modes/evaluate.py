"""--mode=evaluate: the restored network through the evaluation pipeline, once.

The latest checkpoint (or the off-the-shelf `model.pretrained`): its post-hoc whitening
learned once per checkpoint, then every stage of `evaluation/pipeline.py`.
"""
from retrieval_jax.evaluation import pipeline
from retrieval_jax.evaluation import test_set as test_set_lib
from retrieval_jax.modes import common


def evaluate(config, workdir: str) -> common.Summary:
  test_set_lib.load(config, workdir)  # every image checked before any compute
  net, mesh = common.network(config, workdir)
  result = pipeline.evaluate_network(config, workdir, net.model, net.variables, mesh,
                                     step=net.step, tag=f"evaluate_{common.tag(net)}")
  return common.summary(workdir, {common.label(net): result}, net.step)
