"""orbax checkpoints of the train state together with the grain iterator.

A checkpoint is `<workdir>/checkpoints/<step>/{state, data_iter}`. orbax writes each step to
`<step>.orbax-checkpoint-tmp` and renames it when complete, so a run killed at any moment
leaves only complete checkpoints under a step name (`latest_step()` ignores the temporary
folder). Extraction restores the params (and BatchNorm statistics) alone; `read_state` reads
any checkpoint as host numpy arrays, whatever the device topology it was written with.
"""
import os
from typing import Any, Dict, Optional

from absl import logging
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from retrieval_jax import errors
from retrieval_jax import storage


def checkpoint_dir(workdir: str) -> str:
  """`<workdir>/checkpoints`; a gs:// (any epath URL) workdir stays a URL."""
  return storage.join(storage.resolve(workdir), "checkpoints")


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
  """Restores (state, step) into the shardings of `abstract_state`; the iterator in place.

  With `data_iter=None` the checkpoint's iterator is not read (e.g. an epoch that ended).
  """
  step = mgr.latest_step() if step is None else step
  args = {"state": ocp.args.PyTreeRestore(item=abstract_state,
                                           restore_args=_restore_args(abstract_state))}
  if data_iter is not None:
    args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = mgr.restore(step, args=ocp.args.Composite(**args))
  logging.info("restored checkpoint step %d from %s", step, mgr.directory)
  return restored.state, step


def _require_step(mgr: ocp.CheckpointManager, workdir: str, step: int) -> None:
  """A requested step that was never saved (or was deleted) names the ones that exist."""
  steps = sorted(mgr.all_steps())
  if step not in steps:
    raise errors.CheckpointNotFoundError(
        f"extract.checkpoint_step={step}: there is no such checkpoint in "
        f"{checkpoint_dir(workdir)}; the steps saved there are {steps} "
        "(extract.checkpoint_step=-1 takes the latest)")


def restore_variables(workdir: str, abstract_variables: Any, step: Optional[int] = None):
  """Only {"params", "batch_stats"} of a training checkpoint (no optimiser state)."""
  mgr = ocp.CheckpointManager(checkpoint_dir(workdir))
  step = mgr.latest_step() if step is None or step < 0 else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}: train first "
                            "(python main.py --config=... --workdir=...)")
  _require_step(mgr, workdir, step)
  abstract = {k: abstract_variables[k] for k in ("params", "batch_stats")
              if k in abstract_variables}
  restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=abstract, restore_args=_restore_args(abstract), partial_restore=True)))
  return restored.state, step


def read_state(workdir: str, step: Optional[int] = None) -> Dict[str, Any]:
  """The "state" item of a training checkpoint as a dict of numpy arrays (for inspection).

  Args:
    workdir: the training workdir.
    step: checkpoint step; None for the latest.

  Returns:
    {"step", "params", "batch_stats", "opt_state", "head"} as nested dicts of np.ndarray.
  """
  mgr = ocp.CheckpointManager(checkpoint_dir(workdir))
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}")
  _require_step(mgr, workdir, step)
  path = os.path.join(checkpoint_dir(workdir), str(step), "state")
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(path).item_metadata.tree
  args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
