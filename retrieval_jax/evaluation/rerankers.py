"""Second-stage re-rankers of the evaluation pipeline, by name (`config.eval.rerank`).

A re-ranker gets what the previous stages produced (`Stage`: the final query and database
descriptors, their ranking, the test set, the descriptor settings) and returns a new
ranking of the same queries (`Reranked`). Adding one is one entry:

  @RERANKERS.register("mine")
  def _mine(context, stage) -> Reranked: ...

The built-in ones use local features (`evaluation/local_rerankers.py`: "local" = DELG geometric
verification, "asmk") or the global descriptors alone (`evaluation/superglobal.py`:
"superglobal"); `pipeline.py` imports them.
"""
import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional

import numpy as np

from retrieval_jax import registry
from retrieval_jax.evaluation import Ranking
from retrieval_jax.evaluation import test_set as test_set_lib


@dataclasses.dataclass(frozen=True)
class Stage:
  """The state a stage hands to the next: descriptors, their ranking, and its name."""
  name: str
  q: np.ndarray
  db: np.ndarray
  ranking: Ranking


@dataclasses.dataclass(frozen=True)
class Reranked:
  """A re-ranker's result: the new ranking, extra metrics, and the label its lines get."""
  ranking: Ranking
  label: str
  metrics: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Context:
  """What re-rankers may read besides the stage: the network, the settings, the test set.

  Attributes:
    config: the experiment config (a re-ranker's own `config.eval.*` fields).
    workdir, tag: where results and stores go, and the evaluation's name.
    model, variables, mesh: the network.
    settings: the `descriptor_settings.DescriptorSettings` of the evaluation.
    test: the checked `test_set.TestSet`.
    weights_tag: names the weights ("step<N>", "pretrained"): stores derived from them
      (local features, codebooks) are kept under it and shared by every evaluation and
      `--mode=extract` of the same checkpoint.
  """
  config: Any
  workdir: str
  tag: str
  model: Any
  variables: Any
  mesh: Any
  settings: Any
  test: test_set_lib.TestSet
  weights_tag: str = "weights"


Reranker = Callable[[Context, Stage], Reranked]
RERANKERS: registry.Registry[Reranker] = registry.Registry("eval.rerank")


def junk_by_setup(gt: Any, n_queries: int) -> Dict[str, Optional[List[set]]]:
  """Junk per protocol, as `delg/perform_retrieval.py` re-ranks: on Revisited sets (easy /
  hard / junk) {"easy": junk + hard, "medium": junk, "hard": junk + easy}, else {"": the
  set's junk (or None)}."""
  gnd = gt["gnd"] if isinstance(gt, Mapping) and "gnd" in gt else None
  if not gnd or not isinstance(gnd[0], Mapping) or "easy" not in gnd[0]:
    return {"": junk_sets(gt, n_queries)}

  def cat(j, *keys):
    return {int(i) for k in keys for i in np.asarray(gnd[j].get(k, []), np.int64).ravel()}
  return {setup: [cat(j, "junk", *extra) for j in range(n_queries)]
          for setup, extra in (("easy", ("hard",)), ("medium", ()), ("hard", ("easy",)))}


def junk_sets(gt: Any, n_queries: int) -> Optional[List[set]]:
  """Per-query junk database indices (not spent on verification), or None."""
  gnd = gt["gnd"] if isinstance(gt, Mapping) and "gnd" in gt else None
  if not gnd or not isinstance(gnd[0], Mapping):
    return None
  return [set(int(i) for i in np.asarray(gnd[j].get("junk", []), np.int64).ravel())
          for j in range(n_queries)]
