"""Events, posted in the background, as client-go's event recorder does.

A pass hands its outcome's Event to the recorder and goes on: the status patch, not the Event, is
on the path to Ready. A few daemon threads (``THREADS``) post the queued Events in the order they
were queued (with more than one thread, neighbours may land in either order), each with the content
and timestamp the pass gave it (so an Event says when the outcome happened, not when it was
posted); it may reach the API server a moment after the status. The queue is bounded: when it is full (the
API server refusing Events for a long while), an Event is dropped rather than the pass held or
memory grown; drops are counted (``autotek_events_dropped_total``) and logged once. On shutdown
the queue is flushed, best effort, within a deadline. The queue holds only what an Event shows
(names, reason, message): never a secret.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from . import metrics
from .errors import AutoTekError

log = logging.getLogger(__name__)


class EventRecorder:
    """A bounded queue of Events and the few threads that post them."""

    #: Events waiting at most; beyond this, new ones are dropped (and counted).
    MAX_QUEUED = 4096
    #: Posting threads: an Event's POST is a round trip, and a backlog of first issues makes
    #: Events faster than one thread posts them.
    THREADS = 4
    THREAD_NAME = "autotek-events"

    def __init__(self, kube: Any, max_queued: int = MAX_QUEUED, threads: int = THREADS) -> None:
        self.kube = kube
        self._queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue(maxsize=max(1, max_queued))
        self._nthreads = max(1, threads)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        self.posted = 0
        self.failed = 0
        self.dropped = 0

    def record(self, label: str, **event: Any) -> None:
        """Queue one Event (``Kube.create_event``'s keyword arguments) about the credential
        ``label`` names (for the log); never blocks."""
        if self._closed:
            self._post(label, event)  # after shutdown began (a late pass): on the caller's thread
            return
        self._start()
        try:
            self._queue.put_nowait((label, event))
        except queue.Full:
            with self._lock:
                self.dropped += 1
                first = self.dropped == 1
            metrics.observe_event_dropped()
            if first:
                log.warning(
                    "the Event queue is full (%d waiting: the API server is refusing or slow to take Events); "
                    "Events are dropped until it drains, counted in autotek_events_dropped_total",
                    self._queue.maxsize,
                )

    def pending(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float = 5.0) -> bool:
        """Stop taking Events and post those queued, for at most ``timeout`` seconds (best effort).
        True when the queue was flushed."""
        self._closed = True
        threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for _ in threads:  # one stop mark per thread, behind the queued Events
            try:
                self._queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
            except queue.Full:
                break
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in threads):
            left = sum(1 for item in list(self._queue.queue) if item is not None)
            log.warning("shutting down with %d Event(s) not posted", left)
            return False
        return True

    def _start(self) -> None:
        if self._threads:
            return
        with self._lock:
            if not self._threads:
                for i in range(self._nthreads):
                    thread = threading.Thread(target=self._run, name=f"{self.THREAD_NAME}-{i}", daemon=True)
                    thread.start()
                    self._threads.append(thread)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._post(*item)

    def _post(self, label: str, event: dict[str, Any]) -> None:
        try:
            self.kube.create_event(**event)
            with self._lock:
                self.posted += 1
        except AutoTekError as exc:
            with self._lock:
                self.failed += 1
            log.warning("%s: could not post event %s: %s", label, event.get("reason"), exc.message)
        except Exception as exc:  # noqa: BLE001 - the thread must outlive any one Event; our own text only
            with self._lock:
                self.failed += 1
            log.warning("%s: could not post event %s: %s", label, event.get("reason"), type(exc).__name__)
