"""The Event recorder: Events posted in the background, in order, as given; a bounded queue whose
overflow is dropped, counted and logged once; failures logged without stopping it; flushed on close."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import Any

import pytest

from autotek_operator import metrics
from autotek_operator.errors import KubernetesAPIError
from autotek_operator.events import EventRecorder

NOW = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)


class Poster:
    """Records each create_event call, optionally held until released, or failing."""

    def __init__(self, hold: bool = False) -> None:
        self.posted: list[dict[str, Any]] = []
        self.threads: set[str] = set()
        self.release = threading.Event()
        self.started = threading.Event()
        self.fail: dict[str, BaseException] = {}
        if not hold:
            self.release.set()

    def create_event(self, **event: Any) -> None:
        self.started.set()
        self.release.wait(10)
        self.threads.add(threading.current_thread().name)
        if event["reason"] in self.fail:
            raise self.fail[event["reason"]]
        self.posted.append(event)


def _event(i: int) -> dict[str, Any]:
    return {
        "namespace": "ns",
        "name": f"c{i}",
        "uid": f"u{i}",
        "event_type": "Normal",
        "reason": f"R{i}",
        "message": f"m{i}",
        "now": NOW,
    }


def _dropped() -> float:
    return float(metrics.EVENTS_DROPPED._value.get())


def test_events_are_posted_in_the_background_as_given() -> None:
    kube = Poster()
    rec = EventRecorder(kube)
    for i in range(200):
        rec.record(f"ns/c{i}", **_event(i))
    assert rec.close(timeout=10)
    assert sorted(kube.posted, key=lambda e: int(e["name"][1:])) == [_event(i) for i in range(200)]
    assert kube.threads <= {f"{EventRecorder.THREAD_NAME}-{i}" for i in range(EventRecorder.THREADS)}
    assert (rec.posted, rec.failed, rec.dropped) == (200, 0, 0)


def test_one_thread_posts_in_order() -> None:
    kube = Poster()
    rec = EventRecorder(kube, threads=1)
    for i in range(20):
        rec.record(f"ns/c{i}", **_event(i))
    assert rec.close(timeout=10)
    assert kube.posted == [_event(i) for i in range(20)]
    assert kube.threads == {f"{EventRecorder.THREAD_NAME}-0"}


def test_the_queue_is_bounded_and_overflow_is_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    kube = Poster(hold=True)
    rec = EventRecorder(kube, max_queued=3, threads=1)
    before = _dropped()
    rec.record("ns/c0", **_event(0))
    assert kube.started.wait(10)  # the thread holds the first Event: the queue is empty again
    with caplog.at_level(logging.WARNING, logger="autotek_operator.events"):
        for i in range(1, 7):
            rec.record(f"ns/c{i}", **_event(i))  # never blocks: 3 wait, 3 are dropped
    assert rec.pending() == 3
    assert rec.dropped == 3
    assert _dropped() - before == 3
    warnings = [r for r in caplog.records if "queue is full" in r.getMessage()]
    assert len(warnings) == 1
    kube.release.set()
    assert rec.close(timeout=10)
    assert [e["reason"] for e in kube.posted] == ["R0", "R1", "R2", "R3"]


def test_a_failed_post_is_logged_and_the_next_events_still_go(caplog: pytest.LogCaptureFixture) -> None:
    kube = Poster()
    kube.fail = {
        "R1": KubernetesAPIError("Kubernetes API create events failed: HTTP 403 Forbidden"),
        "R2": ValueError("x"),
    }
    rec = EventRecorder(kube, threads=1)
    with caplog.at_level(logging.WARNING, logger="autotek_operator.events"):
        for i in range(4):
            rec.record(f"ns/c{i}", **_event(i))
        assert rec.close(timeout=10)
    assert [e["reason"] for e in kube.posted] == ["R0", "R3"]
    assert rec.failed == 2
    messages = [r.getMessage() for r in caplog.records]
    assert "ns/c1: could not post event R1: Kubernetes API create events failed: HTTP 403 Forbidden" in messages
    assert "ns/c2: could not post event R2: ValueError" in messages


def test_close_flushes_what_is_queued_then_posts_on_the_callers_thread() -> None:
    kube = Poster(hold=True)
    rec = EventRecorder(kube)
    for i in range(5):
        rec.record(f"ns/c{i}", **_event(i))
    threading.Timer(0.2, kube.release.set).start()
    assert rec.close(timeout=10)
    assert len(kube.posted) == 5
    rec.record("ns/late", **_event(9))  # a pass finishing during shutdown: posted at once
    assert kube.posted[-1] == _event(9)
    assert threading.current_thread().name in kube.threads


def test_close_gives_up_after_its_deadline(caplog: pytest.LogCaptureFixture) -> None:
    kube = Poster(hold=True)
    rec = EventRecorder(kube, threads=1)
    for i in range(3):
        rec.record(f"ns/c{i}", **_event(i))
    assert kube.started.wait(10)
    with caplog.at_level(logging.WARNING, logger="autotek_operator.events"):
        assert rec.close(timeout=0.1) is False
    assert any("not posted" in r.getMessage() for r in caplog.records)
    kube.release.set()


def test_close_without_any_event_is_immediate() -> None:
    assert EventRecorder(Poster()).close(timeout=0)
