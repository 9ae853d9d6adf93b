"""Validate Cowrie JSON events against Cowrie's own event catalogue.

The catalogue (``data/cowrie_eventids.json``) is Cowrie's ``core/eventids.py`` ALL set plus the attributes
documented in ``docs/OUTPUT.rst``. Checking against it, rather than a hand-kept list, is what keeps real
events (``cowrie.session.params``, IPv6 connects, 12-hex sessions) out of the dead-letter queue.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable
from datetime import date
from decimal import Decimal
from functools import cache, lru_cache
from importlib import resources
from typing import Any, NamedTuple

__all__ = ["ValidationResult", "event_ids", "is_session_id", "validate_event"]

# Attributes Cowrie always emits for an event id, per the catalogue: each is documented for that id with no
# condition ("absent on ...", "(... attempts)", "(known files)", "where ...", "for stdin input ...").
# Kept to the attributes that define the event and have kept their name across Cowrie versions, so old logs
# still pass; renamed or later ones (duration -> duration_ms, hassh, key/type, destfile) stay optional.
# The catalogue makes `password` conditional on login events: public-key and "none" logins carry none.
# Shared and connection attributes (src_ip, dst_ip, ports, ...) are only checked when present.
REQUIRED_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "cowrie.client.fingerprint": ("username", "fingerprint"),
    "cowrie.client.size": ("width", "height"),
    "cowrie.client.var": ("name", "value"),
    "cowrie.client.version": ("version",),
    "cowrie.command.failed": ("input",),
    "cowrie.command.input": ("input",),
    "cowrie.command.success": ("input",),
    "cowrie.log.closed": ("ttylog",),
    "cowrie.log.open": ("ttylog",),
    "cowrie.login.failed": ("username",),
    "cowrie.login.success": ("username",),
    "cowrie.session.file_download": ("shasum",),
    "cowrie.session.file_download.failed": ("url",),
    "cowrie.session.file_upload": ("filename", "shasum"),
    "cowrie.session.input": ("input",),
    "cowrie.session.params": ("arch",),
}

# Catalogue note: "cowrie.abuseipdb.* are operational: no session, only in cowrie.log".
_SESSIONLESS_PREFIX = "cowrie.abuseipdb."
# In direct-tcpip events dst_ip is the host the client asked for (SSH lets it be a name, e.g. "ya.ru").
_REQUESTED_HOST_PREFIX = "cowrie.direct-tcpip."

_SESSION_RE = re.compile(r"[0-9a-f]{12}|[0-9a-fA-F]{8}")
_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
# Cowrie writes %Y-%m-%dT%H:%M:%S.%fZ (or a %z offset); older or hand-made lines may lack the fraction. The time of
# day and the offset are checked by the pattern (PostgreSQL's timestamptz refuses offsets past 15:59), the date by
# the calendar (a log's events share a few dates: each is checked once).
_TIMESTAMP_RE = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?"
    r"(?:Z|[+-](?:0[0-9]|1[0-5]):?[0-5][0-9])"
)
_STRING_FIELDS = ("input", "username", "password")


class ValidationResult(NamedTuple):
    """Outcome of :func:`validate_event`; truthy when the event is valid."""

    valid: bool
    errors: tuple[str, ...]

    def __bool__(self) -> bool:
        return self.valid


@cache
def _catalogue() -> dict[str, Any]:
    text = resources.files("dlq_assets").joinpath("data/cowrie_eventids.json").read_text(encoding="utf-8")
    return json.loads(text)


@cache
def event_ids() -> frozenset[str]:
    """The event ids Cowrie can emit (the catalogue's 48)."""
    return frozenset(_catalogue()["eventids"])


def is_session_id(value: object) -> bool:
    """Cowrie session ids: 12 lowercase hex (``uuid4().hex[:12]``, since 2018) or 8 hex (older logs)."""
    return isinstance(value, str) and _SESSION_RE.fullmatch(value) is not None


def _is_timestamp(value: object) -> bool:
    return isinstance(value, str) and (m := _TIMESTAMP_RE.fullmatch(value)) is not None and _is_date(m.group(1))


@lru_cache(maxsize=4096)
def _is_date(text: str) -> bool:
    try:
        date.fromisoformat(text)  # the pattern fixes the shape; this rejects month 13, February 30, year 0
    except ValueError:
        return False
    return True


def _is_ip(value: object) -> bool:
    # ipaddress would take an int as an address, and a scoped "fe80::1%eth0", which names an interface of
    # the sensor, not a peer's address (and PostgreSQL's inet refuses it).
    return isinstance(value, str) and "%" not in value and _parses_as_ip(value)


@lru_cache(maxsize=65536)
def _parses_as_ip(value: str) -> bool:
    """Cached: a honeypot sees the same few attackers again and again (7% of the worker's time uncached)."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _is_host(value: object) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _is_port(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, Decimal):
        # adjusted() first: int() of a Decimal like 1e999999999 would build a billion-digit integer
        if not value.is_finite() or value.adjusted() > 5 or value != value.to_integral_value():
            return False
        value = int(value)
    return isinstance(value, int) and 0 <= value <= 65535


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and _SHA256_RE.fullmatch(value) is not None


def _is_str(value: object) -> bool:
    return isinstance(value, str)


_FIELD_CHECKS: tuple[tuple[str, Callable[[object], bool]], ...] = (
    ("src_ip", _is_ip),
    ("src_port", _is_port),
    ("dst_ip", _is_ip),
    ("dst_port", _is_port),
    *((name, _is_str) for name in _STRING_FIELDS),
    ("shasum", _is_sha256),
    ("sha256", _is_sha256),
)
# direct-tcpip events name the host the attacker asked for in dst_ip: any host name, not only an address
_REQUESTED_HOST_CHECKS = tuple((name, _is_host if name == "dst_ip" else check) for name, check in _FIELD_CHECKS)


_VALID = ValidationResult(True, ())
_ABSENT = object()

# What to check of an event, by its event id (None: unknown) and its keys in the order it holds them: the attribute
# checks that apply and the required attributes it lacks. A log holds a few dozen shapes.
_Checks = tuple[tuple[str, Callable[[object], bool]], ...]
_PLANS: dict[tuple[str | None, tuple[str, ...]], tuple[_Checks, tuple[str, ...]]] = {}
_PLANS_KEPT = 4096


def _plan(eventid: str | None, keys: tuple[str, ...]) -> tuple[_Checks, tuple[str, ...]]:
    checks = _REQUESTED_HOST_CHECKS if eventid and eventid.startswith(_REQUESTED_HOST_PREFIX) else _FIELD_CHECKS
    present = tuple((name, check) for name, check in checks if name in keys)
    required = REQUIRED_ATTRIBUTES.get(eventid, ()) if eventid else ()
    missing = tuple(f"missing_required_field: {name}" for name in required if name not in keys)
    if len(_PLANS) >= _PLANS_KEPT:
        _PLANS.clear()
    _PLANS[eventid, keys] = present, missing
    return present, missing


def validate_event(event: object) -> ValidationResult:
    """Check one parsed event against the catalogue, collecting every error; never changes the event."""
    if not isinstance(event, dict):
        return ValidationResult(False, ("not_an_object",))
    errors: list[str] = []
    get = event.get
    eventid = get("eventid", _ABSENT)
    known = isinstance(eventid, str) and eventid in event_ids()
    if eventid is _ABSENT:
        errors.append("missing_eventid")
    elif not known:
        errors.append(f"unknown_eventid: {eventid}")

    timestamp = get("timestamp", _ABSENT)
    if timestamp is _ABSENT:
        errors.append("missing_timestamp")
    elif not _is_timestamp(timestamp):
        errors.append(f"invalid_timestamp_format: {timestamp}")

    session = get("session", _ABSENT)
    if session is not _ABSENT:
        if not is_session_id(session):
            errors.append(f"invalid_session_id_format: {session}")
    elif not (known and eventid.startswith(_SESSIONLESS_PREFIX)):
        errors.append("missing_session")

    plan_key = (eventid if known else None, tuple(event))
    checks, missing = _PLANS.get(plan_key) or _plan(*plan_key)
    for name, check in checks:
        if not check(value := event[name]):
            errors.append(f"invalid_{name}: {value}")
    errors.extend(missing)
    return ValidationResult(False, tuple(errors)) if errors else _VALID
