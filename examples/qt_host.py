"""A small Qt host for pd-session-agent: open a stage, edit, close; crash it and come back.

Run it against your store (the same ``AGENT_*`` settings as the CLI)::

    pip install 'pd-session-agent[qt]'
    export AGENT_STORE__URL=s3://bucket/prefix AGENT_STORE__ENDPOINT_URL=https://...
    python examples/qt_host.py

Then try: Open, change files in the folder shown, and end the program any way you
like: close the window, Ctrl-C in its terminal, ``kill <pid>`` (SIGTERM),
``kill -HUP``, or ``kill -9``. Start it again: the recovery dialog lists every
change that is not in the store yet and offers Resume / Discard / Later.
"""

from __future__ import annotations

import os
import sys

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import (
    QApplication,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QMainWindow,
    QMessageBox,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from agent.qt import ProgressDialog, SessionAdapter, is_cancelled, offer_recovery
from agent.state import SessionState


class HostWindow(QMainWindow):
    """Project fields, Open / Close / Abort, the state, and what the agent reported."""

    def __init__(self) -> None:
        super().__init__()
        self.setWindowTitle(f"Plant design host (pid {os.getpid()})")
        self.adapter = SessionAdapter(parent=self)
        self.projekt = QLineEdit("Kraftwerk_1234567")
        self.user = QLineEdit(os.environ.get("USER", "admin"))
        self.stage = QLineEdit("planning")
        self.state = QLabel("idle")
        self.folder = QLabel("-")
        self.folder.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.log = QListWidget()
        self.open_button = QPushButton("Open")
        self.close_button = QPushButton("Close (commit)")
        self.abort_button = QPushButton("Abort (discard)")
        form = QFormLayout()
        form.addRow("Project", self.projekt)
        form.addRow("User", self.user)
        form.addRow("Stage", self.stage)
        form.addRow("State", self.state)
        form.addRow("Working folder", self.folder)
        buttons = QHBoxLayout()
        for b in (self.open_button, self.close_button, self.abort_button):
            buttons.addWidget(b)
        layout = QVBoxLayout()
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.log)
        central = QWidget()
        central.setLayout(layout)
        self.setCentralWidget(central)
        self.open_button.clicked.connect(self.open_stage)
        self.close_button.clicked.connect(self.close_stage)
        self.abort_button.clicked.connect(self.adapter.abort)
        self.adapter.stateChanged.connect(self.on_state)
        self.adapter.finished.connect(self.on_finished)
        self.adapter.failed.connect(self.on_failed)
        self.adapter.error.connect(lambda message: self.log.addItem(f"error: {message}"))
        self.on_state(int(SessionState.IDLE))
        # After the window shows: anything left by a crash?
        QTimer.singleShot(0, self.check_recovery)

    def check_recovery(self) -> None:
        choice = offer_recovery(self.adapter, self)
        if choice is not None:
            self.log.addItem(f"recovery: {choice}")
            if choice == "resume":
                ProgressDialog(self.adapter, "Resuming…", self).show()

    def open_stage(self) -> None:
        ProgressDialog(self.adapter, "Opening…", self).show()
        self.adapter.open(self.projekt.text(), self.user.text(), self.stage.text())

    def close_stage(self) -> None:
        ProgressDialog(self.adapter, "Closing…", self).show()
        self.adapter.close()

    def on_state(self, state: int) -> None:
        current = SessionState(state)
        self.state.setText(str(current))
        busy = self.adapter.busy
        self.open_button.setEnabled(
            not busy and current in (SessionState.IDLE, SessionState.CLOSED)
        )
        self.close_button.setEnabled(not busy and current is SessionState.ACTIVE)
        self.abort_button.setEnabled(not busy and current is SessionState.ACTIVE)

    def on_finished(self, name: str, result: object) -> None:
        self.log.addItem(f"{name}: done {result if result is not None else ''}")
        if name in ("open", "resume"):
            self.folder.setText(str(result))
        elif name in ("close", "abort"):
            self.folder.setText("-")
        self.on_state(int(self.adapter.state))

    def on_failed(self, name: str, exc: object) -> None:
        self.on_state(int(self.adapter.state))
        if is_cancelled(exc):
            self.log.addItem(f"{name}: cancelled")
            return
        QMessageBox.critical(self, f"{name} failed", str(exc))

    def closeEvent(self, event: object) -> None:  # noqa: N802 - Qt's name
        """Leaving with a session open: it is saved for next time (the exit hook).

        Leaving while a verb runs: the adapter finishes it before the program ends
        (a close commits; an open is cancelled).
        """
        if self.adapter.busy:
            self.log.addItem(f"quitting: {self.adapter.verb} finishes first")
        elif self.adapter.state is SessionState.ACTIVE:
            self.log.addItem("quitting with the session open: saved for recovery")
        super().closeEvent(event)  # type: ignore[arg-type]


def main() -> int:
    """Start the host."""
    app = QApplication(sys.argv)
    window = HostWindow()
    window.resize(640, 420)
    window.show()
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
