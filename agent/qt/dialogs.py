"""The two ready dialogs of ``agent.qt``: recovery at start-up, progress of a verb."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from PySide6.QtGui import QCloseEvent, QShortcut
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QLabel,
    QListWidget,
    QMessageBox,
    QProgressDialog,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from agent.errors import SessionCancelledError
from agent.qt.adapter import SessionAdapter
from agent.qt.refs import _disconnect, _void
from agent.session.recovery import RecoveryInfo


class RecoveryDialog(QDialog):
    """What an interrupted session left, and the choice: Resume, Discard or Later.

    ``choice`` is ``"resume"``, ``"discard"`` (the user confirmed the listed losses)
    or ``"later"``.
    """

    def __init__(self, info: RecoveryInfo, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.info = info
        self.choice = "later"
        self.setWindowTitle("Unfinished editing session")
        layout = QVBoxLayout(self)
        how = (
            "The program ended while this session was open; its work was saved."
            if info.kind == "handled"
            else "The program ended without saving this session (killed or power loss); "
            "the working folder is still on disk."
        )
        layout.addWidget(
            QLabel(
                f"<b>{info.projekt_id}</b> / {info.stage} (user {info.user}), "
                f"{info.crashed_at:%Y-%m-%d %H:%M} UTC<br>{how}"
            )
        )
        layout.addWidget(QLabel(f"Backup of the files: {info.backup_path or 'none'}"))
        unsaved = info.unsaved
        layout.addWidget(
            QLabel(
                f"{len(unsaved)} change(s) are not in the store yet:"
                if unsaved
                else "Every change is in the store."
            )
        )
        self.files = QListWidget(self)
        for rel in unsaved:
            self.files.addItem(f"{rel}  ({change_state(info, rel)})")
        layout.addWidget(self.files)
        buttons = QDialogButtonBox(self)
        self.resume_button = QPushButton("Resume", self)
        self.discard_button = QPushButton("Discard…", self)
        self.later_button = QPushButton("Later", self)
        buttons.addButton(self.resume_button, QDialogButtonBox.ButtonRole.AcceptRole)
        buttons.addButton(self.discard_button, QDialogButtonBox.ButtonRole.DestructiveRole)
        buttons.addButton(self.later_button, QDialogButtonBox.ButtonRole.RejectRole)
        self.resume_button.clicked.connect(self._resume)
        self.discard_button.clicked.connect(self._discard)
        self.later_button.clicked.connect(self.reject)
        layout.addWidget(buttons)

    def _resume(self) -> None:
        self.choice = "resume"
        self.accept()

    def _discard(self) -> None:
        if self.confirm_discard():
            self.choice = "discard"
            self.accept()

    def confirm_discard(self) -> bool:
        """Ask before losing changes (none to lose: no question)."""
        unsaved = self.info.unsaved
        if not unsaved:
            return True
        shown = "\n".join(unsaved[:20]) + ("\n…" if len(unsaved) > 20 else "")
        answer = QMessageBox.warning(
            self,
            "Discard changes",
            f"These {len(unsaved)} change(s) will be lost for good:\n\n{shown}",
            QMessageBox.StandardButton.Discard | QMessageBox.StandardButton.Cancel,
            QMessageBox.StandardButton.Cancel,
        )
        return answer == QMessageBox.StandardButton.Discard


def change_state(info: RecoveryInfo, rel: str) -> str:
    """How the recovery dialog names an unsaved change: ``"deleted, not committed"``
    (in neither the backup nor the working folder), ``"only here"`` (the store has no
    copy) or ``"uploaded, not committed"`` (in this session's staging only)."""
    if rel in info.deleted:
        return "deleted, not committed"
    parts = rel.split("/")
    folders = [p for p in (info.backup_path, info.work_path) if p is not None]
    if not any(os.path.lexists(folder.joinpath(*parts)) for folder in folders):
        return "deleted, not committed"
    return "only here" if rel in info.pending else "uploaded, not committed"


def offer_recovery(adapter: SessionAdapter, parent: QWidget | None = None) -> str | None:
    """At start-up: show the recovery dialog if a session was left, and act on the choice.

    Returns the choice (``None`` when there was nothing to recover). Resume and discard
    run on a worker (``adapter.finished`` / ``adapter.failed`` report them).
    """
    info = adapter.check_previous_crash()
    if info is None:
        return None
    dialog = RecoveryDialog(info, parent)
    dialog.exec()
    if dialog.choice == "resume":
        adapter.resume(info.session_id)
    elif dialog.choice == "discard":
        adapter.discard(info.session_id, confirm_loss=info.unsaved)
    return dialog.choice


class ProgressDialog(QProgressDialog):
    """Shows an adapter's progress; its Cancel button cancels the open/resume.

    While Cancel cannot apply (a close that commits, an abort, the end of an open),
    the button and Escape are disabled, the label says why (``cancel_refusal``) and
    closing the dialog is refused: it never hides while its verb goes on. Closes
    itself when the verb finishes or fails.
    """

    def __init__(self, adapter: SessionAdapter, title: str, parent: QWidget | None = None) -> None:
        super().__init__(title, "Cancel", 0, 100, parent)
        self.adapter = adapter
        self._message = title
        self._ended = False
        _void(self.setWindowTitle, title)
        _void(self.setMinimumDuration, 0)
        _void(self.setAutoClose, False)
        _void(self.setAutoReset, False)
        _void(self.setValue, 0)
        self._connections: list[tuple[Any, Callable[..., object]]] = [
            (adapter.progress, self._on_progress),
            (adapter.stateChanged, self._refresh),
            (adapter.verbStarted, self._refresh),
            (adapter.finished, self._done),
            (adapter.failed, self._done),
            (self.canceled, adapter.cancel),  # closing emits canceled: not for the next verb
        ]
        for signal, slot in self._connections:
            signal.connect(slot)
        self._refresh()

    def _on_progress(self, message: str, percent: int) -> None:
        self._message = message
        _void(self.setValue, percent)
        self._refresh()

    def _refresh(self, *_args: object) -> None:
        reason = self.adapter.cancel_refusal()
        button = self.findChild(QPushButton)
        if button is not None:
            _void(button.setEnabled, reason is None)
        for shortcut in self.findChildren(QShortcut):  # Escape emits canceled
            _void(shortcut.setEnabled, reason is None)
        label = self._message if reason is None else f"{self._message}\n({reason})"
        if label != self.labelText():
            _void(self.setLabelText, label)

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 - Qt's name
        """Refused while the verb runs and cannot be cancelled (it would only hide)."""
        if not self._ended and self.adapter.cancel_refusal() is not None:
            event.ignore()
            return
        super().closeEvent(event)

    def reject(self) -> None:
        """Escape: refused like ``closeEvent``."""
        if not self._ended and self.adapter.cancel_refusal() is not None:
            return
        super().reject()

    def _done(self, *_args: object) -> None:
        self._ended = True
        for signal, slot in self._connections:
            _disconnect(signal, slot)
        self.close()


def is_cancelled(exc: object) -> bool:
    """True if a ``failed`` signal's exception is a cancellation (not an error to show)."""
    return isinstance(exc, SessionCancelledError)
