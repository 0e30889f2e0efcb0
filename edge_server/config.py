"""What ``rise-edge serve`` is told: ``--config edge.toml`` and flags (flags win)."""

from __future__ import annotations

import argparse
import ssl
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from shared.errors import ConfigError


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
    request_timeout_s: float = 300.0
    shutdown_grace_s: float = 30.0
    ping_interval_s: float | None = 20.0  # websocket keepalive: ping every ... (None: never)
    ping_timeout_s: float | None = 20.0  # ... and drop a connection whose pong is this late
    steps: int = 20
    split_fraction: float = 0.5
    sampler: str = "dpmpp_2m"
    guidance: float = 7.5
    scheduler: str = "fixed"  # fixed | linucb | epsilon_greedy | random | edge_only | device_only | N20k10...
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
                flat[key] = value
        return cls(**flat)

    def token(self) -> str | None:
        if self.token_file is None:
            return None
        try:
            token = Path(self.token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read token file {self.token_file}: {exc}") from exc
        if not token:
            raise ConfigError(f"token file {self.token_file} is empty")
        return token

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


def config_from_args(args: argparse.Namespace) -> EdgeConfig:
    config = EdgeConfig.from_toml(args.config) if args.config else EdgeConfig()
    for name in ("host", "port", "token_file", "tls_cert", "tls_key", "metrics_port", "max_batch_rows",
                 "max_queue", "steps", "split_fraction", "shutdown_grace_s", "ping_interval_s", "ping_timeout_s",
                 "threads", "scheduler", "profile", "bandit_state", "alpha"):
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    if args.no_batching:
        config.batching = False
    return config
