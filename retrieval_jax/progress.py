"""Throughput and time-to-go of a long loop (training steps, extraction batches), for the log.

One `Progress` per loop: `update(done, images)` records how far it got; `due()` says whether
`every_s` seconds passed since the last report; `rate()` / `eta_s()` are what the log lines
print. Training reports every `log_every` steps instead (`due` unused there).
"""
import time
from typing import Optional


class Progress:
  """Images/s and ETA of a loop of `total` units (steps or images), from `start` on.

  Attributes:
    total: units of the whole loop.
    start: units already done when this process started (a resumed run).
    every_s: `due()` period in seconds.
  """

  def __init__(self, total: int, start: int = 0, every_s: float = 10.0):
    self.total, self.start, self.every_s = int(total), int(start), float(every_s)
    self.t0 = self.last = time.time()
    self.done, self.images = int(start), 0

  def update(self, done: Optional[int] = None, images: int = 0) -> None:
    """`done` units so far (default: one more), `images` more images processed."""
    self.done = self.done + 1 if done is None else int(done)
    self.images += int(images)

  def elapsed(self) -> float:
    return max(time.time() - self.t0, 1e-9)

  def rate(self) -> float:
    """Images per second since this process started the loop."""
    return self.images / self.elapsed()

  def eta_s(self) -> float:
    """Seconds left at the current pace (units per second since the start)."""
    per_s = (self.done - self.start) / self.elapsed()
    return (self.total - self.done) / max(per_s, 1e-9)

  def due(self) -> bool:
    """True (and the clock reset) once every `every_s` seconds."""
    if time.time() - self.last > self.every_s:
      self.last = time.time()
      return True
    return False
