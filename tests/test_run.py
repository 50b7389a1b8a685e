"""run.py's one dispatch: every mode is a MODES entry; a wrong name lists the valid ones."""
import pytest

from configs import common
from retrieval_jax import registry
from retrieval_jax import run


def test_unknown_mode_fails_listing_the_modes(tmp_path):
  with pytest.raises(ValueError, match=r"'trian'.*\[.*'evaluate'.*'train'"):
    run.run("trian", common.base_config(), str(tmp_path))
  assert {"train", "evaluate", "extract"} <= set(run.MODES.names())


def test_registry_adds_by_decorator_or_value_and_refuses_twice():
  reg = registry.Registry("thing")

  @reg.register("a")
  def _a():
    return 1

  reg.register("b", 2)
  assert reg.get("a")() == 1 and reg.get("b") == 2 and reg.names() == ["a", "b"]
  with pytest.raises(ValueError, match="thing 'a' registered twice"):
    reg.register("a", 3)
