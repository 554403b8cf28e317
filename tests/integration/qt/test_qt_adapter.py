"""The Qt adapter (issue 10): signals on the GUI thread, Cancel, the dialogs (pytest-qt)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("PySide6")

import shiboken6
from PySide6.QtCore import QObject, Qt, QThread, QThreadPool, QTimer
from PySide6.QtWidgets import QApplication, QMessageBox, QPushButton

from agent.config import AgentConfig, load_config
from agent.errors import AgentError, SessionCancelledError
from agent.qt import (
    ProgressDialog,
    RecoveryDialog,
    SessionAdapter,
    uninstall_crash_handling,
)
from agent.session import PlantDesignSession
from agent.stage.keys import StageKeys
from agent.state import SessionState
from agent.store.base import ObjectStore
from tests.waiting import wait_for

P, STAGE = "Kraftwerk_1234567", "planning"
KEYS = StageKeys(P, STAGE)
WAIT_MS = 60_000


def _config(base: Path) -> AgentConfig:
    return load_config(
        paths={"base_dir": str(base)},
        lock={"heartbeat_interval": 3600, "stale_after": 7200},
        watch={"debounce": 0.05, "max_delay": 0.5, "min_interval_per_path": 0.1},
    )


def _seed(store: ObjectStore, base: Path, files: int) -> None:
    s = PlantDesignSession(_config(base), store=store)
    work = s.open(P, "seeder", STAGE, watch=False)
    for i in range(files):
        (work / f"f{i}.bin").write_bytes(os.urandom(2048))
    s.close()


@pytest.fixture
def pool() -> Iterator[QThreadPool]:
    """A pool of the test's own, drained after it."""
    p = QThreadPool()
    yield p
    p.waitForDone(30_000)


@pytest.fixture
def adapter(
    qapp: QApplication, pool: QThreadPool, s3_store: ObjectStore, tmp_path: Path
) -> Iterator[SessionAdapter]:
    """An adapter on a SeaweedFS prefix; the crash handling given back after the test."""
    config = _config(tmp_path / "m")
    a = SessionAdapter(
        pool=pool, session_factory=lambda: PlantDesignSession(config, store=s3_store)
    )
    yield a
    pool.waitForDone(30_000)
    uninstall_crash_handling()


def _lock_free(store: ObjectStore) -> bool:
    try:
        body = json.loads(store.get(KEYS.lock).body)
    except AgentError:
        return True
    return bool(body["state"] != "held")


def test_signals_arrive_on_the_gui_thread_and_the_gui_never_waits(
    qtbot: Any, qapp: QApplication, adapter: SessionAdapter, s3_store: ObjectStore, tmp_path: Path
) -> None:
    """open/close run on workers; stateChanged/progress/finished reach slots on the GUI thread."""
    _seed(s3_store, tmp_path / "seed", files=40)
    gui = qapp.thread()
    threads: list[bool] = []
    states: list[int] = []
    progress: list[tuple[str, int]] = []

    def on_state(state: int) -> None:
        threads.append(QThread.currentThread() is gui)
        states.append(state)

    def on_progress(message: str, pct: int) -> None:
        threads.append(QThread.currentThread() is gui)
        progress.append((message, pct))

    adapter.stateChanged.connect(on_state)
    adapter.progress.connect(on_progress)
    with qtbot.waitSignal(adapter.finished, timeout=WAIT_MS) as opened:
        adapter.open(P, "admin", STAGE)
        assert adapter.busy, "open blocked the GUI thread instead of running on a worker"
    assert "open" == opened.args[0]
    work = Path(opened.args[1])
    (work / "edit.dwg").write_bytes(b"edited")
    with qtbot.waitSignal(adapter.finished, timeout=WAIT_MS) as closed:
        adapter.close()
    assert "close" == closed.args[0]
    assert threads and all(threads), "a slot ran on a worker thread"
    assert [1, 2, 4, 5, 7] == states
    downloads = [pct for m, pct in progress if m.startswith("Downloading")]
    assert downloads == sorted(downloads) and 100 == downloads[-1]
    assert b"edited" == s3_store.get(KEYS.committed("edit.dwg")).body


def test_cancel_from_the_gui_during_download_frees_the_lock(
    qtbot: Any, adapter: SessionAdapter, s3_store: ObjectStore, tmp_path: Path
) -> None:
    """The progress dialog's Cancel: failed("open", SessionCancelledError), lock free."""
    _seed(s3_store, tmp_path / "seed", files=40)
    dialog = ProgressDialog(adapter, "Opening")
    qtbot.addWidget(dialog)
    session = adapter.session

    def hold_until_cancelled(_message: str, _pct: int) -> None:
        # On the worker: the download waits until the GUI's Cancel reached the session.
        session._cancel.wait(timeout=30)

    session.progress.connect(hold_until_cancelled)
    adapter.stateChanged.connect(
        lambda s: dialog.canceled.emit() if s == int(SessionState.DOWNLOADING) else None
    )
    with qtbot.waitSignal(adapter.failed, timeout=WAIT_MS) as failed:
        adapter.open(P, "admin", STAGE)
    assert "open" == failed.args[0]
    assert isinstance(failed.args[1], SessionCancelledError)
    assert _lock_free(s3_store)
    assert not dialog.isVisible()
    assert [] == list(session.records.all())


def test_the_recovery_dialog_lists_every_unsaved_change_and_discard_confirms(
    qtbot: Any,
    adapter: SessionAdapter,
    s3_store: ObjectStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Built from check_previous_crash(): the files, the backup; Discard asks, then acts."""
    config = _config(tmp_path / "m")
    first = PlantDesignSession(config, store=s3_store)
    work = first.open(P, "admin", STAGE, watch=False)
    (work / "a.dwg").write_bytes(b"a")
    (work / "b.dwg").write_bytes(b"b")
    first.emergency_save("test")
    info = adapter.check_previous_crash()
    assert info is not None
    dialog = RecoveryDialog(info)
    qtbot.addWidget(dialog)
    listed = [dialog.files.item(i).text() for i in range(dialog.files.count())]
    assert ["a.dwg", "b.dwg"] == [line.split()[0] for line in listed]
    asked: list[str] = []

    def answer(*args: Any) -> QMessageBox.StandardButton:
        asked.append(args[2])
        return QMessageBox.StandardButton.Discard

    monkeypatch.setattr(QMessageBox, "warning", answer)
    QTimer.singleShot(0, dialog.discard_button.click)
    dialog.exec()
    assert "discard" == dialog.choice
    assert "a.dwg" in asked[0] and "b.dwg" in asked[0]
    with qtbot.waitSignal(adapter.finished, timeout=WAIT_MS):
        adapter.discard(info.session_id, confirm_loss=info.unsaved)
    assert adapter.check_previous_crash() is None
    assert not work.exists()


def test_the_recovery_dialog_names_a_deleted_file_deleted(
    qtbot: Any, adapter: SessionAdapter, s3_store: ObjectStore, tmp_path: Path
) -> None:
    """A deletion streamed to staging was listed "(uploaded, not committed)" (issue 20)."""
    _seed(s3_store, tmp_path / "seed", files=2)
    config = _config(tmp_path / "m")
    first = PlantDesignSession(config, store=s3_store)
    work = first.open(P, "admin", STAGE)
    (work / "f0.bin").unlink()
    journal = first._journal
    assert journal is not None
    assert wait_for(lambda: "f0.bin" in journal.staged(), timeout=30)
    assert "delete" == journal.staged()["f0.bin"].op
    first.emergency_save("test")
    info = adapter.check_previous_crash()
    assert info is not None and ["f0.bin"] == info.unsaved
    dialog = RecoveryDialog(info)
    qtbot.addWidget(dialog)
    assert ["f0.bin  (deleted, not committed)"] == [
        dialog.files.item(i).text() for i in range(dialog.files.count())
    ]


def test_cancel_during_close_is_disabled_says_why_and_the_dialog_stays_until_committed(
    qtbot: Any, adapter: SessionAdapter, s3_store: ObjectStore
) -> None:
    """Cancel, Escape or closing the dialog while close commits: the dialog hid while the
    commit went on, with nothing telling the user that Cancel did not apply (issue 20)."""
    with qtbot.waitSignal(adapter.finished, timeout=WAIT_MS) as opened:
        adapter.open(P, "admin", STAGE, watch=False)
    (Path(opened.args[1]) / "edit.dwg").write_bytes(b"edited")
    release = threading.Event()

    def hold_upload(message: str, _pct: int) -> None:
        # On the worker: the upload waits until the test has tried to cancel.
        if message.startswith("Uploading"):
            release.wait(timeout=30)

    adapter.session.progress.connect(hold_upload)
    dialog = ProgressDialog(adapter, "Closing")
    qtbot.addWidget(dialog)
    dialog.show()
    results: list[str] = []
    adapter.finished.connect(lambda name, _result: results.append(name))
    adapter.failed.connect(lambda name, _exc: results.append(f"failed {name}"))
    adapter.close()
    try:
        qtbot.waitUntil(lambda: dialog.labelText().startswith("Uploading"), timeout=WAIT_MS)
        button = dialog.findChild(QPushButton)
        assert button is not None
        assert not button.isEnabled()
        assert "committing: cannot be cancelled" in dialog.labelText()
        assert not adapter.can_cancel()
        qtbot.mouseClick(button, Qt.MouseButton.LeftButton)
        qtbot.keyClick(dialog, Qt.Key.Key_Escape)
        dialog.close()
        QApplication.processEvents()
        assert dialog.isVisible(), "the dialog hid while the commit went on"
        assert not dialog.wasCanceled()
    finally:
        release.set()
    qtbot.waitUntil(lambda: bool(results), timeout=WAIT_MS)
    assert ["close"] == results
    assert not dialog.isVisible()
    assert b"edited" == s3_store.get(KEYS.committed("edit.dwg")).body


def test_a_verb_ending_after_its_adapter_was_deleted_emits_into_nothing(
    qapp: QApplication,
    pool: QThreadPool,
    s3_store: ObjectStore,
    tmp_path: Path,
    *,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The window (and with it the adapter) deleted while a worker runs: its last signals
    raised "Signal source has been deleted" on the worker (issue 20)."""
    config = _config(tmp_path / "m")
    window = QObject()
    a = SessionAdapter(
        parent=window,
        pool=pool,
        crash_handling=False,
        session_factory=lambda: PlantDesignSession(config, store=s3_store),
    )
    session = a.session
    deleted = threading.Event()

    def hold(_state: object) -> None:
        # On the worker: open goes on only once the adapter is gone.
        deleted.wait(timeout=30)

    session.state_changed.connect(hold)
    a.open(P, "admin", STAGE, watch=False)
    shiboken6.delete(window)
    assert not shiboken6.isValid(a)
    deleted.set()
    assert pool.waitForDone(WAIT_MS)
    qapp.processEvents()
    err = capfd.readouterr().err
    assert "RuntimeError" not in err and "signal_slot_failed" not in err, err
    assert [] == [r.getMessage() for r in caplog.records if "signal_slot_failed" in r.getMessage()]
    assert SessionState.ACTIVE is session.state
    session.close()
