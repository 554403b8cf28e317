"""Part sizes, request slots, obstore errors, the Date warning, lock-write spacing (issue 12)."""

from __future__ import annotations

import threading
from pathlib import Path

from structlog.testing import capture_logs

from agent.config import LockConfig
from agent.stage.lock import RemoteLock
from agent.stage.lockbody import Holder
from agent.store import s3_client
from agent.store.local import LocalStore
from agent.store.s3_client import _date
from agent.store.s3_errors import _obstore_answer
from agent.store.s3_parts import RequestSlots, part_ranges, part_size

MiB = 1024 * 1024
GiB = 1024 * MiB


def test_part_size_is_the_configured_one_until_a_file_needs_more_than_9000_parts() -> None:
    """max(configured, ceil(size / 9000)): 500 MB keeps 8 MiB parts, 100 GiB gets larger ones."""
    assert 8 * MiB == part_size(500 * 1000 * 1000, 8 * MiB)
    big = part_size(100 * GiB, 8 * MiB)
    assert big > 8 * MiB
    assert 9000 >= len(part_ranges(100 * GiB, big))


def test_part_ranges_are_equal_but_the_last_and_cover_the_file_exactly() -> None:
    """Equal-sized parts (R2 requires it), the last one shorter, no gap and no overlap."""
    ranges = part_ranges(11 * MiB, 5 * MiB)
    assert [(0, 5 * MiB), (5 * MiB, 10 * MiB), (10 * MiB, 11 * MiB)] == ranges
    assert [] == part_ranges(0, 5 * MiB)


def test_request_slots_never_hand_out_more_than_their_capacity() -> None:
    """Three holders of a 2-slot semaphore: the third waits until one leaves."""
    slots = RequestSlots(2)
    inside = threading.Semaphore(0)
    leave = threading.Event()

    def hold() -> None:
        with slots.hold():
            inside.release()
            leave.wait(30)

    threads = [threading.Thread(target=hold, name=f"pdagent-test-{i}") for i in range(3)]
    for t in threads:
        t.start()
    assert inside.acquire(timeout=30)
    assert inside.acquire(timeout=30)
    assert not inside.acquire(timeout=0.2), "a third request got in while two were in flight"
    leave.set()
    assert inside.acquire(timeout=30)
    for t in threads:
        t.join(30)
    assert 2 == slots.peak


def test_a_request_wider_than_all_slots_takes_all_of_them_instead_of_waiting_forever() -> None:
    """A weight above the capacity is clamped to it."""
    slots = RequestSlots(3)
    with slots.hold(8):
        assert 3 == slots.peak


_DEBUG = (
    "Generic S3 error: Error performing GET http://h/b/{key} in 2ms - Server returned "
    "non-2xx status code: {status}: <Error><Code>{code}</Code></Error>\n\nDebug source:\n"
    'Generic {{\n    store: "S3",\n    source: RetryError(\n        RetryErrorImpl {{\n'
    "            method: GET,\n            uri: Some(\n                http://h/b/{key},\n"
    "            ),\n            inner: Status {{\n                status: {status},\n"
    '                body: Some(\n                    "<Error><Code>{code}</Code>'
    '<Message>m</Message></Error>",\n                ),\n            }},\n        }},\n'
    "    ),\n}}"
)


def test_obstore_errors_are_read_by_status_and_code_whatever_the_key_says() -> None:
    """A key that reads like a 500 or a reset does not change the 400 the store answered."""
    text = _DEBUG.format(key="preset%20status:%20500,.dwg", status=400, code="InvalidRequest")
    answer = _obstore_answer(Exception(text))
    assert (400, "InvalidRequest", "m", None) == (
        answer.status,
        answer.code,
        answer.message,
        answer.http_kind,
    )


def test_an_obstore_connection_error_is_known_by_its_http_error_kind() -> None:
    """No status, an ``HttpError`` kind: a network failure."""
    text = (
        "Generic S3 error: HTTP error: error sending request\n\nDebug source:\nGeneric {\n"
        "    source: RetryError(\n        RetryErrorImpl {\n            inner: Http(\n"
        "                HttpError {\n                    kind: Interrupted,\n"
        "                    source: x,\n                },\n            ),\n        },\n    ),\n}"
    )
    answer = _obstore_answer(Exception(text))
    assert (None, "Interrupted") == (answer.status, answer.http_kind)


def test_an_answer_without_a_date_warns_once_and_uses_the_local_clock() -> None:
    """The store sent no ``Date``: a warning (once), then the local clock."""
    s3_client._WARNED_NO_DATE.clear()  # once per process: an earlier test may have warned
    with capture_logs() as logs:
        _date({"ResponseMetadata": {"HTTPHeaders": {}}})
        _date({"ResponseMetadata": {"HTTPHeaders": {}}})
    warned = [e for e in logs if e["event"] == "store_sent_no_date"]
    assert 1 == len(warned)
    date = _date({"ResponseMetadata": {"HTTPHeaders": {"date": "Thu, 03 Dec 2026 07:00:00 GMT"}}})
    assert (2026, 7) == (date.year, date.hour)


def test_the_lock_keeper_spaces_its_writes_of_the_lock_key_by_the_write_gap(
    tmp_path: Path,
) -> None:
    """Acquire, renew, renew at once: each write waits out 1 s since the last; the release
    right after does not wait (a close would sit out a second for nothing)."""
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(round(seconds, 3))
        now[0] += seconds

    store = LocalStore(tmp_path / "store", create=True)
    holder = Holder(user="alice", machine="m1", pid=1, session_id="s1", agent_version="t")
    config = LockConfig(heartbeat_interval=3600, stale_after=7200, write_gap=1.0)
    lock = RemoteLock(store, "p/s.lock.json", holder, config, sleep=sleep, clock=lambda: now[0])
    lock.acquire()
    lock.renew()
    now[0] += 0.4
    lock.renew()
    now[0] += 0.1
    lock.release()  # the last write: no wait (a 429 would be retried with backoff)
    assert [1.0, 0.6] == slept
