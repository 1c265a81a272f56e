"""The bandwidth limit of a run, shared by every worker process of one machine."""

from __future__ import annotations

import time
from typing import Any


class SharedRate:
    """A token bucket shared by all worker processes (shared memory + a lock).

    rate < 0: unlimited; 0: paused; > 0: bytes per second. Callers take what they read and
    sleep off any debt, so the aggregate rate holds however many streams run.
    """

    def __init__(self, ctx: Any) -> None:
        self.values = ctx.RawArray("d", 3)  # rate, tokens, last refill (monotonic)
        self.values[0] = -1.0
        self.lock = ctx.Lock()

    def set(self, rate: float | None) -> None:
        with self.lock:
            new = -1.0 if rate is None else float(rate)
            if new != self.values[0]:
                self.values[0] = new
                self.values[1] = 0.0
                self.values[2] = time.monotonic()

    @property
    def rate(self) -> float | None:
        value = self.values[0]
        return None if value < 0 else value

    def take(self, n: int, stop: Any = None) -> None:
        if self.values[0] < 0:
            return  # unlimited: no need for the cross-process lock (one aligned double, read whole)
        while True:
            with self.lock:
                rate = self.values[0]
                if rate < 0:
                    return
                now = time.monotonic()
                if rate > 0:
                    burst = max(rate * 0.2, 65536.0)
                    tokens = min(self.values[1] + (now - self.values[2]) * rate, burst) - n
                    self.values[1], self.values[2] = tokens, now
                    wait = -tokens / rate if tokens < 0 else 0.0
                    if wait <= 0:
                        return
                else:
                    self.values[2] = now
                    wait = -1.0
            if wait > 0:
                time.sleep(min(wait, 5.0))
                if wait <= 5.0:
                    return
                continue  # a long debt (the rate fell): keep sleeping in steps
            if stop is not None and stop.is_set():
                return
            time.sleep(0.25)  # paused
