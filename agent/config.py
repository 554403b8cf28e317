"""Configuration department: the only module that reads config files or the environment.

Sources, highest priority first:

1. ``AGENT_<SECTION>__<KEY>`` environment variables (``AGENT_STORE__URL=s3://bucket/prefix``);
2. the TOML file named by ``--config`` or ``AGENT_CONFIG`` (see ``config/agent.example.toml``);
3. the defaults below, which run on the embedded folder store with no credentials.

Every model is frozen; callers hand each module only its own section.
Credentials are never part of the config: boto3's usual chain (``AWS_*``
variables, profiles) provides them, and nothing here logs them.
"""

from __future__ import annotations

import os
import re
import tempfile
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlparse

import platformdirs
from pydantic import (
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from agent.errors import ConfigError

__all__ = [
    "AgentConfig",
    "HistoryConfig",
    "LockConfig",
    "LogConfig",
    "PathsConfig",
    "RecoveryConfig",
    "RetryConfig",
    "StoreConfig",
    "StoreLocation",
    "TransferConfig",
    "WatchConfig",
    "default_user",
    "env_flag",
    "load_config",
]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def _parse_duration(value: object) -> object:
    """Accept seconds as a number or strings such as ``"12h"``, ``"10m"``, ``"500ms"``."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError("a duration like 30, '30s', '10m', '12h' or '500ms'")
        return float(match.group(1)) * _UNIT_SECONDS[match.group(2) or "s"]
    return value


Seconds = Annotated[float, BeforeValidator(_parse_duration), Field(gt=0)]
# Sizes as a number of bytes or with a unit ("8MiB", "2 GiB", "500kB"): pydantic's ByteSize.
Bytes = Annotated[ByteSize, Field(ge=0)]

# The TOML file of the config being built: set by ``load_config`` for the duration of
# one ``AgentConfig(...)`` call, read by pydantic-settings' TOML source below.
_TOML_FILE: ContextVar[Path | None] = ContextVar("agent_config_toml_file", default=None)


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StoreLocation(_Section):
    """A parsed ``[store] url``."""

    scheme: Literal["s3", "file"]
    bucket: str = ""
    prefix: str = ""
    path: Path | None = None


class StoreConfig(_Section):
    """Where the projects live. ``url`` empty means the embedded folder store."""

    url: str = ""
    endpoint_url: str | None = None
    region: str = "auto"
    profile: str | None = None
    addressing_style: Literal["path", "virtual", "auto"] = "path"
    connect_timeout: Seconds = 5.0
    # SeaweedFS answers a contended conditional PUT's losers only after ~5 s.
    read_timeout: Seconds = 30.0
    verify_tls: bool = True
    # Keys per listing request (S3's maximum is 1000); smaller only to test paging.
    list_page_size: int = Field(default=1000, ge=1, le=1000)
    # A listing is bucket input (issue 19): it ends with an error (exit 8) after this
    # many pages (2,000 pages of 1,000 keys: two million objects under one prefix) or
    # when it has taken this long overall, however slowly the store sends it.
    list_max_pages: int = Field(default=2000, ge=1)
    list_deadline: Seconds = 900.0
    # The most a manifest, a commit intent or a history entry may be (read whole,
    # parsed in memory): 64 MiB holds a manifest of about 300,000 files.
    max_manifest_bytes: Bytes = ByteSize(64 * 1024**2)

    def location(self, base_dir: Path) -> StoreLocation:
        """Parse ``url``; the empty default is ``file://<base_dir>/store``."""
        if not self.url:
            return StoreLocation(scheme="file", path=base_dir / "store")
        parsed = urlparse(self.url)
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise ConfigError(
                    f"store.url {self.url!r} names no bucket: use s3://BUCKET or s3://BUCKET/PREFIX"
                )
            return StoreLocation(scheme="s3", bucket=parsed.netloc, prefix=parsed.path.strip("/"))
        if parsed.scheme == "file":
            raw = unquote(parsed.path)
            if parsed.netloc and parsed.netloc != "localhost":
                raw = f"//{parsed.netloc}{raw}"  # UNC share on Windows
            if re.match(r"^/[A-Za-z]:", raw):
                raw = raw[1:]  # file:///C:/data -> C:/data
            return StoreLocation(scheme="file", path=Path(raw))
        raise ConfigError(
            f"store.url {self.url!r} has scheme {parsed.scheme!r}: "
            "use s3://BUCKET/PREFIX (R2, S3, MinIO, SeaweedFS) or file:///FOLDER"
        )


class TransferConfig(_Section):
    """Parallel transfers and the local cache of committed files."""

    workers: int = Field(default=10, ge=1, le=256)
    multipart_threshold: Bytes = ByteSize(16 * 1024**2)
    multipart_chunksize: Bytes = Field(default=ByteSize(8 * 1024**2), ge=5 * 1024**2)
    # Server-side copies above this go as parallel UploadPartCopy parts of
    # ``copy_chunksize`` (CopyObject stops at 5 GiB, and one long copy can
    # outlast a WAN's idle timeout).
    copy_limit: Bytes = ByteSize(1024**3)
    copy_chunksize: Bytes = Field(default=ByteSize(128 * 1024**2), ge=5 * 1024**2)
    # Requests in flight for transfers, process-wide (R2 answers a wide fan-out with
    # 5xx and bucket-wide throttling); each file's parallel parts come out of it.
    max_requests: int = Field(default=32, ge=1, le=1024)
    cache_enabled: bool = True
    cache_max_bytes: Bytes = ByteSize(2 * 1024**3)
    # How long close waits for pending uploads before giving up (keeping the lock).
    close_timeout: Seconds = 600.0


class RetryConfig(_Section):
    """Retries of transient store errors: exponential backoff with jitter."""

    attempts: int = Field(default=6, ge=1, le=100)
    initial_backoff: Seconds = 0.2
    max_backoff: Seconds = 10.0
    jitter: float = Field(default=0.5, ge=0)


class LockConfig(_Section):
    """The stage lock: expiry, staleness and heartbeat."""

    ttl: Seconds = 12 * 3600.0
    stale_after: Seconds = 600.0
    heartbeat_interval: Seconds = 60.0
    # R2 takes about one write a second to one key and answers more with 429: the
    # lock keeper spaces its writes of the lock key at least this far apart.
    write_gap: Annotated[float, BeforeValidator(_parse_duration), Field(ge=0)] = 1.0

    @model_validator(mode="after")
    def _ordered(self) -> LockConfig:
        """``heartbeat_interval < stale_after < ttl``, or a held lock looks gone or expires."""
        if not self.heartbeat_interval < self.stale_after < self.ttl:
            raise ValueError(
                "lock timings must satisfy heartbeat_interval < stale_after < ttl (got "
                f"{self.heartbeat_interval:g} s, {self.stale_after:g} s, {self.ttl:g} s): "
                "otherwise a lock that is being renewed looks abandoned, or expires"
            )
        return self


DEFAULT_IGNORE = (
    "~$*",
    "~WRL*.tmp",
    ".~lock.*#",
    "*.tmp",
    "*.swp",
    "*.swx",
    "*.swo",
    "*~",
    ".DS_Store",
    "Thumbs.db",
    "desktop.ini",
    ".pdagent.*",
    # git's temp files (issue 20): packs, indexes and objects being written, and its
    # ``*.lock`` files (a new index or ref before the rename), in any repository.
    "*.git/*objects/*tmp_*",
    "*.git/*.lock",
    # rsync writes ``.<name>.XXXXXX`` beside the target (six letters or digits, no dot),
    # and keeps partial files in ``.rsync-partial/`` (``.~tmp~/`` is ``*~`` above).
    ".?*.[a-z0-9][a-z0-9][a-z0-9][a-z0-9][a-z0-9][a-z0-9]",
    ".rsync-partial",
)


class WatchConfig(_Section):
    """The watcher: debounce, per-path spacing, ignore rules, reconciliation."""

    debounce: Seconds = 0.3
    max_delay: Seconds = 2.0
    min_interval_per_path: Seconds = 1.0
    rescan_interval: Seconds = 600.0
    max_watches: int = Field(default=0, ge=0)
    """At most this many folder watches (inotify) per session; 0: only the system's
    limit (``fs.inotify.max_user_watches``). A folder that cannot get its watch, for
    this cap or any other reason, makes the session poll from then on."""
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    extra_ignore: tuple[str, ...] = ()


class PathsConfig(_Section):
    """Folders the agent may write to. Everything lives under ``base_dir``."""

    base_dir: Path = Field(
        default_factory=lambda: Path(
            platformdirs.user_data_dir("pd-session-agent", appauthor=False)
        )
    )

    runtime_dir: Path | None = None
    """Where the background agents' control sockets live (0700). Default:
    ``$XDG_RUNTIME_DIR/pd-session-agent``, else ``<tmp>/pd-session-agent-<uid>``."""

    @property
    def control_dir(self) -> Path:
        """The owner-only folder of the control sockets (short, so a socket path fits)."""
        if self.runtime_dir is not None:
            return self.runtime_dir
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        if xdg and Path(xdg).is_dir():
            return Path(xdg) / "pd-session-agent"
        uid = os.geteuid() if hasattr(os, "geteuid") else 0
        return Path(tempfile.gettempdir()) / f"pd-session-agent-{uid}"

    @property
    def work_root(self) -> Path:
        """Working copies: ``.app_temp/plant_design/<projekt>/<stage>``."""
        return self.base_dir / ".app_temp" / "plant_design"

    @property
    def recovery_root(self) -> Path:
        """Emergency backups after a crash."""
        return self.base_dir / "persistent_data" / "plant_design" / "recovery"

    @property
    def state_dir(self) -> Path:
        """Session records, journals, logs, the agents' tokens: owner-only (issue 9)."""
        return self.base_dir / "state"

    @property
    def cache_dir(self) -> Path:
        """Content-addressed cache of committed files; safe to delete."""
        return self.base_dir / "cache"


class HistoryConfig(_Section):
    """Version history: which commits (and the file versions they need) are kept.

    A commit is pruned only when it is older than ``keep_days`` *and* not among the
    newest ``keep_commits``; ``0`` for either means "no limit" on that count, so
    ``keep_days = 0`` or ``keep_commits = 0`` keeps everything. A replaced version
    younger than ``grace`` is never deleted (a commit may be copying it right now).
    """

    keep_days: float = Field(default=90, ge=0)
    keep_commits: int = Field(default=50, ge=0)
    grace: Seconds = 24 * 3600.0
    prune_on_close: bool = True


class RecoveryConfig(_Section):
    """Crash handling: how long the crash handler may take before the process exits."""

    crash_timeout: Seconds = 5.0


class LogConfig(_Section):
    """Logging: JSON lines to ``state/logs/<time>-<pid>.log``, readable lines on the console."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    console_level: Literal["debug", "info", "warning", "error"] = "warning"


class AgentConfig(BaseSettings):
    """The whole configuration, validated and frozen."""

    model_config = SettingsConfigDict(
        env_prefix="AGENT_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )

    store: StoreConfig = StoreConfig()
    transfer: TransferConfig = TransferConfig()
    retry: RetryConfig = RetryConfig()
    lock: LockConfig = LockConfig()
    watch: WatchConfig = WatchConfig()
    paths: PathsConfig = Field(default_factory=PathsConfig)
    recovery: RecoveryConfig = RecoveryConfig()
    history: HistoryConfig = HistoryConfig()
    log: LogConfig = LogConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment over code overrides over the TOML file; each merged per section."""
        toml_file = _TOML_FILE.get()
        if toml_file is None:
            return (env_settings, init_settings)
        toml = TomlConfigSettingsSource(settings_cls, toml_file=toml_file, deep_merge=True)
        return (env_settings, init_settings, toml)

    def store_location(self) -> StoreLocation:
        """The parsed store URL (defaults to the embedded folder store)."""
        return self.store.location(self.paths.base_dir)


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        env = "AGENT_" + "__".join(str(p).upper() for p in err["loc"])
        given = err.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"  {key}: {err['msg']}{shown}  [file key {key} or env {env}]")
    return "\n".join(lines)


def load_config(path: Path | str | None = None, **overrides: Any) -> AgentConfig:
    """Load the config: ``path`` (or ``AGENT_CONFIG``), then env overrides.

    ``overrides`` are section dicts merged over the file (used by tests and callers
    that build a config in code). A missing file named explicitly is an error;
    no file at all means the defaults.
    """
    file_path = Path(path) if path else None
    if file_path is None and env_flag("AGENT_CONFIG"):
        file_path = Path(env_flag("AGENT_CONFIG") or "")
    source = "defaults and AGENT_* environment"
    if file_path is not None:
        source = f"{file_path} and AGENT_* environment"
        if not file_path.is_file():
            raise ConfigError(
                f"config file {file_path} does not exist: fix --config / AGENT_CONFIG, "
                "or start from config/agent.example.toml"
            )
    token = _TOML_FILE.set(file_path)
    try:
        config = AgentConfig(**overrides)
        config.store_location()  # reject a bad URL now, not at first use
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {file_path} is not valid TOML: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {file_path} cannot be read: {exc}") from exc
    finally:
        _TOML_FILE.reset(token)
    return config


def default_user() -> str:
    """The login name, used when ``--user`` is not given."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def env_flag(name: str) -> str | None:
    """Read one ``AGENT_*`` process variable that is not configuration (e.g. the agent id)."""
    return os.environ.get(name)
