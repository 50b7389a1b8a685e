"""orbax checkpoints of the train state together with the grain iterator.

A checkpoint is `<workdir>/checkpoints/<step>/{state, data_iter}`. orbax writes each step to
a temporary folder and renames it when complete, so a run killed at any moment leaves only
restorable checkpoints. Extraction restores the params (and BatchNorm statistics) alone.
"""
import os
from typing import Any, Optional

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def manager(workdir: str, keep: int = 3, save_every: int = 1) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      checkpoint_dir(workdir),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                           create=True))


def save(mgr: ocp.CheckpointManager, step: int, state: Any, data_iter=None,
         force: bool = False) -> bool:
  args = {"state": ocp.args.PyTreeSave(state)}
  if data_iter is not None:
    args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
  return mgr.save(step, args=ocp.args.Composite(**args), force=force)


def _restore_args(abstract: Any):
  return jax.tree_util.tree_map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding) if hasattr(x, "sharding")
      and x.sharding is not None else ocp.RestoreArgs(), abstract)


def restore(mgr: ocp.CheckpointManager, abstract_state: Any, data_iter=None,
            step: Optional[int] = None):
  """Restores (state, step) into the shardings of `abstract_state`; the iterator in place."""
  step = mgr.latest_step() if step is None else step
  args = {"state": ocp.args.PyTreeRestore(item=abstract_state,
                                           restore_args=_restore_args(abstract_state))}
  if data_iter is not None:
    args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = mgr.restore(step, args=ocp.args.Composite(**args))
  logging.info("restored checkpoint step %d from %s", step, mgr.directory)
  return restored.state, step


def restore_variables(workdir: str, abstract_variables: Any, step: Optional[int] = None):
  """Only {"params", "batch_stats"} of a training checkpoint (no optimiser state)."""
  mgr = ocp.CheckpointManager(checkpoint_dir(workdir))
  step = mgr.latest_step() if step is None or step < 0 else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}: train first "
                            "(python main.py --config=... --workdir=...)")
  abstract = {k: abstract_variables[k] for k in ("params", "batch_stats")
              if k in abstract_variables}
  restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=abstract, restore_args=_restore_args(abstract), partial_restore=True)))
  return restored.state, step
