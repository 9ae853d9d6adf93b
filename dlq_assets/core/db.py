"""Database selection and connections for the library: an explicit URL, else ``$DLQ_DATABASE_URL``.

The core never chooses a database on its own. Entry points that may use the embedded server (the CLI, ``dlq dev``,
``make run``, the benchmarks) resolve it first with :func:`dlq_assets.devtools.embedded.resolve_url`; a Dagster
code location does so only when ``DLQ_DATABASE_URL=embedded`` asks for it.
"""

from __future__ import annotations

import getpass
import os
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

URL_ENV = "DLQ_DATABASE_URL"
EMBEDDED = "embedded"  # DLQ_DATABASE_URL=embedded: the local embedded server, chosen explicitly
EMBEDDED_DATABASE = "dlq"


class DatabaseNotConfigured(RuntimeError):
    """No database was given: a deployment must say which server it uses."""


def configured_url() -> str | None:
    """``$DLQ_DATABASE_URL`` as set (``embedded`` included), or None."""
    return os.environ.get(URL_ENV) or None


def database_url(url: str | None = None) -> str:
    """The URL to use: an explicit one, else ``$DLQ_DATABASE_URL``; never a database nobody named."""
    url = url or configured_url()
    if not url:
        raise DatabaseNotConfigured(
            f"no DLQ database: set {URL_ENV} to a postgresql:// URL ({URL_ENV}={EMBEDDED} for a local embedded server)"
        )
    if url == EMBEDDED:
        raise DatabaseNotConfigured(
            f"{URL_ENV}={EMBEDDED} is resolved by an entry point (dlq, dlq dev, the Dagster resource), not the library"
        )
    return normalize_url(url)


def normalize_url(url: str) -> str:
    """Accept SQLAlchemy-style ``postgresql+driver://`` URLs too; psycopg wants plain ``postgresql://``."""
    scheme, rest = url.split("://", 1) if "://" in url else ("", url)
    if scheme.startswith(("postgresql+", "postgres+")) or scheme == "postgres":
        return f"postgresql://{rest}"
    if scheme != "postgresql":
        raise ValueError(f"not a PostgreSQL URL: {redact(url, url)}")
    try:
        conninfo_to_dict(url)  # libpq's own parse: its errors quote the whole URL, password and all
    except psycopg.ProgrammingError as exc:
        raise ValueError(redact(str(exc), url)) from None
    return url


def sqlalchemy_url(url: str, driver: str = "psycopg") -> str:
    """The same server as a SQLAlchemy URL; Dagster's storage needs ``psycopg2`` (its NOTIFY breaks on psycopg 3)."""
    return f"postgresql+{driver}://{normalize_url(url).split('://', 1)[1]}"


def database_name(url: str) -> str:
    """The database a URL connects to (libpq's default, the user's name, when it names none)."""
    info = conninfo_to_dict(normalize_url(url))
    return info.get("dbname") or info.get("user") or getpass.getuser()


def with_database(url: str, database: str) -> str:
    parts = urlsplit(normalize_url(url))
    return urlunsplit(parts._replace(path=f"/{database}"))


# A password in a URL's userinfo (up to its last "@"), or in a password= parameter (URL query, key=value conninfo),
# wherever it appears: a URL, a conninfo string, an error message quoting either.
_PASSWORDS = re.compile(r"(://[^/:@\s]*:)[^\s'\"]*(?=@)|(\bpassword\s*=\s*)(?:'(?:[^'\\]|\\.)*'|[^\s&]*)", re.I)


def _password_pieces(url: str) -> list[str]:
    """The password of a URL's userinfo (up to its last "@"), as written and decoded, and its pieces around "@",
    ":" and spaces: what libpq may quote of it in an error (a host it parsed out of the password, say)."""
    if "://" not in url or "@" not in url:
        return []
    userinfo = url.split("://", 1)[1].rsplit("@", 1)[0]
    if ":" not in userinfo:
        return []
    password = userinfo.split(":", 1)[1]
    pieces = {password, unquote(password)}
    pieces |= {part for whole in tuple(pieces) for part in re.split(r"[@:\s]+", whole)}
    return sorted((p for p in pieces if len(p) >= 3), key=len, reverse=True)


def redact(text: str, *urls: str | None) -> str:
    """The URL (or conninfo, or a message holding one) with every password replaced, for what a person or log sees;
    with ``urls``, whatever libpq may quote of their passwords too, however oddly they are written."""
    text = _PASSWORDS.sub(lambda m: f"{m[1] or m[2]}***", text)
    for url in urls:
        for piece in _password_pieces(url or ""):
            text = text.replace(piece, "***")
    return text


def connect(url: str | None = None, *, autocommit: bool = False, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(database_url(url), autocommit=autocommit, **kwargs)


def ensure_database(server_url: str, name: str) -> bool:
    """Create database ``name`` on the server if it is missing; True when it was created."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return False
        try:
            conn.execute(sql.SQL("CREATE DATABASE {} ENCODING 'UTF8' TEMPLATE template0").format(sql.Identifier(name)))
        except psycopg.errors.DuplicateDatabase:
            return False  # another process created it between our check and our create
        return True


# --- array parameters ------------------------------------------------------------------------------------------
# psycopg dumps a list parameter with a Python call per element: a worker's batch sends about twenty 1,000-element
# arrays, and that was 17% of its time (py-spy). Literals built by str.join cost a fraction of it (measured in
# benchmarks/README.md); the server parses them in C.

JSON_SEPARATOR = "\x1e"  # ASCII record separator: JSON text never holds it raw (control characters are escaped)
# The SQL that takes a json_texts() parameter: a text[], each element cast to jsonb where it is used. A jsonb[] cast
# whole (::jsonb[]) built and took apart an array of parsed values: 5.9 ms per 1,000 payloads against 2.2.
JSON_TEXTS_SQL = "string_to_array(%s, chr(30))"


def bigint_array(values: Sequence[int | None]) -> str:
    """An ``int8[]`` literal for a ``%s::bigint[]`` parameter; each value must be an int (None becomes NULL)."""
    if None in values:
        return "{" + ",".join("NULL" if v is None else str(int(v)) for v in values) + "}"
    return "{" + ",".join(map(str, map(int, values))) + "}"


@lru_cache(maxsize=4096)
def _quoted(value: str | None) -> str:
    """An array element, quoted (any text round-trips); cached: most columns repeat a few values (a source, an
    outcome, a method) a thousand times a batch."""
    return "NULL" if value is None else '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def text_array(values: Sequence[str | None]) -> str:
    """A ``text[]`` literal for a ``%s::text[]`` parameter: every element quoted, so any text round-trips."""
    return "{" + ",".join(map(_quoted, values)) + "}"


def json_texts(texts: Sequence[str]) -> str:
    """JSON texts joined by the record separator, for :data:`JSON_TEXTS_SQL`: no escaping at all (a batch's
    payloads are half a megabyte of quotes). A text holding the separator is no JSON: ValueError, never a split."""
    if not texts or "" in texts:  # '' would split into no element at all, not into one that jsonb refuses
        raise ValueError("json_texts needs one or more texts, none of them empty")
    joined = JSON_SEPARATOR.join(texts)
    if joined.count(JSON_SEPARATOR) != len(texts) - 1:
        raise ValueError("a JSON text holds a raw record separator (U+001E): it is not JSON")
    return joined
