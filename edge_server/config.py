"""What ``rise-edge serve`` is told: ``--config edge.toml`` and flags (flags win)."""

from __future__ import annotations

import argparse
import ssl
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edge_server.placement import DTYPE_CHOICES
from shared.errors import ConfigError
from shared.protocol import ProtocolLimits
from shared.relay_plan import MAX_STEPS
from shared.samplers import SAMPLER_NAMES
from shared.validation import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_mapping,
    check_str,
    read_token_file,
)


@dataclass
class EdgeConfig:
    """Everything ``rise-edge serve`` can be told, from ``--config edge.toml`` and flags (flags win)."""

    host: str = "127.0.0.1"
    port: int = 8765
    token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    metrics_port: int | None = None
    max_batch_rows: int = 16
    max_queue: int = 64
    batching: bool = True
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (edge_server.placement)
    dtype: str = "auto"  # auto | fp32 | fp16 | bf16
    variant: str | None = None  # weights variant to load (fp16...); None: detected
    request_timeout_s: float = 300.0
    shutdown_grace_s: float = 30.0
    ping_interval_s: float | None = 20.0  # websocket keepalive: ping every ... (None: never)
    ping_timeout_s: float | None = 20.0  # ... and drop a connection whose pong is this late
    # Connection caps, checked before the websocket upgrade (HTTP 503 / 429 beyond them).
    max_connections: int = 512  # websocket connections to this edge (as many again may be mid-handshake)
    max_connections_per_peer: int = 128  # ... from one IP address
    send_timeout_s: float = 30.0  # drop a connection whose peer takes none of the bytes waiting for it this long
    steps: int = 20
    split_fraction: float = 0.5
    sampler: str | None = None  # None: the family's default (lcm for LCM families, else dpmpp_2m)
    guidance: float = 7.5
    # auto: LinUCB over the family's shipped profile (FAMILY/profile.json) or --profile, else fixed.
    # auto | fixed | linucb | linucb_disjoint | epsilon_greedy | random | edge_only | device_only | N20k10...
    scheduler: str = "auto"
    profile: str | None = None  # measured profile (shared/bandit/profile.py); needed by every scheduler but fixed
    bandit_state: str | None = None  # where the scheduler's learned state persists (atomic JSON)
    alpha: float | None = None  # LinUCB exploration (default 0.1)
    limits: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_toml(cls, path: str | Path) -> EdgeConfig:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        known = {f.name for f in fields(cls)}
        flat: dict[str, Any] = {}
        for section, values in data.items():  # sections are for the reader; keys are unique
            items = values.items() if isinstance(values, dict) and section != "limits" else [(section, values)]
            for key, value in items:
                if key not in known:
                    raise ConfigError(f"{path}: unknown setting {key!r}; known: {', '.join(sorted(known))}")
                try:
                    flat[key] = _TOML_CHECKS[key](key, value)
                except ConfigError as exc:
                    raise ConfigError(f"{path}: {exc}") from None
        return cls(**flat)

    def token(self) -> str | None:
        return None if self.token_file is None else read_token_file(self.token_file)[0]

    def ssl_context(self) -> ssl.SSLContext | None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        if self.tls_cert is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS certificate/key: {exc}") from exc
        return context

    def described(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["token_file"] = "(set)" if self.token_file else None
        return ", ".join(f"{k}={v}" for k, v in shown.items())


def _int(lo: int, hi: int | None = None) -> Callable[[str, Any], int]:
    return lambda key, value: check_int(key, value, lo=lo, hi=hi, error=ConfigError)


def _float(lo: float, hi: float | None = None, *, lo_open: bool = False) -> Callable[[str, Any], float]:
    return lambda key, value: check_float(key, value, lo=lo, hi=hi, lo_open=lo_open, error=ConfigError)


def _str(key: str, value: Any) -> str:
    return check_str(key, value, min_len=1, max_len=4096, error=ConfigError)


def _limits(key: str, value: Any) -> dict[str, Any]:
    table = check_mapping(key, value, error=ConfigError)
    try:
        ProtocolLimits.from_dict(table)  # checked now, so a bad limit is named before anything loads
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return table


#: How ``from_toml`` checks each setting's value (TOML has no null: an optional setting is left out).
_TOML_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "host": _str,
    "port": _int(0, 65535),
    "token_file": _str,
    "tls_cert": _str,
    "tls_key": _str,
    "metrics_port": _int(0, 65535),
    "max_batch_rows": _int(1),
    "max_queue": _int(1),
    "batching": lambda key, value: check_bool(key, value, error=ConfigError),
    "threads": _int(1),
    "device": _str,  # checked against the machine by edge_server.placement.resolve_placement
    "dtype": lambda key, value: check_choice(key, value, DTYPE_CHOICES, error=ConfigError),
    "variant": _str,
    "request_timeout_s": _float(0.0, lo_open=True),
    "shutdown_grace_s": _float(0.0),
    "ping_interval_s": _float(0.0, lo_open=True),
    "ping_timeout_s": _float(0.0, lo_open=True),
    "max_connections": _int(1, 1_000_000),
    "max_connections_per_peer": _int(1, 1_000_000),
    "send_timeout_s": _float(0.0, 86400.0, lo_open=True),
    "steps": _int(1, MAX_STEPS),
    "split_fraction": _float(0.0, 1.0),
    "sampler": lambda key, value: check_choice(key, value, SAMPLER_NAMES, error=ConfigError),
    "guidance": _float(0.0, 50.0),
    "scheduler": _str,
    "profile": _str,
    "bandit_state": _str,
    "alpha": _float(0.0),
    "limits": _limits,
}


#: Flags for settings of EdgeConfig that are checked like their edge.toml key (the flag is named when wrong).
CHECKED_FLAGS: dict[str, str] = {
    "max_connections": "--max-connections",
    "max_connections_per_peer": "--max-connections-per-peer",
    "send_timeout_s": "--send-timeout",
}
#: Flags for keys of the [limits] table (ProtocolLimits).
LIMIT_FLAGS: dict[str, str] = {
    "hello_timeout_s": "--hello-timeout",
    "frames_per_s": "--frames-per-s",
    "frame_burst": "--frame-burst",
    "max_refusals": "--max-refusals",
    "refusals_per_minute": "--refusals-per-minute",
    "max_outbox_bytes": "--max-outbox-bytes",
}


def add_flood_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of the connection caps and flood limits (``rise-edge serve``)."""
    parser.add_argument("--max-connections", type=int, dest="max_connections",
                        help="websocket connections to this edge before HTTP 503 (default 512)")
    parser.add_argument("--max-connections-per-peer", type=int, dest="max_connections_per_peer",
                        help="websocket connections from one IP address before HTTP 429 (default 128)")
    parser.add_argument("--send-timeout", type=float, dest="send_timeout_s",
                        help="drop a connection whose peer takes none of the data waiting for it for this many "
                             "seconds (default 30)")
    parser.add_argument("--hello-timeout", type=float, dest="hello_timeout_s",
                        help="close a connection that has not said hello this many seconds after connecting "
                             "(default 10)")
    parser.add_argument("--frames-per-s", type=float, dest="frames_per_s",
                        help="frames per second one connection may send, pings included (default 20) ...")
    parser.add_argument("--frame-burst", type=int, dest="frame_burst", help="... with this many at once (default 100)")
    parser.add_argument("--max-refusals", type=int, dest="max_refusals",
                        help="refused requests retried before their retry_after_s one connection may have at once "
                             "(default 32) ...")
    parser.add_argument("--refusals-per-minute", type=float, dest="refusals_per_minute",
                        help="... and per minute (default 30)")
    parser.add_argument("--max-outbox-bytes", type=int, dest="max_outbox_bytes",
                        help="bytes queued for a peer that is not reading before it is dropped (default 16 MiB)")


def config_from_args(args: argparse.Namespace) -> EdgeConfig:
    config = EdgeConfig.from_toml(args.config) if args.config else EdgeConfig()
    for name in ("host", "port", "token_file", "tls_cert", "tls_key", "metrics_port", "max_batch_rows",
                 "max_queue", "steps", "split_fraction", "shutdown_grace_s", "ping_interval_s", "ping_timeout_s",
                 "threads", "scheduler", "profile", "bandit_state", "alpha", "sampler", "guidance", "device", "dtype",
                 "variant"):
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    for name, flag in CHECKED_FLAGS.items():
        value = getattr(args, name, None)
        if value is not None:
            setattr(config, name, _TOML_CHECKS[name](flag, value))
    limits = dict(config.limits)
    for name, flag in LIMIT_FLAGS.items():
        value = getattr(args, name, None)
        if value is not None:
            try:
                ProtocolLimits.from_dict({**config.limits, name: value})
            except ConfigError as exc:
                raise ConfigError(f"{flag}: {exc}") from None
            limits[name] = value
    config.limits = limits
    if args.no_batching:
        config.batching = False
    return config
