"""Loading and validating the configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No AGENT_* variable from the machine leaks into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("AGENT_"):
            monkeypatch.delenv(name)


def test_defaults_use_the_embedded_folder_store(tmp_path: Path) -> None:
    """With no file, the store is a folder under base_dir and transfers use 10 workers."""
    config = load_config(paths={"base_dir": str(tmp_path)})
    loc = config.store_location()
    assert "file" == loc.scheme
    assert tmp_path / "store" == loc.path
    assert 10 == config.transfer.workers
    assert 12 * 3600 == config.lock.ttl
    assert 600 == config.lock.stale_after


def test_example_file_loads_and_means_what_it_says() -> None:
    """config/agent.example.toml is valid and its durations and sizes parse."""
    config = load_config(ROOT / "config" / "agent.example.toml")
    loc = config.store_location()
    assert ("s3", "plant-projects", "projects") == (loc.scheme, loc.bucket, loc.prefix)
    assert 16 * 1024**2 == config.transfer.multipart_threshold
    assert 0.2 == config.retry.initial_backoff
    assert ("*.bak",) == config.watch.extra_ignore


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AGENT_<SECTION>__<KEY> beats the TOML file."""
    file = tmp_path / "a.toml"
    file.write_text('[transfer]\nworkers = 4\n[store]\nurl = "s3://b1/p"\n')
    monkeypatch.setenv("AGENT_TRANSFER__WORKERS", "7")
    monkeypatch.setenv("AGENT_CONFIG", str(file))
    config = load_config()
    assert 7 == config.transfer.workers
    assert "b1" == config.store_location().bucket


def test_bad_value_names_the_key_and_the_env_variable(tmp_path: Path) -> None:
    """A wrong value is a ConfigError naming the key, what was given and the env name."""
    file = tmp_path / "bad.toml"
    file.write_text('[lock]\nttl = "twelve hours"\n')
    with pytest.raises(ConfigError) as info:
        load_config(file)
    text = str(info.value)
    assert "lock.ttl" in text
    assert "AGENT_LOCK__TTL" in text
    assert "'12h'" in text


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    """A misspelt key is an error, not silently ignored."""
    file = tmp_path / "typo.toml"
    file.write_text("[transfer]\nworker = 3\n")
    with pytest.raises(ConfigError, match=r"transfer\.worker"):
        load_config(file)


def test_missing_file_and_bad_toml_are_clear(tmp_path: Path) -> None:
    """A missing file or broken TOML says which file and what to do."""
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[store\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


@pytest.mark.parametrize(
    ("url", "message"),
    [("ftp://x/y", "scheme 'ftp'"), ("s3:///prefix", "names no bucket")],
)
def test_bad_store_url_is_refused(url: str, message: str) -> None:
    """Only s3:// with a bucket and file:// are accepted."""
    with pytest.raises(ConfigError, match=message):
        load_config(store={"url": url})


def test_file_url_with_windows_drive_parses() -> None:
    """file:///C:/data maps to C:/data."""
    config = load_config(store={"url": "file:///C:/data"})
    assert Path("C:/data") == config.store_location().path


@pytest.mark.parametrize(
    ("heartbeat", "stale", "ttl"),
    [("10m", "5m", "12h"), ("1m", "13h", "12h"), ("1m", "12h", "12h")],
)
def test_lock_timings_out_of_order_are_refused_naming_all_three(
    heartbeat: str, stale: str, ttl: str, tmp_path: Path
) -> None:
    """heartbeat_interval < stale_after < ttl, or a renewed lock would look gone or expire."""
    with pytest.raises(ConfigError, match="heartbeat_interval < stale_after < ttl"):
        load_config(
            paths={"base_dir": str(tmp_path)},
            lock={"heartbeat_interval": heartbeat, "stale_after": stale, "ttl": ttl},
        )


def test_sizes_take_units_through_pydantic_bytesize(tmp_path: Path) -> None:
    """'16 MiB', '2GB' and plain integers all become byte counts."""
    config = load_config(
        paths={"base_dir": str(tmp_path)},
        transfer={"multipart_threshold": "16 MiB", "cache_max_bytes": "2GB"},
    )
    assert 16 * 1024**2 == config.transfer.multipart_threshold
    assert 2_000_000_000 == config.transfer.cache_max_bytes


def test_code_overrides_merge_into_the_files_sections_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[lock]\nttl = "10h"\n[store]\nread_timeout = 12\n', encoding="utf-8")
    monkeypatch.setenv("AGENT_STORE__READ_TIMEOUT", "7")
    config = load_config(path, lock={"heartbeat_interval": 30, "stale_after": 90})
    # The file's ttl survives the code override of the same section ...
    assert (config.lock.ttl, config.lock.stale_after, config.lock.heartbeat_interval) == (
        36000.0,
        90.0,
        30.0,
    )
    # ... and the environment beats the file.
    assert config.store.read_timeout == 7.0
