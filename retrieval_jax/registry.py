"""One way to choose code by name from a config: a `Registry` of named entries.

Every name-selected family (run modes, backbones, datasets, evaluators, re-rankers,
multi-scale combinations, poolings, losses, loss families, training inputs) is a
`Registry`; an entry is added with `REG.register("name", value)` or as a decorator
`@REG.register("name")`, looked up with `REG.get(name)`, which fails with the known names.
"""
from typing import Dict, Generic, Iterator, List, Optional, Tuple, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """Named entries of one kind (`what` names the kind in error messages)."""

  def __init__(self, what: str):
    self.what = what
    self._entries: Dict[str, T] = {}

  def register(self, name: str, value: Optional[T] = None, *, replace: bool = False):
    """Adds `value` under `name`; without `value`, a decorator that adds what it decorates.

    A name registered twice is an error unless `replace` (then the new entry wins).
    """
    def add(v: T) -> T:
      if name in self._entries and not replace:
        raise ValueError(f"{self.what} {name!r} registered twice")
      self._entries[name] = v
      return v
    return add if value is None else add(value)

  def get(self, name: str) -> T:
    try:
      return self._entries[name]
    except KeyError:
      raise ValueError(f"unknown {self.what} {name!r}; valid: {self.names()}") from None

  def names(self) -> List[str]:
    return sorted(self._entries)

  def items(self) -> List[Tuple[str, T]]:
    return sorted(self._entries.items())

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

  def __len__(self) -> int:
    return len(self._entries)


