"""QoS profiles for sensor streams, from the ``qos``/``depth`` pair every input section carries.

Sensor topics keep the last ``depth`` messages and are volatile: a late joiner
wants the next frame, not a replay of old ones. Publisher and subscriber must
agree on reliability (a reliable subscriber never matches a best-effort
publisher), so both sides build their profile here.
"""

from __future__ import annotations

import threading
import time

from rclpy.duration import Duration
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

_RELIABILITY = {"reliable": ReliabilityPolicy.RELIABLE, "best_effort": ReliabilityPolicy.BEST_EFFORT}


def sensor_qos(reliability: str, depth: int) -> QoSProfile:
    if reliability not in _RELIABILITY:
        raise ValueError(f"QoS reliability must be one of {sorted(_RELIABILITY)}, got {reliability!r}")
    if depth < 1:
        raise ValueError(f"QoS depth must be at least 1, got {depth}")
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                      reliability=_RELIABILITY[reliability], durability=DurabilityPolicy.VOLATILE)


def latched_qos() -> QoSProfile:
    """For rarely sent state (AudioInfo): a subscriber that joins later still gets the last one."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)


def wait_for_acks(publishers: list, timeout_s: float = 1.0) -> bool:
    """Wait until subscribers acknowledged what was published (reliable QoS), before a node goes away.

    A driver that exits right after its last publish could otherwise take that message with it.
    """
    return all(p.wait_for_all_acked(Duration(nanoseconds=int(timeout_s * 1e9))) for p in publishers)


class SubscriberGate:
    """Opens once ``count`` subscribers have matched every publisher, plus ``settle_s``.

    A publisher sees a subscriber before that subscriber has finished matching the publisher, and a
    volatile reader drops samples from a writer it does not know yet: without the settle time the
    first message or two could be lost, which a benchmark counting every message would report.
    ``count`` 0 opens at once (a driver on a robot publishes whether anyone listens or not).
    """

    def __init__(self, publishers: list, count: int, settle_s: float = 0.5):
        self.publishers, self.count, self.settle_s = publishers, count, settle_s
        self._matched_at: float | None = None
        self._open = count <= 0

    def is_open(self) -> bool:
        if not self._open:
            now = time.monotonic()
            if all(p.get_subscription_count() >= self.count for p in self.publishers):
                self._matched_at = self._matched_at or now
                self._open = now - self._matched_at >= self.settle_s
            else:
                self._matched_at = None
        return self._open

    def wait(self, stop: threading.Event, poll_s: float = 0.02) -> bool:
        """Block until open; False if ``stop`` was set first."""
        while not self.is_open():
            if stop.wait(poll_s):
                return False
        return True
