"""The ``agent`` command as a user runs it: real subprocesses on the embedded store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent.cli.doctor import COPY_CHECK
from agent.store.local import LocalStore
from tests.cli.conftest import Run
from tests.servers import RcloneS3Server
from tests.waiting import wait_for


def test_help_lists_the_commands_and_does_not_import_boto3(agent_env: dict[str, str]) -> None:
    """--help works and the CLI's import path stays free of boto3 and watchdog.

    Nor does it import structlog (--help logs nothing), and a command that logs imports
    structlog without rich (rich stays importable, for the progress bars).
    """
    code = (
        "import sys, agent.cli.app\n"
        "from click.testing import CliRunner\n"
        "r = CliRunner().invoke(agent.cli.app.cli, ['--help'])\n"
        "print(r.output)\n"
        "print('boto3' in sys.modules, 'watchdog' in sys.modules, 'structlog' in sys.modules)\n"
        "s = CliRunner().invoke(agent.cli.app.cli, ['status'])\n"
        "assert 0 == s.exit_code, s.output\n"
        "import structlog.dev\n"
        "print('rich' in sys.modules, structlog.dev.rich is None)\n"
        "import rich.progress\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=agent_env, capture_output=True, text=True, check=True
    ).stdout
    for command in ("open", "close", "abort", "status", "doctor", "lock"):
        assert command in out
    assert ["False False False", "False True"] == out.strip().splitlines()[-2:]


def test_open_status_close_round_trip(run: Run, tmp_path: Path) -> None:
    """open prints the folder, status --json lists the session, close commits and releases."""
    opened = run("open", "Kraftwerk_1234567", "--user", "admin", "--stage", "planning", "--json")
    assert 0 == opened.returncode, opened.stderr
    info = json.loads(opened.stdout)
    work = Path(info["path"])
    assert work.is_dir()
    assert str(tmp_path / "base") in str(work)
    (work / "plan.txt").write_text("edited")
    status = run("status", "--json")
    assert 0 == status.returncode, status.stderr
    sessions = json.loads(status.stdout)["sessions"]
    assert ["Kraftwerk_1234567"] == [s["projekt_id"] for s in sessions]
    closed = run("close", "--json")
    assert 0 == closed.returncode, closed.stderr
    assert ["plan.txt"] == json.loads(closed.stdout)["uploaded"]
    lock = run("lock", "show", "Kraftwerk_1234567", "--stage", "planning", "--json")
    assert "released" == json.loads(lock.stdout)["lock"]["body"]["state"]
    assert [] == json.loads(run("status", "--json").stdout)["sessions"]


def test_lock_held_has_its_own_exit_code_and_names_the_holder(
    run: Run, agent_env: dict[str, str], tmp_path: Path
) -> None:
    """A second user on another machine's folder gets exit 5 and the holder's name."""
    assert 0 == run("open", "P1", "--user", "alice", "--stage", "detail").returncode
    other = dict(agent_env, AGENT_PATHS__BASE_DIR=str(tmp_path / "other"))
    other["AGENT_STORE__URL"] = (tmp_path / "base" / "store").as_uri()
    denied = run("open", "P1", "--user", "bob", "--stage", "detail", env=other)
    assert 5 == denied.returncode
    assert "alice" in denied.stderr
    assert 0 == run("abort").returncode


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (("open", "../evil", "--user", "a", "--stage", "planning"), 3, "projekt_id"),
        (("open", "P", "--user", "a", "--stage", "plan/ning"), 3, "stage"),
        (("close",), 15, "no open session"),
        (("abort",), 15, "no open session"),
        (("lock", "unlock", "P", "--stage", "planning"), 2, "--force"),
    ],
)
def test_bad_input_exit_codes(run: Run, args: tuple[str, ...], code: int, text: str) -> None:
    """Each kind of bad input has its documented exit code and a message naming the problem."""
    result = run(*args)
    assert code == result.returncode, result.stderr
    assert text in result.stderr


def test_json_errors_are_machine_readable(run: Run) -> None:
    """With --json an error is one JSON object on stdout with type and exit code."""
    result = run("close", "--json")
    assert 15 == result.returncode
    err = json.loads(result.stdout)["error"]
    assert "SessionError" == err["type"]
    assert 15 == err["exit_code"]


def test_bad_config_value_is_exit_3_naming_the_key(run: Run, agent_env: dict[str, str]) -> None:
    """A bad environment override is refused naming the key."""
    env = dict(agent_env, AGENT_TRANSFER__WORKERS="zero")
    result = run("status", env=env)
    assert 3 == result.returncode
    assert "transfer.workers" in result.stderr


def test_doctor_passes_on_the_embedded_store(run: Run) -> None:
    """doctor's checks all pass on the default folder store, which honours the copy condition."""
    result = run("doctor", "--json")
    assert 0 == result.returncode, result.stdout + result.stderr
    checks = json.loads(result.stdout)["checks"]
    assert all(c["ok"] for c in checks)
    assert any("conditional" in c["name"] for c in checks)
    assert [("honoured", False)] == [
        (c["found"], c.get("warning", False)) for c in checks if c["name"] == COPY_CHECK
    ]


def test_background_agent_streams_and_reports_through_status_and_flush(run: Run) -> None:
    """A save is streamed by the background agent; flush waits; status shows nothing pending."""
    info = json.loads(run("open", "P2", "--user", "admin", "--stage", "detail", "--json").stdout)
    work = Path(info["path"])
    (work / "a.dwg").write_bytes(b"drawing")
    flushed = run("flush", "--json")
    assert 0 == flushed.returncode, flushed.stderr
    assert json.loads(flushed.stdout)["flushed"]
    [row] = json.loads(run("status", "--json").stdout)["sessions"]
    assert ("running", 0) == (row["agent"], row["pending"])
    assert row["uploads"] >= 1
    assert 0 == run("close").returncode


def test_agent_refuses_a_wrong_key_and_a_dead_agent_points_at_recover(
    run: Run, tmp_path: Path
) -> None:
    """The channel refuses a wrong token; with the agent gone, close says to run recover."""
    import signal

    from agent.platform import pid_alive

    info = json.loads(run("open", "P3", "--user", "admin", "--stage", "detail", "--json").stdout)
    key_file = next((tmp_path / "base" / "state" / "sessions").glob("*/token"))
    good = key_file.read_bytes()
    key_file.write_bytes(b"x" * 64)
    refused = run("status", "--json")
    [row] = json.loads(refused.stdout)["sessions"]
    assert "wrong token" in row["agent_error"]
    key_file.write_bytes(good)
    os.kill(int(info["agent_pid"]), signal.SIGKILL)
    assert wait_for(lambda: not pid_alive(int(info["agent_pid"])), timeout=10)
    closed = run("close")
    assert 17 == closed.returncode
    assert "agent recover" in closed.stderr
    assert 0 == run("recover", "--discard", "--yes").returncode


def test_doctor_refuses_a_store_without_conditional_writes(
    run: Run, agent_env: dict[str, str], rclone_server: RcloneS3Server
) -> None:
    """doctor against rclone's S3 server: exit 4, naming the missing mutual exclusion."""
    bucket = f"doc-{uuid.uuid4().hex[:12]}"
    rclone_server.create_bucket(bucket)
    env = {**agent_env, **rclone_server.env(), "AGENT_STORE__URL": f"s3://{bucket}/p"}
    result = run("doctor", "--json", env=env)
    assert 4 == result.returncode, result.stdout + result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["bucket and credentials"]["ok"]
    assert not checks["conditional writes (locking)"]["ok"]
    assert "no mutual exclusion" in checks["conditional writes (locking)"]["detail"]


SETPRIV = shutil.which("setpriv")


@pytest.mark.skipif(SETPRIV is None, reason="setpriv (util-linux) is not installed")
def test_a_file_no_one_may_read_waits_quietly_and_is_sent_once_readable(
    run: Run, agent_env: dict[str, str]
) -> None:
    """Mode 000 (as a Windows editor's lock): status lists it as waiting, no error; then sent.

    The tests run as root, whom mode 000 does not stop: the agent is started without the
    capabilities that let root read any file (setpriv), as an ordinary user runs it.
    """
    assert SETPRIV is not None
    opened = subprocess.run(
        [
            SETPRIV,
            "--bounding-set=-dac_override,-dac_read_search",
            sys.executable,
            "-m",
            "agent",
            "open",
            "Kraftwerk_1234567",
            "--user",
            "admin",
            "--stage",
            "planning",
            "--json",
        ],
        env=agent_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert 0 == opened.returncode, opened.stderr
    work = Path(json.loads(opened.stdout)["path"])
    fd = os.open(work / "held.dwg", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o000)
    os.write(fd, b"locked drawing")
    os.close(fd)

    def session() -> dict[str, object]:
        out = run("status", "--json")
        assert 0 == out.returncode, out.stderr
        row: dict[str, object] = json.loads(out.stdout)["sessions"][0]
        return row

    assert wait_for(lambda: session().get("waiting") == ["held.dwg"], 30.0)
    row = session()
    assert row.get("error") is None and row.get("last_error") is None, row
    text = run("status").stdout
    assert "waiting" in text and "PROBLEM" not in text

    (work / "held.dwg").chmod(0o644)
    assert wait_for(lambda: session().get("waiting") == [] and session().get("pending") == 0, 30.0)
    closed = run("close", "--json")
    assert 0 == closed.returncode, closed.stderr
    assert "held.dwg" in json.loads(closed.stdout)["uploaded"]


def test_status_reports_the_repair_of_a_plain_tree_a_tool_damaged(run: Run, tmp_path: Path) -> None:
    """A committed file deleted from the store by a plain tool: the next `agent open` still
    gets it (from .objects/), and `agent status` says it was copied back, in text and JSON."""
    opened = run("open", "Kraftwerk_1234567", "--user", "admin", "--stage", "planning", "--json")
    assert 0 == opened.returncode, opened.stderr
    work = Path(json.loads(opened.stdout)["path"])
    (work / "plan.txt").write_text("committed")
    assert 0 == run("close", "--json").returncode
    store = LocalStore(tmp_path / "base" / "store")
    store.delete("Kraftwerk_1234567/planning/plan.txt")  # what a sync tool might do
    opened = run("open", "Kraftwerk_1234567", "--user", "admin", "--stage", "planning", "--json")
    assert 0 == opened.returncode, opened.stderr
    assert "committed" == (Path(json.loads(opened.stdout)["path"]) / "plan.txt").read_text()

    def checked() -> dict[str, Any]:
        row: dict[str, Any] = json.loads(run("status", "--json").stdout)["sessions"][0]
        return row

    assert wait_for(lambda: isinstance(checked().get("stage_check"), dict), timeout=30)
    assert ["plan.txt"] == checked()["stage_check"]["recopied"]
    assert "stage repaired: 1 files copied again from .objects/" in run("status").stdout
    assert b"committed" == store.get("Kraftwerk_1234567/planning/plan.txt").body
    assert 0 == run("abort").returncode


def test_two_closes_at_once_one_commits_and_the_other_says_so(
    run: Run, agent_env: dict[str, str]
) -> None:
    """Two `agent close` at the same time: one commits; the other ends with a message for a
    CLI user (no library advice), never a second commit."""
    opened = run("open", "Kraftwerk_1234567", "--user", "admin", "--stage", "planning", "--json")
    assert 0 == opened.returncode, opened.stderr
    work = Path(json.loads(opened.stdout)["path"])
    for i in range(200):
        (work / f"f{i:03d}.txt").write_text(f"file {i}")
    closes = [
        subprocess.Popen(
            [sys.executable, "-m", "agent", "close", "--json"],
            env=agent_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(c.wait(timeout=120), *c.communicate()) for c in closes]
    codes = sorted(code for code, _out, _err in results)
    assert 0 == codes[0] and codes[1] == 15, results
    loser = next(out + err for code, out, err in results if code != 0)  # --json: on stdout
    assert "PlantDesignSession" not in loser
    assert "already closed" in loser or "no open session" in loser, loser
    history = run("history", "Kraftwerk_1234567", "--stage", "planning", "--json")
    assert 1 == len(json.loads(history.stdout)["commits"]), "committed twice"


def test_a_journal_damaged_under_the_background_agent_is_rebuilt_by_agent_close(
    run: Run, tmp_path: Path
) -> None:
    """The journal file goes bad while the agent runs: `agent status` still says the agent
    runs, and `agent close` rebuilds the journal from the folder and commits everything
    (it used to exit 12 and point at a `recover --resume` that refused a live agent)."""
    opened = run("open", "Kraftwerk_1234567", "--user", "admin", "--stage", "planning", "--json")
    assert 0 == opened.returncode, opened.stderr
    work = Path(json.loads(opened.stdout)["path"])
    (work / "a.txt").write_text("before")
    assert 0 == run("flush").returncode
    [journal] = (tmp_path / "base" / "state" / "sessions").glob("*/journal.sqlite")
    for part in (journal, journal.with_name(journal.name + "-wal")):
        if part.exists():
            with part.open("r+b") as fh:
                fh.write(os.urandom(min(part.stat().st_size, 8192)))
    (work / "b.txt").write_text("after")
    status = json.loads(run("status", "--json").stdout)["sessions"][0]
    assert "running" == status["agent"], status
    closed = run("close", "--json")
    assert 0 == closed.returncode, closed.stdout + closed.stderr
    assert ["a.txt", "b.txt"] == json.loads(closed.stdout)["uploaded"]


@pytest.mark.parametrize("kind", ["folder", "file", "another program's socket"])
def test_something_else_at_the_agents_socket_path_is_a_clear_error_not_a_traceback(
    run: Run, agent_env: dict[str, str], kind: str
) -> None:
    """A folder or a file where the agent's socket goes: `status` and `close` say the agent
    is not running, `recover --resume` says what is in the way and what to do (no internal
    error); once it is removed, the resume works. A socket some other program of ours left
    there (listening or not) is replaced: the resume works at once."""
    import signal
    import socket

    from agent.platform import pid_alive

    info = json.loads(run("open", "P4", "--user", "admin", "--stage", "s1", "--json").stdout)
    os.kill(int(info["agent_pid"]), signal.SIGKILL)
    assert wait_for(lambda: not pid_alive(int(info["agent_pid"])), timeout=10)
    runtime = Path(agent_env["AGENT_PATHS__RUNTIME_DIR"])
    [sock] = runtime.glob("*.sock")
    sock.unlink()
    squatter = None
    if kind == "folder":
        sock.mkdir()
    elif kind == "file":
        sock.write_text("not a socket")
    else:
        squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        squatter.bind(str(sock))
        squatter.listen(1)
    try:
        status = run("status", "--json")
        assert 0 == status.returncode, status.stderr
        assert "not running" == json.loads(status.stdout)["sessions"][0]["agent"]
        closed = run("close")
        assert 17 == closed.returncode, closed.stderr
        assert "agent recover" in closed.stderr and "Traceback" not in closed.stderr
        resumed = run("recover", "--resume")
        if squatter is not None:
            assert 0 == resumed.returncode, resumed.stderr
            assert 0 == run("abort").returncode
            return
        assert resumed.returncode not in (0, 70), resumed.stderr
        assert "is taken by something that is not this agent's socket" in resumed.stderr
        assert "Traceback" not in resumed.stderr
    finally:
        if squatter is not None:
            squatter.close()
    if sock.is_dir():
        sock.rmdir()
    else:
        sock.unlink()
    assert 0 == run("recover", "--resume").returncode
    assert 0 == run("abort").returncode


def test_status_of_a_live_agent_that_does_not_answer_says_so_and_names_what_works(
    run: Run, agent_env: dict[str, str]
) -> None:
    """The agent runs but cannot be reached (its socket gone): `status` does not say "not
    running", and `close` names a way out that works while it runs (stop it, then
    `recover --resume`), not a `recover` that refuses a live agent."""
    import signal

    from agent.platform import pid_alive

    info = json.loads(run("open", "P6", "--user", "admin", "--stage", "s1", "--json").stdout)
    pid = int(info["agent_pid"])
    [sock] = Path(agent_env["AGENT_PATHS__RUNTIME_DIR"]).glob("*.sock")
    sock.unlink()
    row = json.loads(run("status", "--json").stdout)["sessions"][0]
    assert "not answering" == row["agent"], row
    text = run("status").stdout
    assert "agent=not answering" in text and f"kill {pid}" in text, text
    closed = run("close")
    assert 17 == closed.returncode, closed.stderr
    assert f"kill {pid}" in closed.stderr and "recover --resume" in closed.stderr
    os.kill(pid, signal.SIGTERM)
    assert wait_for(lambda: not pid_alive(pid), timeout=30)
    assert "not running" == json.loads(run("status", "--json").stdout)["sessions"][0]["agent"]
    assert 0 == run("recover", "--resume").returncode
    assert 0 == run("abort").returncode


def test_store_max_manifest_bytes_is_the_limit_a_manifest_is_read_with(
    run: Run, agent_env: dict[str, str]
) -> None:
    """`store.max_manifest_bytes` is what a manifest is read with: a 40-file stage's
    manifest over a limit of 1 KiB is refused naming the limit (exit 7); with the
    default the same open works (the setting used to be read nowhere)."""
    first = run("open", "P7", "--user", "admin", "--stage", "s1", "--json")
    assert 0 == first.returncode, first.stderr
    work = Path(json.loads(first.stdout)["path"])
    for i in range(40):
        (work / f"file{i:02d}.txt").write_text(f"content {i}")
    assert 0 == run("close").returncode
    small = dict(agent_env, AGENT_STORE__MAX_MANIFEST_BYTES="1024")
    refused = run("open", "P7", "--user", "admin", "--stage", "s1", env=small)
    assert 7 == refused.returncode, refused.stdout + refused.stderr
    assert "P7/s1.manifest.json" in refused.stderr and "1024 bytes" in refused.stderr
    assert 0 == run("open", "P7", "--user", "admin", "--stage", "s1").returncode
    assert 0 == run("abort").returncode


def test_a_second_home_of_the_same_user_cannot_open_a_stage_a_live_agent_holds(
    run: Run, agent_env: dict[str, str], tmp_path: Path
) -> None:
    """Same user, same machine, another HOME (another state folder) on the same store: the
    stage held by the first agent is refused (exit 5), right after `agent open` returned."""
    first = run("open", "P5", "--user", "admin", "--stage", "s1", "--json")
    assert 0 == first.returncode, first.stderr
    other = dict(agent_env, AGENT_PATHS__BASE_DIR=str(tmp_path / "home2"))
    other["AGENT_STORE__URL"] = f"file://{tmp_path / 'base' / 'store'}"
    second = run("open", "P5", "--user", "admin", "--stage", "s1", "--json", env=other)
    assert 5 == second.returncode, second.stdout + second.stderr
    assert 0 == run("close").returncode


def _open_session(run: Run, env: dict[str, str]) -> Path:
    opened = run(
        "open", "Kraftwerk_1234567", "--user", "admin", "--stage", "planning", "--json", env=env
    )
    assert 0 == opened.returncode, opened.stderr
    return Path(json.loads(opened.stdout)["path"])


def _session_row(run: Run, env: dict[str, str]) -> dict[str, Any]:
    status = run("status", "--json", env=env)
    assert 0 == status.returncode, status.stderr
    row: dict[str, Any] = json.loads(status.stdout)["sessions"][0]
    return row


def test_a_folder_made_after_the_watch_limit_is_polled_streamed_and_status_says_so(
    run: Run, agent_env: dict[str, str]
) -> None:
    """The watch limit met in mid-session (the per-session cap stands in for the system's):
    the agent polls from then on, a save in the new folder is streamed long before the
    10-minute rescan, and `agent status` says polling and why, in text and JSON."""
    env = dict(agent_env, AGENT_WATCH__MAX_WATCHES="2", AGENT_WATCH__DEBOUNCE="0.1")
    work = _open_session(run, env)
    (work / "first").mkdir()  # the root and this one: the cap
    assert wait_for(lambda: _session_row(run, env).get("watch_mode") == "events", 30.0)
    (work / "late").mkdir()
    assert wait_for(lambda: _session_row(run, env).get("watch_mode") == "polling", 30.0)
    (work / "late" / "plan.dwg").write_bytes(b"saved in a folder made after the limit")
    assert wait_for(
        lambda: (r := _session_row(run, env)).get("uploads", 0) >= 1 and r.get("pending") == 0,
        30.0,
    )
    row = _session_row(run, env)
    assert "late" in row["watch_mode_reason"], row
    text = run("status", env=env).stdout
    assert "watching by polling" in text and "late" in text, text
    closed = run("close", "--json", env=env)
    assert 0 == closed.returncode, closed.stderr
    assert ["late/plan.dwg"] == json.loads(closed.stdout)["uploaded"]


def test_status_lists_links_and_special_files_and_the_committed_file_close_will_delete(
    run: Run, agent_env: dict[str, str]
) -> None:
    """A link that replaced a committed file and a FIFO: `agent status` lists them with
    what they are (JSON and text) while the session runs, not only at close."""
    work = _open_session(run, agent_env)
    (work / "plan.dwg").write_bytes(b"committed")
    assert 0 == run("close").returncode
    work = _open_session(run, agent_env)
    (work / "plan.dwg").unlink()
    (work / "plan.dwg").symlink_to("/etc/hostname")
    os.mkfifo(work / "pipe")

    def listed() -> list[Any]:
        rows: list[Any] = _session_row(run, agent_env).get("not_synchronised", [])
        return rows

    assert wait_for(lambda: len(listed()) == 2, 30.0), listed()
    assert [
        {"path": "pipe", "reason": "FIFO", "deletes_committed": False},
        {"path": "plan.dwg", "reason": "symbolic link", "deletes_committed": True},
    ] == listed()
    text = run("status").stdout
    assert "pipe (FIFO)" in text, text
    assert "plan.dwg (symbolic link; close will delete committed plan.dwg)" in text, text
    assert 0 == run("abort").returncode
