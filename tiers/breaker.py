"""A circuit breaker: closed → open → half-open → closed, driven by the outcomes of real calls.

* closed: calls pass; ``failure_threshold`` consecutive failures open it.
* open: calls are refused at once (no socket, no timeout) until ``reset_after`` has passed; each reopening
  doubles that wait, up to ``reset_max``.
* half-open: exactly one call at a time is let through as a probe; its success closes the breaker, its failure
  opens it again.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class State(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


Listener = Callable[[State, State], None]


class Breaker:
    def __init__(
        self,
        *,
        failure_threshold: int = 3,
        reset_after: float = 0.5,
        reset_max: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_base = reset_after
        self.reset_max = reset_max
        self.clock = clock
        self.state = State.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.reset_after = reset_after
        self.probe_in_flight = False
        self.transitions = 0
        self.rejected = 0
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _move(self, new: State) -> None:
        old, self.state = self.state, new
        if old is not new:
            self.transitions += 1
            for listener in self._listeners:
                listener(old, new)

    def allow(self) -> bool:
        """May a call go out now? In half-open, only one probe at a time."""
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN:
            if self.clock() - self.opened_at < self.reset_after:
                self.rejected += 1
                return False
            self._move(State.HALF_OPEN)
        if self.probe_in_flight:
            self.rejected += 1
            return False
        self.probe_in_flight = True
        return True

    def probe_now(self) -> None:
        """Another signal says Redis is back (the subscriber reconnected): let the next call probe at once."""
        if self.state is State.OPEN:
            self.opened_at = float("-inf")

    def abandon(self) -> None:
        """The call ended without a verdict (cancelled): free the probe slot."""
        self.probe_in_flight = False

    def success(self) -> None:
        if self.state is State.OPEN:
            return  # a call let through before the breaker opened: it says nothing of the failures since
        self.failures = 0
        self.probe_in_flight = False
        if self.state is not State.CLOSED:
            self.reset_after = self.reset_base
            self._move(State.CLOSED)

    def failure(self) -> None:
        self.probe_in_flight = False
        if self.state is State.HALF_OPEN:
            self.reset_after = min(self.reset_after * 2, self.reset_max)
            self._open()
            return
        self.failures += 1
        if self.state is State.CLOSED and self.failures >= self.failure_threshold:
            self._open()

    def _open(self) -> None:
        self.opened_at = self.clock()
        self._move(State.OPEN)

    @property
    def is_open(self) -> bool:
        return self.state is not State.CLOSED
