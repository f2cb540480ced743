"""What travels to and from the read-through actors.

To an actor (its mailbox):

* :class:`Load` — *ask*, reply :class:`Landed`: an L1 miss that found no fresh value in Redis (or could not ask
  Redis). The actor joins the load already in flight for the key or starts one.
* :class:`Refresh` — *tell*: a hot entry is close to its expiry; reload it in the background (one load fleet-wide).

Back to callers: :class:`Lookup` (an answer and where it came from). From a domain's ``origin()`` to the
read-through: :class:`Answer` (or plain body bytes, or None for "does not exist").
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from actors.base import Ask
from tiers import codec
from tiers.coherence import Acquired
from tiers.keys import CacheKey
from tiers.l1 import Ticket


class Source(enum.StrEnum):
    L1 = "L1"
    L2 = "L2"
    MISS = "MISS"
    STALE = "STALE"


@dataclass(frozen=True, slots=True)
class Lookup:
    body: bytes  # JSON answer; b"null" = known not to exist
    source: Source
    loaded_at: float  # wall-clock seconds
    gens: str = ""  # the Redis generations the value was made under (a value derived from it carries them)
    incarnation: str = ""  # the Redis incarnation it was loaded in
    # False when nothing vouches that the value was still current when the load ended (it was read while a write was
    # fenced, Redis refused or could not take its fill, or it is STALE): then only the reader that loaded it, or one
    # that joined within the join window, may be answered with it (tiers.coherence, rule 4)
    vouched: bool = True

    @property
    def negative(self) -> bool:
        return self.body == codec.NEGATIVE

    def age(self, now: float | None = None) -> int:
        return max(0, int((now or time.time()) - self.loaded_at))


@dataclass(frozen=True, slots=True)
class Answer:
    """What ``origin()`` may return instead of plain body bytes.

    * ``short=True``: a real answer (served with 200) that states an absence, e.g. a trustline with
      ``exists: false``: cached with the data type's negative TTL and never served stale.
    * ``source``: for a derived key, the lookup of the source value it was computed from. Its generations and
      incarnation guard the derived value; a derived value of a STALE source is STALE itself and never cached.
    """

    body: bytes
    short: bool = False
    source: Lookup | None = None


@dataclass(frozen=True, slots=True)
class Start:
    """How far the reader got before the mailbox: its L1 ticket, lease token and Redis' answer (None: unusable)."""

    ticket: Ticket
    token: str
    acquired: Acquired | None


@dataclass(frozen=True, slots=True)
class Landed:
    """A load's outcome, and when its fetch began (the L1 clock of its ticket)."""

    lookup: Lookup
    fetched: float


@dataclass(frozen=True, slots=True)
class Load(Ask[Landed]):
    key: CacheKey
    start: Start


@dataclass(frozen=True, slots=True)
class Refresh:
    key: CacheKey
