"""Priority and classification of a dead letter at ingest: documented rules, applied in order.

Classification (first match wins):
1. ``malicious``: a structural field (eventid, session, src_ip, dst_ip, timestamp, sensor, protocol) holds
   SQL or shell injection aimed at the pipeline itself. Attacker commands in ``input``/``message`` are what a
   honeypot records, not an attack on us, so they never count.
2. ``binary``: the record is not text (invalid UTF-8 or a NUL byte).
3. ``oversize``: the record is larger or deeper than the reader accepts.
4. ``malformed``: not parseable JSON (truncated, bad syntax, or JSON jsonb cannot store).
5. ``invalid``: JSON that fails Cowrie validation.

Priority (1 highest .. 10 lowest): 2 when the record is (or visibly was) an event that shows a compromise
(login.success, command.input, file_download/upload, direct-tcpip); 3 for malicious records (the security team
wants them early); 4 for other known Cowrie event ids; 5 when an event id is present but unknown; 7 when no
event id can be seen at all; 9 for binary and oversize records, which rarely repair.
"""

from __future__ import annotations

import re
from typing import Any

from dlq_assets.core.cowrie import event_ids
from dlq_assets.core.intake.reader import INVALID_UTF8, NUL_BYTE, RECORD_TOO_LARGE, TOO_DEEPLY_NESTED, Record

HIGH_VALUE_EVENTS = frozenset(
    {
        "cowrie.login.success",
        "cowrie.command.input",
        "cowrie.session.file_download",
        "cowrie.session.file_upload",
        "cowrie.direct-tcpip.request",
        "cowrie.direct-tcpip.data",
    }
)
STRUCTURAL_FIELDS = ("eventid", "session", "src_ip", "dst_ip", "timestamp", "sensor", "protocol")
_INJECTION = re.compile(
    r"(?:'|\")\s*(?:;|--|\bor\b|\band\b)|\bunion\s+(?:all\s+)?select\b|;\s*(?:drop|delete|update|insert|alter|copy"
    r"|truncate)\b|\bpg_sleep\s*\(|\bsleep\s*\(|\$\(|`|\bexec\s*\(|<script",
    re.IGNORECASE,
)
_EVENTID_IN_TEXT = re.compile(rb'"eventid"\s*:\s*"(cowrie\.[A-Za-z0-9_.\-]{1,64})"')


def looks_injected(value: object) -> bool:
    return isinstance(value, str) and bool(_INJECTION.search(value))


def _visible_eventid(record: Record) -> str | None:
    if isinstance(record.value, dict):
        eventid = record.value.get("eventid")
        return eventid if isinstance(eventid, str) else None
    match = _EVENTID_IN_TEXT.search(record.raw[:65536])
    return match.group(1).decode("ascii") if match else None


def classify_record(record: Record, reason: str) -> tuple[int, str]:
    """(priority, classification) for a record that goes to the DLQ with ``reason``."""
    fields: dict[str, Any] = record.value if isinstance(record.value, dict) else {}
    if any(looks_injected(fields.get(name)) for name in STRUCTURAL_FIELDS):
        return 3, "malicious"
    if reason in (INVALID_UTF8, NUL_BYTE):
        return 9, "binary"
    if reason in (RECORD_TOO_LARGE, TOO_DEEPLY_NESTED):
        return 9, "oversize"
    classification = "malformed" if record.value is None else "invalid"
    eventid = _visible_eventid(record)
    if eventid is None:
        return 7, classification
    if eventid in HIGH_VALUE_EVENTS:
        return 2, classification
    return (4 if eventid in event_ids() else 5), classification
