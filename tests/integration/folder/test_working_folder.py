"""The working folder with real tools (issue 8): every saved byte reaches the store.

Real commands (``cp -p``, ``touch -r``, ``tar``), real watchdog observers and both
real stores (the folder store and SeaweedFS).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig, load_config
from agent.errors import InvalidNameError, LocalFileError
from agent.session import PlantDesignSession
from agent.stage.keys import StageKeys
from agent.stage.manifest import Manifest, ManifestEntry
from agent.store.base import ObjectStore
from tests.waiting import wait_for

P, STAGE = "Kraftwerk_1234567", "planning"
KEYS = StageKeys(P, STAGE)
DEADLINE = 20.0
FAST_WATCH = {"debounce": 0.1, "max_delay": 1.0, "min_interval_per_path": 0.2}

MakeSession = Callable[..., PlantDesignSession]


@pytest.fixture
def make_session(store: ObjectStore, tmp_path: Path) -> MakeSession:
    """Sessions sharing one store; each ``machine`` gets its own base folder."""

    def make(machine: str = "m1", **sections: Any) -> PlantDesignSession:
        sections.setdefault("watch", FAST_WATCH)
        config: AgentConfig = load_config(
            paths={"base_dir": str(tmp_path / machine)},
            lock={"heartbeat_interval": 3600, "stale_after": 7200},
            **sections,
        )
        return PlantDesignSession(config, store=store)

    return make


def _write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def _committed(store: ObjectStore) -> dict[str, bytes]:
    return {
        KEYS.rel_from_committed(o.key): store.get(o.key).body
        for o in store.list(KEYS.committed_prefix)
    }


def _seed(make_session: MakeSession, files: dict[str, bytes]) -> None:
    s = make_session("seed")
    work = s.open(P, "seeder", STAGE, watch=False)
    _write(work, files)
    s.close()


# ------------------------------------------------------------ change detection


@pytest.mark.parametrize("watch", [True, False], ids=["watching", "close-scan-only"])
def test_cp_p_of_same_size_and_mtime_commits_the_new_bytes(
    make_session: MakeSession, store: ObjectStore, tmp_path: Path, watch: bool
) -> None:
    """``cp -p`` of other bytes with the old size and mtime is committed, and cached as new."""
    _seed(make_session, {"plan.dwg": b"drawing-v1"})
    s = make_session()
    work = s.open(P, "admin", STAGE, watch=watch)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "plan.dwg").write_bytes(b"drawing-v2")
    subprocess.run(["touch", "-r", str(work / "plan.dwg"), str(outside / "plan.dwg")], check=True)
    subprocess.run(["cp", "-p", str(outside / "plan.dwg"), str(work / "plan.dwg")], check=True)
    assert s.flush(timeout=DEADLINE)
    report = s.close()
    assert ["plan.dwg"] == report.uploaded
    assert {"plan.dwg": b"drawing-v2"} == _committed(store)
    again = make_session()
    assert b"drawing-v2" == (again.open(P, "admin", STAGE) / "plan.dwg").read_bytes()
    assert [] == again.close().uploaded


def test_touch_r_restoring_the_mtime_after_an_edit_commits_the_edit(
    make_session: MakeSession, store: ObjectStore, tmp_path: Path
) -> None:
    """An in-place edit whose mtime is put back with ``touch -r`` still reaches the store."""
    _seed(make_session, {"a.txt": b"alpha", "b.txt": b"bravo"})
    s = make_session()
    work = s.open(P, "admin", STAGE)
    ref = tmp_path / "ref"
    ref.touch()
    subprocess.run(["touch", "-r", str(work / "a.txt"), str(ref)], check=True)
    (work / "a.txt").write_bytes(b"ALPHA")
    subprocess.run(["touch", "-r", str(ref), str(work / "a.txt")], check=True)
    report = s.close()
    assert ["a.txt"] == report.uploaded
    assert {"a.txt": b"ALPHA", "b.txt": b"bravo"} == _committed(store)


@pytest.mark.parametrize("watch", [True, False], ids=["watching", "close-scan-only"])
def test_tar_x_of_a_reproducible_archive_over_the_tree_commits_every_file(
    make_session: MakeSession, store: ObjectStore, tmp_path: Path, watch: bool
) -> None:
    """Extracting an archive with the same sizes and mtimes over a cached copy sends all 40."""
    names = [f"dir{i % 4}/part{i:02d}.step" for i in range(40)]
    stamp = 1_700_000_000
    seed = make_session("seed")
    work = seed.open(P, "seeder", STAGE, watch=False)
    _write(work, {n: b"old-%02d" % i for i, n in enumerate(names)})
    for n in names:
        os.utime(work / n, (stamp, stamp))
    seed.close()
    s = make_session("seed")  # same machine: the closed copy comes back from the cache
    work = s.open(P, "admin", STAGE, watch=watch)
    assert all((work / n).stat().st_mtime_ns == stamp * 10**9 for n in names)
    archive = tmp_path / "release.tar"
    with tarfile.open(archive, "w") as tar:
        for i, n in enumerate(names):
            data = b"new-%02d" % i
            info = tarfile.TarInfo(n)
            info.size, info.mtime = len(data), stamp
            tar.addfile(info, io.BytesIO(data))
    subprocess.run(["tar", "xf", str(archive), "-C", str(work)], check=True)
    assert all((work / n).stat().st_mtime_ns == stamp * 10**9 for n in names)
    report = s.close()
    assert sorted(names) == report.uploaded
    assert {n: b"new-%02d" % i for i, n in enumerate(names)} == _committed(store)


def test_a_touched_file_with_the_same_bytes_is_not_uploaded(
    make_session: MakeSession, store: ObjectStore
) -> None:
    """A new stat tuple with unchanged content is hashed, not sent."""
    _seed(make_session, {"a.txt": b"alpha"})
    s = make_session()
    work = s.open(P, "admin", STAGE)
    shutil.copy2(work / "a.txt", work / "a.copy")
    os.replace(work / "a.copy", work / "a.txt")
    assert s.flush(timeout=DEADLINE)
    assert 0 == s.status()["uploads"]
    assert [] == s.close().uploaded


# ------------------------------------------------------------ folder operations

FOLDER_FILES = 50
MAX_UPLOADS_PER_FILE = 1.2


def _source_tree(root: Path) -> dict[str, bytes]:
    files = {
        f"pkg/sub{i % 5}/file{i:03d}.txt": (b"%03d " % i) * (200 + 37 * i)
        for i in range(FOLDER_FILES)
    }
    _write(root, files)
    return files


def _count_uploads(store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    sent: list[str] = []
    real = store.upload_file

    def counting(key: str, path: Path, **kw: Any) -> Any:
        result = real(key, path, **kw)  # a 412 (content already there) sends no body
        sent.append(key)
        return result

    monkeypatch.setattr(store, "upload_file", counting)
    return sent


def _copy_with_zip(src: Path, dest: Path, tmp: Path) -> None:
    archive = shutil.make_archive(str(tmp / "tree"), "zip", src)
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(dest)  # noqa: S202 - our own archive, built just above


def _clone_with_git(src: Path, dest: Path, _tmp: Path) -> None:
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    ident = ["-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run(["git", "init", "-q", str(src)], check=True, env=env)
    subprocess.run(["git", "-C", str(src), "add", "-A"], check=True, env=env)
    subprocess.run(["git", *ident, "-C", str(src), "commit", "-q", "-m", "x"], check=True, env=env)
    subprocess.run(["git", "clone", "-q", str(src), str(dest / "repo")], check=True, env=env)


FOLDER_OPS: dict[str, Callable[[Path, Path, Path], object]] = {
    "cp -r": lambda src, dest, _tmp: subprocess.run(
        ["cp", "-r", str(src / "pkg"), str(dest)], check=True
    ),
    "mv": lambda src, dest, _tmp: subprocess.run(["mv", str(src / "pkg"), str(dest)], check=True),
    "unzip": _copy_with_zip,
    "git clone": _clone_with_git,
}


@pytest.mark.parametrize("op", sorted(FOLDER_OPS))
def test_a_folder_operation_uploads_each_file_about_once(
    make_session: MakeSession,
    store: ObjectStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    op: str,
) -> None:
    """cp -r, mv, unzip and git clone of 50 files: at most 1.2 uploads per file reach staging."""
    if op == "git clone" and shutil.which("git") is None:
        pytest.skip("git is not installed")
    src = tmp_path / "src"
    _source_tree(src)
    s = make_session()
    work = s.open(P, "admin", STAGE)
    sent = _count_uploads(store, monkeypatch)
    try:
        FOLDER_OPS[op](src, work, tmp_path)
        expected = {
            hashlib.sha256(p.read_bytes()).hexdigest()
            for p in work.rglob("*")
            if p.is_file() and ".git" not in p.parts
        }
        assert len(expected) >= FOLDER_FILES

        def staged() -> set[str]:
            return {k.rsplit("/", 1)[1] for k in list(sent)}

        assert wait_for(lambda: expected <= staged(), DEADLINE)
        assert s.flush(timeout=DEADLINE)
        data_uploads = [k for k in sent if k.rsplit("/", 1)[1] in expected]
        assert len(data_uploads) <= MAX_UPLOADS_PER_FILE * len(expected), (
            f"{len(data_uploads)} uploads for {len(expected)} files"
        )
    finally:
        s.abort()


# ------------------------------------------------------- other tools' temp files

_GIT_ENV = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}


def _leftover(pattern: str, folder: Path, proc: subprocess.Popen[bytes]) -> Path:
    """The temp file ``proc`` is writing (``pattern`` in ``folder``), once it holds bytes;
    then ``proc`` (and its children) is killed -9, so the file stays, as after a crash."""

    def written() -> Path | None:
        found = [p for p in folder.glob(pattern) if p.stat().st_size > 0]
        return found[0] if found else None

    try:
        assert wait_for(lambda: written() is not None, DEADLINE), f"no {pattern} in {folder}"
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
        if proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
    found = written()
    assert found is not None
    return found


def test_temp_files_of_git_rsync_and_libreoffice_never_reach_the_store(
    make_session: MakeSession, store: ObjectStore, tmp_path: Path
) -> None:
    """A real git clone, an index-pack and an rsync cut by kill -9 (their temp files stay),
    a LibreOffice lock file: the clone is committed, none of the temp files' bytes is in
    the bucket nor any of their names in the manifest."""
    if shutil.which("git") is None or shutil.which("rsync") is None:
        pytest.skip("git and rsync are needed")
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.step").write_bytes(os.urandom(300_000))
    ident = ["-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run(["git", "init", "-q", str(src)], check=True, env=_GIT_ENV)
    subprocess.run(["git", "-C", str(src), "add", "-A"], check=True, env=_GIT_ENV)
    subprocess.run(
        ["git", *ident, "-C", str(src), "commit", "-q", "-m", "x"], check=True, env=_GIT_ENV
    )
    pack = subprocess.run(
        ["git", "-C", str(src), "pack-objects", "--stdout", "--revs"],
        input=b"HEAD\n",
        capture_output=True,
        check=True,
        env=_GIT_ENV,
    ).stdout
    (tmp_path / "big.dwg").write_bytes(os.urandom(20_000_000))
    s = make_session()
    work = s.open(P, "admin", STAGE)
    try:
        repo = work / "repo"
        subprocess.run(
            ["git", "clone", "-q", "--no-local", str(src), str(repo)], check=True, env=_GIT_ENV
        )
        indexing = subprocess.Popen(
            ["git", "index-pack", "--stdin"],
            cwd=repo,
            stdin=subprocess.PIPE,
            env=_GIT_ENV,
            start_new_session=True,
        )
        assert indexing.stdin is not None
        indexing.stdin.write(pack[: len(pack) // 2])
        indexing.stdin.flush()
        tmp_pack = _leftover("tmp_pack_*", repo / ".git" / "objects" / "pack", indexing)
        syncing = subprocess.Popen(
            ["rsync", "--bwlimit=2000", str(tmp_path / "big.dwg"), f"{work}/"],
            start_new_session=True,
        )
        rsync_tmp = _leftover(".big.dwg.??????", work, syncing)
        lo_lock = work / ".~lock.plan.odt#"
        lo_lock.write_text(",admin,host,05.12.2026 18:00,file:///home/admin/.config/lo;")
        leftovers = {
            p.relative_to(work).as_posix(): p.read_bytes() for p in (tmp_pack, rsync_tmp, lo_lock)
        }
        assert s.flush(timeout=DEADLINE)
        s.close()
    finally:
        if not s.is_closed:
            s.abort()
    committed = _committed(store)
    assert committed["repo/model.step"] == (src / "model.step").read_bytes()
    assert any(rel.startswith("repo/.git/objects/pack/pack-") for rel in committed)
    assert not set(leftovers) & set(committed)
    bodies = {store.get(o.key).body for o in store.list("")}
    for rel, data in leftovers.items():
        assert data not in bodies, f"the bytes of {rel} reached the store"


# ---------------------------------------------------------------------- links

SECRET = b"outside the working folder"


def _decoy(tmp_path: Path) -> Path:
    decoy = tmp_path / "home" / "decoy"
    decoy.mkdir(parents=True)
    (decoy / "secret.txt").write_bytes(SECRET)
    (decoy / "plan.dwg").write_bytes(SECRET)
    return decoy


def _decoy_unchanged(decoy: Path) -> bool:
    return {"secret.txt": SECRET, "plan.dwg": SECRET} == {
        p.name: p.read_bytes() for p in decoy.iterdir()
    }


def _store_holds_secret(store: ObjectStore) -> bool:
    return any(store.get(o.key).body == SECRET for o in store.list(""))


@pytest.mark.parametrize("watch", [True, False], ids=["watching", "close-scan-only"])
def test_a_folder_swapped_for_a_link_mid_session_uploads_nothing_from_outside(
    make_session: MakeSession, store: ObjectStore, tmp_path: Path, watch: bool
) -> None:
    """A subfolder replaced by a link to an outside folder: nothing of it is read or sent."""
    _seed(make_session, {"sub/a.txt": b"a", **{f"f{i}.txt": b"f" for i in range(4)}})
    decoy = _decoy(tmp_path)
    s = make_session()
    work = s.open(P, "admin", STAGE, watch=watch)
    if watch:
        (work / "sub" / "b.txt").write_bytes(b"b")
        assert s.flush(timeout=DEADLINE)
    shutil.rmtree(work / "sub")
    (work / "sub").symlink_to(decoy, target_is_directory=True)
    assert s.flush(timeout=DEADLINE)
    report = s.close()
    assert "sub/secret.txt" not in report.uploaded
    assert not _store_holds_secret(store)
    assert {f"f{i}.txt" for i in range(4)} == set(_committed(store))
    assert _decoy_unchanged(decoy)


def test_a_working_folder_that_is_a_link_is_refused(
    make_session: MakeSession, store: ObjectStore, tmp_path: Path
) -> None:
    """A link pre-placed at the work path makes open fail clearly; nothing lands outside."""
    _seed(make_session, {"plan.dwg": b"committed"})
    decoy = _decoy(tmp_path)
    s = make_session()
    work = s.config.paths.work_root / P / STAGE
    work.parent.mkdir(parents=True)
    empty = tmp_path / "home" / "empty"
    empty.mkdir()
    work.symlink_to(empty, target_is_directory=True)
    with pytest.raises(LocalFileError, match="link"):
        s.open(P, "admin", STAGE)
    assert [] == list(empty.iterdir())
    assert _decoy_unchanged(decoy)
    other = make_session("m2")  # the lock was released
    other.open(P, "bob", STAGE, watch=False)
    other.abort()


def test_a_link_in_a_closed_copy_is_never_written_through_at_the_next_open(
    make_session: MakeSession, store: ObjectStore, tmp_path: Path
) -> None:
    """A link left in the closed copy is kept aside, and a co-worker's commit lands inside."""
    _seed(make_session, {"a.txt": b"a"})
    decoy = _decoy(tmp_path)
    s = make_session()
    work = s.open(P, "admin", STAGE, watch=False)
    (work / "docs").symlink_to(decoy, target_is_directory=True)
    s.close()
    coworker = make_session("m2")
    w2 = coworker.open(P, "bob", STAGE, watch=False)
    (w2 / "docs").mkdir()
    (w2 / "docs" / "plan.dwg").write_bytes(b"bob's plan")
    (w2 / "docs" / "new.txt").write_bytes(b"bob's note")
    coworker.close()
    again = make_session()
    work = again.open(P, "admin", STAGE, watch=False)
    assert not (work / "docs").is_symlink()
    assert b"bob's plan" == (work / "docs" / "plan.dwg").read_bytes()
    assert _decoy_unchanged(decoy)
    assert [] == again.close().uploaded
    assert _decoy_unchanged(decoy)
    kept = list((s.config.paths.work_root / P).glob(f"{STAGE}.kept-*/docs"))
    assert kept and kept[0].is_symlink()


def test_a_crash_backup_never_copies_a_linked_files_target(
    make_session: MakeSession, tmp_path: Path
) -> None:
    """A pending file replaced by a link before the crash is not backed up through the link."""
    decoy = _decoy(tmp_path)
    s = make_session()
    work = s.open(P, "admin", STAGE, watch=False)
    (work / "draft.txt").write_bytes(b"draft")
    (work / "sub").mkdir()
    (work / "sub" / "plan.dwg").write_bytes(b"plan")
    assert s._journal is not None
    s._journal.record("draft.txt", "put")
    s._journal.record("sub/plan.dwg", "put")
    (work / "draft.txt").unlink()
    (work / "draft.txt").symlink_to(decoy / "secret.txt")
    shutil.rmtree(work / "sub")
    (work / "sub").symlink_to(decoy, target_is_directory=True)
    s.emergency_save("test")
    backup = s.config.paths.recovery_root / s.record.session_id / "files"  # type: ignore[union-attr]
    copied = [p for p in backup.rglob("*") if p.is_file()] if backup.exists() else []
    assert all(p.read_bytes() != SECRET for p in copied)
    assert _decoy_unchanged(decoy)
    resumed = make_session()
    resumed.discard(confirm_loss=True)
    assert _decoy_unchanged(decoy)


# ---------------------------------------------------------------------- names

ODD_NAMES = {b"back\\slash.txt": b"one", b"bell\x07.txt": b"two", b"latin1-\xe9t\xe9.txt": b"three"}


def _write_odd_names(work: Path) -> None:
    for name, data in ODD_NAMES.items():
        (work / os.fsdecode(name)).write_bytes(data)  # not UTF-8: a surrogate-escaped str


def _odd_names_in(folder: Path) -> dict[bytes, bytes]:
    return {
        os.fsencode(p.name): p.read_bytes()
        for p in folder.iterdir()
        if os.fsencode(p.name) in ODD_NAMES
    }


def test_a_name_the_store_cannot_hold_is_reported_refused_and_never_deleted(
    make_session: MakeSession, store: ObjectStore
) -> None:
    """Status lists odd names, close refuses, --skip-unsupported commits the rest and keeps them."""
    _seed(make_session, {"a.txt": b"a"})
    s = make_session()
    work = s.open(P, "admin", STAGE)
    (work / "b.txt").write_bytes(b"b")
    _write_odd_names(work)
    assert wait_for(lambda: 3 == len(s.status()["unsupported"]), DEADLINE)  # type: ignore[arg-type]
    assert "latin1-\\xe9t\\xe9.txt" in s.status()["unsupported"]  # type: ignore[operator]
    with pytest.raises(LocalFileError, match="cannot hold") as info:
        s.close()
    assert 11 == info.value.exit_code
    assert "back\\slash.txt" in str(info.value)
    assert ODD_NAMES == _odd_names_in(work)
    assert {"a.txt": b"a"} == _committed(store), "nothing committed"
    report = s.close(skip_unsupported=True)
    assert ["b.txt"] == report.uploaded
    assert 3 == len(report.not_synchronised) == len(report.kept_aside)
    assert {"a.txt": b"a", "b.txt": b"b"} == _committed(store)
    [kept] = (s.config.paths.work_root / P).glob(f"{STAGE}.kept-*")
    assert ODD_NAMES == _odd_names_in(kept)
    again = make_session()
    work = again.open(P, "admin", STAGE, watch=False)
    assert {} == _odd_names_in(work)
    _write_odd_names(work)
    again.abort()
    assert ODD_NAMES == _odd_names_in(kept)
    assert len(list((s.config.paths.work_root / P).glob(f"{STAGE}.kept-*"))) in (1, 2)


def test_a_bucket_key_too_long_for_the_file_system_is_a_clear_error(
    make_session: MakeSession, store: ObjectStore
) -> None:
    """A committed path with a 300-byte name refuses open naming the key (exit 3), lock freed."""
    long_name = "x" * 300 + ".dwg"
    manifest = Manifest(files={long_name: ManifestEntry(size=1, sha256="0" * 64, etag="e")})
    store.put_bytes(KEYS.manifest, manifest.to_bytes(), if_none_match=True)
    s = make_session()
    with pytest.raises(InvalidNameError, match="cannot be a local file") as info:
        s.open(P, "admin", STAGE)
    assert 3 == info.value.exit_code
    assert KEYS.committed(long_name)[:40] in str(info.value)
    other = make_session("m2")
    with pytest.raises(InvalidNameError):
        other.open(P, "bob", STAGE)  # the lock was released: refused for the name again


def test_a_folder_marker_key_is_ignored(s3_store: ObjectStore, tmp_path: Path) -> None:
    """A ``docs/`` marker object (made by S3 consoles) does not stop the stage from opening."""
    s3_store.put_bytes(KEYS.committed_prefix + "docs/", b"")
    s3_store.put_bytes(KEYS.committed("docs/a.txt"), b"a")
    config = load_config(
        paths={"base_dir": str(tmp_path / "m")},
        lock={"heartbeat_interval": 3600, "stale_after": 7200},
    )
    s = PlantDesignSession(config, store=s3_store)
    work = s.open(P, "admin", STAGE, watch=False)
    assert b"a" == (work / "docs" / "a.txt").read_bytes()
    s.abort()


# ------------------------------------------------------------ executable bits


def _is_executable(path: Path) -> bool:
    return bool(path.stat().st_mode & 0o100)


@pytest.mark.parametrize("watch", [True, False], ids=["watching", "close-scan-only"])
def test_the_executable_bit_survives_a_round_trip_and_a_chmod_alone_is_committed(
    make_session: MakeSession, watch: bool
) -> None:
    """run.sh comes back executable on another machine; a later chmod -x alone is committed."""
    alice = make_session("alice")
    work = alice.open(P, "alice", STAGE, watch=watch)
    _write(work, {"run.sh": b"#!/bin/sh\necho hi\n", "data.txt": b"data"})
    (work / "run.sh").chmod(0o755)
    if watch:
        assert alice.flush(timeout=DEADLINE)
    alice.close()

    bob = make_session("bob")
    seen = bob.open(P, "bob", STAGE, watch=watch)
    assert (_is_executable(seen / "run.sh"), _is_executable(seen / "data.txt")) == (True, False)
    (seen / "run.sh").chmod(0o644)  # the bytes stay the same: only the mode changes
    if watch:
        assert bob.flush(timeout=DEADLINE)
    bob.close()

    carol = make_session("carol")
    again = carol.open(P, "carol", STAGE, watch=False)
    assert not _is_executable(again / "run.sh")
    assert (again / "run.sh").read_bytes() == b"#!/bin/sh\necho hi\n"
    carol.abort()


def test_reopening_a_cached_copy_restores_the_committed_executable_bit(
    make_session: MakeSession,
) -> None:
    """A kept (cached) file whose mode differs from the manifest gets the manifest's mode."""
    alice = make_session("alice")
    work = alice.open(P, "alice", STAGE, watch=False)
    _write(work, {"run.sh": b"#!/bin/sh\n"})
    (work / "run.sh").chmod(0o755)
    alice.close()  # the closed copy goes to alice's cache, executable
    bob = make_session("bob")
    theirs = bob.open(P, "bob", STAGE, watch=False)
    (theirs / "run.sh").chmod(0o644)
    bob.close()
    alice_again = make_session("alice")
    again = alice_again.open(P, "alice", STAGE, watch=False)
    try:
        assert not _is_executable(again / "run.sh")
    finally:
        alice_again.abort()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_a_git_repository_round_trips_with_its_modes_and_passes_fsck(
    make_session: MakeSession, tmp_path: Path
) -> None:
    """git status is clean after a round trip, except the link the README says is not kept."""
    repo = tmp_path / "repo"
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    subprocess.run(["git", "init", "-q", str(repo)], check=True, env=env)
    _write(repo, {"run.sh": b"#!/bin/sh\n", "notes/a.txt": b"a"})
    (repo / "run.sh").chmod(0o755)
    (repo / "link.txt").symlink_to("notes/a.txt")
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True, env=env)
    subprocess.run(["git", "-C", str(repo), "commit", "-qm", "c"], check=True, env=env)

    alice = make_session("alice")
    work = alice.open(P, "alice", STAGE, watch=False)
    shutil.copytree(repo, work / "repo", symlinks=True)
    report = alice.close()
    assert "repo/link.txt" in report.kept_aside  # the link was set aside, and said so

    bob = make_session("bob")
    seen = bob.open(P, "bob", STAGE, watch=False) / "repo"
    try:
        fsck = subprocess.run(
            ["git", "-C", str(seen), "fsck"], check=False, capture_output=True, env=env
        )
        assert fsck.returncode == 0, fsck.stderr
        status = subprocess.run(
            ["git", "-C", str(seen), "status", "--porcelain"],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        assert status.stdout.splitlines() == [" D link.txt"]
    finally:
        bob.abort()


# ------------------------------------------------------------------ name case


@pytest.mark.parametrize("watch", [True, False], ids=["watching", "close-scan-only"])
def test_a_case_only_rename_commits_one_file_under_the_new_name(
    make_session: MakeSession, store: ObjectStore, watch: bool
) -> None:
    """A.dwg -> a.dwg: the stage holds a.dwg alone, with the bytes, never two files or none."""
    _seed(make_session, {"A.dwg": b"drawing", "other.txt": b"o"})
    alice = make_session("alice")
    work = alice.open(P, "alice", STAGE, watch=watch)
    (work / "A.dwg").rename(work / "a.dwg")
    if watch:
        assert alice.flush(timeout=DEADLINE)
    alice.close()
    assert _committed(store) == {"a.dwg": b"drawing", "other.txt": b"o"}


def test_keys_differing_only_in_case_open_as_two_files_on_a_case_sensitive_folder(
    make_session: MakeSession, store: ObjectStore
) -> None:
    """Where the file system keeps case apart, both keys come down and close keeps both."""
    _seed(make_session, {"Plan.dwg": b"upper", "plan.dwg": b"lower"})
    alice = make_session("alice")
    work = alice.open(P, "alice", STAGE, watch=False)
    assert {p.name: p.read_bytes() for p in work.iterdir()} == {
        "Plan.dwg": b"upper",
        "plan.dwg": b"lower",
    }
    alice.close()
    assert _committed(store) == {"Plan.dwg": b"upper", "plan.dwg": b"lower"}


def test_rsyncs_temp_file_renamed_into_place_leaves_no_error_and_no_stray_key(
    make_session: MakeSession, store: ObjectStore
) -> None:
    """rsync writes ``.name.XXXXXX`` and renames it over ``name``: only ``name`` is committed."""
    alice = make_session("alice")
    work = alice.open(P, "alice", STAGE)
    for i in range(20):
        temp = work / f".file{i}.txt.Ab{i:04d}"
        temp.write_bytes(b"x" * (i + 1) * 1000)
        temp.rename(work / f"file{i}.txt")
    assert alice.flush(timeout=DEADLINE)
    status = alice.status()
    assert (status.get("last_error"), status.get("error")) == (None, None), status
    alice.close()
    assert _committed(store) == {f"file{i}.txt": b"x" * (i + 1) * 1000 for i in range(20)}
