"""A Tracker that never stops or slows training for the tracking store (rank 0 logs through it)."""

from __future__ import annotations

import collections
import logging
import threading
import time

log = logging.getLogger(__name__)


class BufferedTracker:
    """Wraps any Tracker. Calls return at once: they queue, and one background thread sends them in order.

    When the store is unreachable or fails, the thread warns once, keeps what is queued, retries with
    backoff (1 s doubling to 15 s), and when the store answers again sends it all and says how long it
    was gone. The queue holds up to `max_metrics` metric values (and `max_artifact_bytes` of samples);
    beyond that the oldest metrics are dropped and counted, logged as `tracking/dropped_metrics` once the
    store is back. `close()` waits up to `flush_timeout` seconds for the queue to empty.

    Written here rather than with MLflow's asynchronous logging (log_batch(synchronous=False)): that
    queue drops a batch whose request fails instead of holding it through an outage, and it is MLflow's
    alone, where this serves every backend.
    """

    def __init__(self, inner, max_metrics: int = 100_000, max_artifact_bytes: int = 256 << 20):
        self.inner, self.max_metrics, self.max_artifact_bytes = inner, max_metrics, max_artifact_bytes
        self.run_id, self.uri, self.backend = inner.run_id, inner.uri, inner.backend
        self.queue: collections.deque = collections.deque()  # (kind, payload, size)
        self.cond = threading.Condition()
        self.metrics_held = self.artifact_bytes_held = 0
        self.dropped = self.dropped_reported = 0
        self.closing, self.last_step = False, 0
        self.draining = False  # close() is waiting: retry every second, not after the backoff
        self.down_since: float | None = None
        self.thread = threading.Thread(target=self._run, name="omnistream-tracking", daemon=True)
        self.thread.start()

    # ---- the Tracker's writers: queue and return -----------------------------------------------------
    def log(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        items = {k: float(v) for k, v in metrics.items() if v is not None}
        self.last_step = step
        self._put("log", (items, step, timestamp_ms or int(time.time() * 1000)), len(items))

    def log_params(self, params: dict) -> None:
        self._put("log_params", (params,), 0)

    def set_tag(self, key: str, value: str) -> None:
        self._put("set_tag", (key, value), 0)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self._hold(len(text), f"text {artifact_file}"):
            self._put("log_text", (text, artifact_file), 0, len(text))

    def log_artifact(self, data: bytes, name: str, artifact_path: str) -> None:
        if self._hold(len(data), f"sample {artifact_path}/{name}"):
            self._put("log_artifact", (data, name, artifact_path), 0, len(data))

    def log_image(self, key: str, png: bytes, step: int) -> None:
        if self._hold(len(png), f"image {key} of step {step}"):
            self._put("log_image", (key, png, step), 0, len(png))

    def log_table(self, rows: dict[str, list], artifact_file: str) -> None:
        self._put("log_table", (rows, artifact_file), 0)

    def finish(self, status: str = "FINISHED") -> None:
        self._put("finish", (status,), 0)

    # ---- readers and the rest: the inner tracker's, straight through ---------------------------------
    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def _hold(self, n: int, what: str) -> bool:
        with self.cond:
            if self.artifact_bytes_held + n > self.max_artifact_bytes:
                log.warning(
                    "tracking store unreachable; %s not kept (over %d MiB of samples queued)",
                    what,
                    self.max_artifact_bytes >> 20,
                )
                return False
            self.artifact_bytes_held += n
            return True

    def _put(self, kind: str, args: tuple, n: int, nbytes: int = 0) -> None:
        with self.cond:
            self.queue.append((kind, args, n, nbytes))
            self.metrics_held += n
            while self.metrics_held > self.max_metrics:  # drop the oldest metrics, counted
                i = next((j for j, op in enumerate(self.queue) if op[0] == "log"), None)
                if i is None:
                    break
                k = self.queue[i][2]
                del self.queue[i]
                self.metrics_held -= k
                self.dropped += k
            self.cond.notify()

    # ---- the sender --------------------------------------------------------------------------------
    def _run(self) -> None:
        wait = 1.0
        while True:
            with self.cond:
                while not self.queue and not self.closing:
                    self.cond.wait()
                if not self.queue:
                    return
                op = self.queue[0]
            kind, args, n, nbytes = op
            try:
                getattr(self.inner, kind)(*args)
            except Exception as e:  # noqa: BLE001 - any failure of the store or the way to it: hold and retry
                if self.down_since is None:
                    self.down_since = time.time()
                    log.warning(
                        "the tracking store failed (%s: %s); training goes on, metrics are held (up to %d) "
                        "and sent when it is back",
                        type(e).__name__,
                        str(e).splitlines()[0][:200] if str(e) else "",
                        self.max_metrics,
                    )
                with self.cond:
                    self.cond.wait(1.0 if self.draining else wait)
                wait = min(wait * 2, 15.0)
                continue
            with self.cond:
                if self.queue and self.queue[0] is op:
                    self.queue.popleft()
                    self.metrics_held -= n
                    self.artifact_bytes_held -= nbytes
                self.cond.notify_all()
            wait = 1.0
            if self.down_since is not None:
                gone, self.down_since = time.time() - self.down_since, None
                log.info("the tracking store is back after %.0f s; sending what was held", gone)
            if self.dropped > self.dropped_reported:
                self.dropped_reported = self.dropped
                self._put(
                    "log",
                    ({"tracking/dropped_metrics": float(self.dropped)}, self.last_step, int(time.time() * 1000)),
                    1,
                )

    def close(self, timeout: float = 120.0) -> bool:
        """Send what is queued, waiting up to `timeout` s; False (with a warning saying what) if not all went."""
        deadline = time.time() + timeout
        with self.cond:
            self.draining = True
            self.cond.notify_all()  # a sender backing off tries again now
            while self.queue and time.time() < deadline:
                self.cond.wait(min(1.0, max(0.0, deadline - time.time())))
            left, held, self.closing = len(self.queue), self.metrics_held, True
            self.cond.notify_all()
        if not left:
            try:
                self.inner.flush()
            except Exception as e:  # noqa: BLE001 - as any other call of the store's
                log.warning("the tracking store did not flush (%s: %s)", type(e).__name__, e)
                left = 1
        if left:
            log.warning(
                "the tracking store did not take %d queued calls (%d metric values) within %.0f s; they are lost",
                left,
                held,
                timeout,
            )
        if self.dropped:
            log.warning(
                "%d metric values were dropped while the tracking store was unreachable (over tracking.buffer_metrics)",
                self.dropped,
            )
        return not left
