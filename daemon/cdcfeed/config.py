"""Settings: one immutable object, built once at the edge (the CLI) and passed down.

Precedence, lowest first: defaults < TOML file < ``CDCFEED_<SECTION>__<KEY>`` environment
< command-line flags. The connection string is the first of these that is set: ``--dsn``,
``CDCFEED_DATABASE__DSN``, ``DATABASE_URL``, ``[database].dsn``; when none is, libpq's ``PG…``
variables name the server, and without those an embedded server is started. Every key is
documented in ``config/cdcfeed.toml``.

Only the environment handed to `load_settings` is read, never ``os.environ`` behind its back,
so a caller (a test, a bench) that passes its own mapping gets exactly that.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pwd
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from cdcfeed.config_kafka import KafkaSettings as KafkaSettings  # `[kafka]`, re-exported
from cdcfeed.dsn import parse_dsn, redact_dsn
from cdcfeed.errors import UserError
from cdcfeed.lifecycle import DEFAULT_MIX, Mix, parse_mix

ENV_PREFIX = "CDCFEED_"
DEFAULT_CONFIG_PATH = Path("/etc/cdcfeed/cdcfeed.toml")


def _identifier(value: str) -> str:
    # The server keeps the first 63 bytes of a name and drops the rest, so a longer one (or
    # a shorter one in multi-byte characters) would name another object than configured.
    # Quotes and any other characters are fine: every identifier is quoted where it is used.
    if not value:
        raise ValueError("a name cannot be empty")
    if "\x00" in value:
        raise ValueError("a name cannot contain a NUL character")
    if len(value.encode()) > 63:
        raise ValueError(
            f"{len(value.encode())} bytes is too long: PostgreSQL keeps 63 bytes of a name"
        )
    return value


Identifier = Annotated[str, AfterValidator(_identifier)]


def _mix(value: str) -> str:
    parse_mix(value)  # the error says what is wrong; the text is kept as given
    return value


# A note below ~2 KB stays in the row: it would not exercise TOAST at all.
MIN_TOAST_BYTES = 2048


def _toast_bytes(value: int) -> int:
    if 0 < value < MIN_TOAST_BYTES:
        raise ValueError(
            f"must be 0 (off) or at least {MIN_TOAST_BYTES}, so the note is stored out of line"
        )
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseSettings(_Section):
    dsn: SecretStr = SecretStr("")
    schema_name: Identifier = "public"
    orders_table: Identifier = "orders"
    batch_table: Identifier = "batch_control"
    connect_timeout: float = Field(10.0, gt=0)
    statement_timeout: float = Field(30.0, ge=0)
    connect_attempts: int = Field(5, ge=1, le=100)
    init_schema: bool = True
    sslmode: Literal["", "disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = ""
    sslrootcert: str = ""
    sslcert: str = ""
    sslkey: str = ""

    @field_validator("dsn")
    @classmethod
    def _dsn_is_a_uri(cls, value: SecretStr) -> SecretStr:
        raw = value.get_secret_value()
        if raw:
            parse_dsn(raw)
        return value


Rate = Annotated[float, Field(ge=0, le=100_000)]


class Step(_Section):
    rate: Rate
    seconds: float = Field(gt=0)


class LoadSettings(_Section):
    # The shape's base: the constant rate, the start of a ramp, the mean of a sine, the rate
    # between bursts. 0 is allowed where the shape has other rates (a ramp up, bursts only).
    rate: Rate = 1.0
    profile: Literal["constant", "ramp", "steps", "sine", "bursts"] = "constant"
    arrivals: Literal["even", "poisson"] = "even"
    batch_size: int = Field(100, ge=1, le=10_000_000)
    concurrency: int = Field(2, ge=1, le=256)
    max_batches: int = Field(0, ge=0)
    duration: float = Field(0.0, ge=0)
    seed: int | None = None
    ramp_to: Rate = 10.0
    ramp_seconds: float = Field(60.0, gt=0)
    steps: tuple[Step, ...] = ()
    steps_repeat: bool = False
    sine_amplitude: Rate = 0.0
    sine_period: float = Field(86_400.0, gt=0)
    burst_rate: Rate = 10.0
    burst_seconds: float = Field(10.0, gt=0)
    burst_every: float = Field(60.0, gt=0)
    mix: Annotated[str, AfterValidator(_mix)] = DEFAULT_MIX
    toast_bytes: Annotated[int, Field(ge=0, le=1 << 20), AfterValidator(_toast_bytes)] = 0

    @property
    def change_mix(self) -> Mix:
        return parse_mix(self.mix)

    @model_validator(mode="after")
    def _shape_has_arrivals(self) -> LoadSettings:
        """Each profile's own keys must make a shape that loads at all."""
        if self.profile == "constant" and self.rate <= 0:
            raise _bad("rate", "must be above 0 for the constant profile")
        if self.profile == "ramp" and self.rate <= 0 and self.ramp_to <= 0:
            raise _bad("ramp_to", "the ramp needs rate (its start) or ramp_to above 0")
        if self.profile == "steps" and not any(step.rate > 0 for step in self.steps):
            raise _bad(
                "steps",
                "the steps profile needs steps with a rate above 0, e.g. "
                "steps = [{rate = 10, seconds = 60}, {rate = 100, seconds = 60}]",
            )
        if self.profile == "sine" and self.rate <= 0:
            raise _bad("rate", "must be above 0: it is the sine's mean")
        if self.profile == "sine" and self.sine_amplitude > self.rate:
            raise _bad(
                "sine_amplitude",
                f"{self.sine_amplitude:g} is more than rate ({self.rate:g}), the sine's mean: "
                "the rate would go below 0",
            )
        if self.profile == "bursts" and self.burst_rate <= 0:
            raise _bad("burst_rate", "must be above 0 for the bursts profile")
        if self.profile == "bursts" and self.burst_seconds >= self.burst_every:
            raise _bad(
                "burst_seconds",
                f"{self.burst_seconds:g} must be shorter than burst_every ({self.burst_every:g})",
            )
        return self


def _bad(setting: str, message: str) -> PydanticCustomError:
    """A section check's error naming the key to fix (`_describe` puts it in the location)."""
    return PydanticCustomError(
        "cdcfeed_setting", "{message}", {"setting": setting, "message": message}
    )


class FeedSettings(_Section):
    dir: Path = Path("./feed_files")
    keep_files: int = Field(100, ge=0)
    max_bytes: int = Field(1 << 30, ge=0)
    min_free_bytes: int = Field(100 << 20, ge=0)


class MetricsSettings(_Section):
    address: str = "127.0.0.1:9651"

    @field_validator("address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        split_address(value)
        return value


class LogSettings(_Section):
    format: Literal["text", "json"] = "text"
    level: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR"] = "INFO"


class DaemonSettings(_Section):
    instance: str = ""
    grace_period: float = Field(10.0, ge=0, le=3600)
    heartbeat_interval: float = Field(5.0, gt=0, le=3600)
    lease_duration: float = Field(15.0, gt=0, le=86400)

    @model_validator(mode="after")
    def _lease_outlives_heartbeats(self) -> DaemonSettings:
        # A lease no longer than one heartbeat would lapse between two renewals of a healthy
        # instance, and others would settle its batches under it.
        if self.lease_duration <= self.heartbeat_interval:
            raise ValueError(
                "lease_duration must be longer than heartbeat_interval (3x is a good choice)"
            )
        return self


class EmbeddedSettings(_Section):
    data_dir: Path | None = None


def _slot_name(value: str) -> str:
    # What PostgreSQL accepts as a replication slot name; checked here so a typo is one line
    # at start, not an error from a background task.
    if not re.fullmatch(r"[a-z0-9_]{1,63}", value):
        raise ValueError("a slot name is 1 to 63 lowercase letters, digits and underscores")
    return value


SlotName = Annotated[str, AfterValidator(_slot_name)]


class CdcSettings(_Section):
    slots: tuple[SlotName, ...] = ()
    poll_interval: float = Field(1.0, gt=0, le=3600)
    verify: bool = False
    verify_slot: SlotName = "cdcfeed_verify"
    publication: Identifier = "cdcfeed"
    verify_kafka: bool = False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    database: DatabaseSettings = DatabaseSettings()
    load: LoadSettings = LoadSettings()
    feed: FeedSettings = FeedSettings()
    metrics: MetricsSettings = MetricsSettings()
    log: LogSettings = LogSettings()
    daemon: DaemonSettings = DaemonSettings()
    embedded: EmbeddedSettings = EmbeddedSettings()
    cdc: CdcSettings = CdcSettings()
    kafka: KafkaSettings = KafkaSettings()

    @model_validator(mode="after")
    def _kafka_verify_has_a_broker(self) -> Settings:
        if self.cdc.verify_kafka and not self.kafka.bootstrap:
            raise _bad("cdc.verify_kafka", "needs [kafka] bootstrap: the brokers to read from")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Init values only: `load_settings` lays file, environment and flags over each other
        # itself, reading the environment from the mapping it is given (`_EnvironSource`).
        return (init_settings,)

    @property
    def instance_name(self) -> str:
        return self.daemon.instance or socket.gethostname()


class _EnvironSource(EnvSettingsSource):
    """pydantic-settings' environment parsing (prefix, ``__`` nesting, JSON for lists and
    tables) applied to a given mapping instead of ``os.environ``."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ  # read by _load_env_vars, which the base __init__ calls
        super().__init__(Settings)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # The hook the base class reads ``os.environ`` in; names are matched in lower case,
        # as the base does for a case-insensitive model (tests/unit/test_settings_isolation.py).
        return {name.lower(): value for name, value in self._environ.items()}


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


MAX_CONFIG_BYTES = 16 << 20  # far above any settings file: `--config /dev/zero` is an error


def _read_toml(path: Path) -> dict[str, Any]:
    """The file's settings; each way it can fail is one line naming --config and the fix.
    An empty file means every default. A UTF-8 byte order mark (some editors write one) is
    skipped."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise UserError("--config", f"{path} {_unreadable(exc, path)}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise UserError("--config", f"{path} is over 16 MiB: not a settings file; check the path")
    try:
        return tomllib.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        problem = f"is not UTF-8 (byte 0x{data[exc.start]:02x} on line {line}); save it as UTF-8"
    except tomllib.TOMLDecodeError as exc:
        problem = f"is not valid TOML ({exc}); fix the syntax"
    raise UserError("--config", f"{path} {problem}")


def _unreadable(exc: OSError, path: Path) -> str:
    if isinstance(exc, FileNotFoundError):
        return "does not exist; pass an existing TOML file"
    if isinstance(exc, IsADirectoryError):
        return f"is a directory; pass the TOML file itself, e.g. --config {path / 'cdcfeed.toml'}"
    if isinstance(exc, PermissionError):
        user = f"uid {os.geteuid()}"
        with contextlib.suppress(KeyError):  # a uid without a name (containers) stays a number
            user = f"user {pwd.getpwuid(os.geteuid()).pw_name}"
        return f"cannot be read by {user} (permission denied); give that user read access"
    return f"cannot be read ({exc.strerror}); pass a readable TOML file"


def _describe(error: ErrorDetails, from_file: Path | None) -> UserError:
    location = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        where = f" in {from_file}" if from_file else ""
        return UserError(
            location,
            f"unknown setting{where}; the keys are listed in config/cdcfeed.toml",
        )
    if location == "database.dsn":
        # Never echo the input: it may hold a password.
        return UserError(location, str(error["msg"]).removeprefix("Value error, "))
    got = error.get("input")
    message = str(error["msg"]).removeprefix("Value error, ")
    setting = (error.get("ctx") or {}).get("setting")
    if setting:
        return UserError(f"{location}.{setting}" if location else setting, message)
    return UserError(location, f"{message} (got {got!r})")


def load_settings(
    config_file: Path | None,
    overrides: dict[str, dict[str, Any]] | None,
    environ: Mapping[str, str],
) -> Settings:
    """Builds the settings from file, `environ` and flag overrides; raises UserError.

    `environ` is the only environment read (the CLI passes ``os.environ``).
    """
    file_values = _read_toml(config_file) if config_file else {}
    flag_values = {
        section: {k: v for k, v in values.items() if v is not None}
        for section, values in (overrides or {}).items()
    }
    flag_values = {section: values for section, values in flag_values.items() if values}
    try:
        env_values = _EnvironSource(environ)()
    except SettingsError:
        # Only a list or table given as one variable is parsed here, and it must be JSON.
        raise UserError(
            f"{ENV_PREFIX}… environment",
            "a list or table in a variable must be JSON, e.g. "
            'CDCFEED_LOAD__STEPS=\'[{"rate": 10, "seconds": 60}]\'',
        ) from None
    try:
        from_env_and_file = Settings(**_deep_merge(file_values, env_values))
        merged = _deep_merge(from_env_and_file.model_dump(), flag_values)
        merged["database"]["dsn"] = _resolve_dsn(
            flag_dsn=flag_values.get("database", {}).get("dsn"),
            environ=environ,
            file_dsn=from_env_and_file.database.dsn.get_secret_value(),
        )
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise _describe(exc.errors()[0], config_file) from None


def _resolve_dsn(flag_dsn: str | None, environ: Mapping[str, str], file_dsn: str) -> str:
    if flag_dsn:
        return flag_dsn
    if environ.get(f"{ENV_PREFIX}DATABASE__DSN"):
        return environ[f"{ENV_PREFIX}DATABASE__DSN"]
    if environ.get("DATABASE_URL"):
        return environ["DATABASE_URL"]
    return file_dsn


def split_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' → (host, port); raises ValueError with the allowed form."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError("expected host:port, e.g. 127.0.0.1:9651 (port 0 picks a free port)")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not host.replace("-", "").replace(".", "").isalnum():
            raise ValueError(
                f"{host!r} is not a host name or IP address; expected host:port"
            ) from None
    return host, int(port_text)


def effective_view(settings: Settings) -> dict[str, Any]:
    """The settings as plain data with every secret redacted, for `cdcfeed config`."""
    data = settings.model_dump(mode="json")
    data["database"]["dsn"] = redact_dsn(settings.database.dsn.get_secret_value())
    data["daemon"]["instance"] = settings.instance_name
    data["kafka"]["password"] = "***" if settings.kafka.password.get_secret_value() else ""
    return data
