"""A client stream forwarded as it arrives: the front end starts the host's call with the first
message and sends the rest in groups of about FEED_BYTES (each a numpy buffer, so Ray passes it
through the object store), while the host's step already works on what came. Without it the front
end gathered the whole stream first, and a 1e7-parameter step did not overlap transfer and update.

Ray runs a threaded actor's calls in any order: each group carries its number, and the host's call
reads them in order. A group for a call that already ended (it answered early: MOVED, an error) is
dropped; a call whose next group does not come within FEED_SECONDS answers MOVED, and the front end,
if it is still there, sends the whole request again (it keeps it for retries): so the groups of a
call that Ray retried in a new incarnation of the host, lost with the old one, cost a retry."""
from __future__ import annotations

import threading
import time

FEED_BYTES = 8 << 20  # measured here against 2 MiB: fewer, larger groups were faster
FEED_SECONDS = 10.0
ENDED_KEPT_SECONDS = 300.0  # how long an ended call's id is remembered (its late groups dropped)


class FeedStopped(Exception):
    """The front end stopped sending a stream it had started."""


class _Feed:
    def __init__(self):
        self.groups: dict[int, tuple] = {}
        self.cond = threading.Condition()


class Feeds:
    def __init__(self, seconds: float = FEED_SECONDS):
        self.seconds = seconds
        self._feeds: dict[str, _Feed] = {}
        self._ended: dict[str, float] = {}
        self._lock = threading.Lock()

    def _feed(self, call_id: str) -> _Feed | None:
        with self._lock:
            if call_id in self._ended:
                return None
            return self._feeds.setdefault(call_id, _Feed())

    def put(self, call_id: str, seq: int, messages: list, last: bool) -> bool:
        feed = self._feed(call_id)
        if feed is None:
            return False
        with feed.cond:
            feed.groups[seq] = (messages, last)
            feed.cond.notify_all()
        return True

    def messages(self, call_id: str):
        """The call's messages after its first, group by group in order, as they come."""
        feed, seq, seconds = self._feed(call_id), 0, self.seconds
        if feed is None:
            return
        while True:
            with feed.cond:
                if not feed.cond.wait_for(lambda: seq in feed.groups, seconds):
                    raise FeedStopped(f"the front end sent no more of the stream for {seconds:g} s")
                messages, last = feed.groups.pop(seq)
            yield from messages
            if last:
                return
            seq += 1

    def end(self, call_id: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._feeds.pop(call_id, None)
            self._ended[call_id] = now
            if len(self._ended) > 1000:
                self._ended = {k: t for k, t in self._ended.items() if now - t < ENDED_KEPT_SECONDS}
