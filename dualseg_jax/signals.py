"""SIGTERM and Ctrl-C as a request to stop at the next safe point (a scheduler's preemption
notice, a user's interrupt); a second signal stops at once."""

from __future__ import annotations

import logging
import signal

log = logging.getLogger('dualseg_jax')


class StopOnSignal:
  """Inside the block the first SIGTERM / SIGINT sets `requested` and logs `what_happens`, or
  raises `stop_at_once` when the caller has set it (for work that loses nothing when cut short);
  a second one raises KeyboardInterrupt. Outside the main thread signals stay with the caller."""

  def __init__(self, what_happens: str):
    self.what_happens = what_happens
    self.signal_number: int | None = None
    self.stop_at_once: Exception | None = None
    self._previous = {}

  @property
  def requested(self) -> bool:
    return self.signal_number is not None

  def __enter__(self):
    for number in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[number] = signal.signal(number, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, number, frame):
    del frame
    if self.requested:  # a second signal: give up waiting
      raise KeyboardInterrupt
    self.signal_number = number
    if self.stop_at_once is not None:
      raise self.stop_at_once
    log.warning('signal %d received: %s', number, self.what_happens)

  def __exit__(self, *exc):
    for number, handler in self._previous.items():
      signal.signal(number, handler)
    return False
