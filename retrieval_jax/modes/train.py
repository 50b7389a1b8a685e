"""--mode=train: train (resuming if a checkpoint exists), evaluating before and after."""
from retrieval_jax.modes import common
from retrieval_jax.train import loop as train_loop


def train(config, workdir: str) -> common.Summary:
  return common.summary(workdir, train_loop.train_and_evaluate(config, workdir))
