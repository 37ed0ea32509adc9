"""Connection strings: which form cdcfeed accepts, and how a password is kept out of sight.

cdcfeed takes `postgresql://` URIs (asyncpg's form) or libpq's PG… variables; a password in
either is redacted wherever the DSN is shown and scrubbed from log lines.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import SplitResult, urlsplit, urlunsplit

LIBPQ_ENV = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")


def uses_libpq_environment(environ: Mapping[str, str]) -> bool:
    """True when libpq's PG… variables name a server (asyncpg reads them itself)."""
    return any(environ.get(name) for name in LIBPQ_ENV)


def parse_dsn(dsn: str) -> SplitResult:
    """Checks that a DSN is a URI asyncpg understands; raises ValueError naming the problem."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError(
            "expected a URI like postgresql://user:password@host:5432/dbname "
            "(keyword=value strings are not supported)"
        )
    try:
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        raise ValueError("the port in the URI is not a number from 0 to 65535") from None
    return parts


def redact_dsn(dsn: str) -> str:
    """The DSN with its password replaced, safe for logs, errors and `cdcfeed config`."""
    if not dsn:
        return dsn
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "<unparseable DSN>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{hostinfo}" if ":" in userinfo else f"{user}@{hostinfo}"
    query = "&".join(
        f"{key}=***" if key.lower() == "password" else f"{key}={value}"
        for key, _, value in (item.partition("=") for item in parts.query.split("&") if item)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def dsn_password(dsn: str) -> str:
    """The password a DSN carries, so the log filter can scrub it wherever it turns up."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return ""
    for item in parts.query.split("&"):
        key, _, value = item.partition("=")
        if key.lower() == "password" and value:
            return value
    return parts.password or ""
