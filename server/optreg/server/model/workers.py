"""Who steps a shared session: its worker config, and its members with their leases.

A shared session (SessionConfig.workers) is stepped by several workers. Each joins under a
name and holds a lease that every call it makes renews; a member whose lease runs out is
dropped, so no round and no SSP bound ever waits for a worker that died. The members live
in memory (guarded by the session's Hub condition, steps/rounds.py); after a restart a worker's
next call joins it again (a step from an unknown worker joins it when there is room).
"""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field

from optreg.server.model.errors import FailedPrecondition, InvalidArgument, shown

MODES = ("sync", "async", "ssp")
COMBINES = ("mean", "sum")
MAX_WORKERS = 1024
CALLS_PER_WORKER = 2  # a worker's calls in flight at once on one session: a call, and a retry overlapping it
WORKER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@-]{0,127}")
WORKER_NAME_RULE = "1-128 letters, digits, '_', '-', '.', ':' or '@', not starting with a punctuation mark"
DEFAULT_DEADLINE = 30.0
DEFAULT_LEASE = 10.0


@dataclass(frozen=True)
class WorkerConfig:
    """How several workers step one session (see docs/workers.md)."""
    workers: int
    mode: str = "sync"  # one of MODES
    min_workers: int = 0  # sync: a round may close at its deadline with this many (0: workers)
    round_deadline: float = DEFAULT_DEADLINE  # sync: seconds from a round's first contribution
    lease_seconds: float = DEFAULT_LEASE
    combine: str = "mean"  # sync: one of COMBINES
    staleness: int = 0  # async: the most stale contribution taken (0: any); ssp: the bound s
    scale_lr: bool = False  # async, ssp: each contribution runs at lr / (1 + its staleness) (Zhang et al. 2016)

    def checked(self) -> "WorkerConfig":
        if not 1 <= self.workers <= MAX_WORKERS:
            raise InvalidArgument(f"config.workers.workers {self.workers}: give 1-{MAX_WORKERS} (the most members "
                                  "at once), or leave config.workers out for a single-writer session")
        if self.mode not in MODES:
            raise InvalidArgument(f"config.workers.mode {shown(self.mode)} is not one of {', '.join(MODES)}")
        if self.combine not in COMBINES:
            raise InvalidArgument(f"config.workers.combine {shown(self.combine)} is not one of {', '.join(COMBINES)}")
        if not 0 <= self.min_workers <= self.workers:
            raise InvalidArgument(f"config.workers.min_workers {self.min_workers}: give 0-{self.workers} "
                                  "(0: every member)")
        for name, v in (("round_deadline_seconds", self.round_deadline), ("lease_seconds", self.lease_seconds)):
            if not 0 < v <= 86400:
                raise InvalidArgument(f"config.workers.{name} {v}: give seconds in (0, 86400] (0 in the message: "
                                      "the default)")
        if self.staleness < 0:
            raise InvalidArgument(f"config.workers.staleness {self.staleness} must be >= 0")
        if self.scale_lr and self.mode == "sync":
            raise InvalidArgument("config.workers.scale_lr_by_staleness: a sync round's contributions all have "
                                  "staleness 0; use it with mode async or ssp, or leave it false")
        return self

    @property
    def quorum(self) -> int:
        return self.min_workers or self.workers

    def to_meta(self) -> dict:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict | None) -> "WorkerConfig | None":
        return cls(**meta) if meta else None


def staleness_scaled(hp: dict, staleness: int) -> dict:
    """The hyperparameters a contribution of this staleness runs with when the session scales its
    learning rate: lr / (1 + staleness) (Zhang et al. 2016, "Staleness-aware async-SGD"), the rest as is."""
    if staleness <= 0:
        return hp
    return {**hp, "lr": hp["lr"] / (1 + staleness)}


LR_SCALED = "lr_scaled"  # a step record's extras: it ran at its own staleness-scaled lr (not the session's)


def note_worker_record(s, extras: dict) -> None:
    """Keep on the session what a shared session's step record says about its workers: as the step commits,
    and again when recovery replays the record (both through steps/commit.py), so both end in the same place.
    Sync rounds: {"round", "contributors", "members", "clocks"}; async/SSP contributions:
    {"worker", "round", "clocks"}. "clocks" maps the members when the record began to their applied
    contributions after it (the SSP clocks): merged by max, since records of concurrent contributions may
    commit in another order than they began; a worker not in it has left (it joins again with its next call)."""
    if "worker" in extras:  # an async/SSP contribution: a retry of it is answered, not applied again
        s.worker_rounds[extras["worker"]] = extras["round"]
    elif "round" in extras:  # a sync round: who it applied (rounds.Hub answers retries)
        s.round_record = {k: extras[k] for k in ("round", "contributors", "members") if k in extras}
    clocks = extras.get("clocks")
    if clocks is not None:
        s.worker_clocks = {w: max(int(c), int(s.worker_clocks.get(w, 0))) for w, c in clocks.items()}


def check_worker_name(worker: str) -> str:
    if not WORKER_NAME.fullmatch(worker or ""):
        raise InvalidArgument(f"worker {shown(worker)}: use {WORKER_NAME_RULE}")
    return worker


@dataclass(eq=False)
class Member:
    worker: str
    joined_at: float = field(default_factory=time.time)
    last_contact: float = field(default_factory=time.time)
    expires: float = 0.0  # time.monotonic() when the lease runs out
    contributions: int = 0  # applied contributions: the SSP clock
    last_round: int = -1  # the round (sync) or read step (async, ssp) of its last applied contribution
    missed: int = 0  # sync: rounds in a row that closed without it while it was a member
    seat: object = None  # sync, ssp: its admission.Slot of the server's --max-members


class Members:
    """The live members of one session. Every method: caller holds the hub's condition."""

    def __init__(self, config: WorkerConfig, session_id: str, seats=None):
        self.config = config
        self.session_id = session_id
        self.by_name: dict[str, Member] = {}
        # Sync and SSP members wait for each other, each in a call that holds a server thread: they take
        # one of the server's --max-members seats (an admission.Limit), so a round can always close.
        self.seats = seats if config.mode in ("sync", "ssp") else None
        self.on_expired = None  # called with each member whose lease ran out (rounds.Hub: the telemetry alert)
        # No lease runs out before this (a renewal only moves a lease later): expire() is called for every
        # contribution, and scanning 1,000 members each time made a round O(members^2) on the event loop.
        self._no_expiry_before = 0.0

    def expire(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        if now < self._no_expiry_before:
            return []
        gone = [n for n, m in self.by_name.items() if m.expires <= now]
        for n in gone:
            m = self._drop(n)
            if self.on_expired is not None:
                self.on_expired(m)
        self._no_expiry_before = min((m.expires for m in self.by_name.values()), default=float("inf"))
        return gone

    def renew(self, m: Member) -> None:
        m.last_contact = time.time()
        m.expires = time.monotonic() + self.config.lease_seconds

    def join(self, worker: str) -> Member:
        """The member of that name (renewed), or a new one when there is room."""
        check_worker_name(worker)
        self.expire()
        m = self.by_name.get(worker)
        if m is None:
            if len(self.by_name) >= self.config.workers:
                raise FailedPrecondition(
                    f"session {self.session_id} has {len(self.by_name)} members, its limit (config.workers.workers "
                    f"= {self.config.workers}): wait for one to leave or its lease to run out "
                    f"({self.config.lease_seconds:g} s without a call)")
            # A newcomer starts at the slowest member's clock, so it neither stalls SSP nor races ahead.
            clock = min((o.contributions for o in self.by_name.values()), default=0)
            seat = self.seats.take() if self.seats is not None else None
            m = self.by_name[worker] = Member(worker, contributions=clock, seat=seat)
        self.renew(m)
        self._no_expiry_before = min(self._no_expiry_before, m.expires)
        return m

    def get(self, worker: str) -> Member:
        check_worker_name(worker)
        self.expire()
        m = self.by_name.get(worker)
        if m is None:
            raise FailedPrecondition(f"worker {shown(worker)} is not a member of session {self.session_id} "
                                     "(never joined, left, or its lease ran out): call JoinSession again")
        self.renew(m)
        return m

    def leave(self, worker: str) -> bool:
        check_worker_name(worker)
        return self._drop(worker) is not None

    def readmit(self, m: Member) -> None:
        """A member dropped while its own call waited comes back as it was (its clock), in a seat again."""
        m.seat = self.seats.take() if self.seats is not None else None
        self.by_name[m.worker] = m
        self._no_expiry_before = min(self._no_expiry_before, m.expires)

    def clear(self) -> None:
        """Every member gone (the session was deleted): their seats back to the server."""
        for n in list(self.by_name):
            self._drop(n)

    def _drop(self, worker: str) -> Member | None:
        m = self.by_name.pop(worker, None)
        if m is not None and m.seat is not None:
            m.seat.release()
        return m

    def names(self) -> set[str]:
        return set(self.by_name)

    def clocks(self) -> list[int]:
        return [m.contributions for m in self.by_name.values()]


def ssp_may_apply(clock: int, live_clocks, bound: int) -> bool:
    """SSP's blocking rule (Ho et al. 2013): a worker that has `clock` contributions applied may apply
    its next one only while it is at most `bound` contributions ahead of the slowest live member.
    bound 0 is lock-step: nobody applies its (c+1)-th before every live member has applied its c-th."""
    slowest = min(live_clocks, default=clock)
    return clock - slowest <= bound
