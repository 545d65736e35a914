"""Settings of ``longmem serve`` (no web framework imported here, so the CLI help works without the extra)."""
from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field, fields
from typing import Any


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class ServeConfig:
    host: str = _help("address to bind; the default is loopback only", default="127.0.0.1")
    port: int = _help("TCP port", default=8000)
    api_key: str = _help("if set, every route but /health needs it (or env LONGMEM_API_KEY): 'Authorization: "
                         "Bearer KEY' for the API; the pages (/docs, /redoc, /openapi.json, /inspect) also take it "
                         "as the password of HTTP basic authentication, which a browser asks for", default="")
    sessions_dir: str = _help("where idle sessions are written (default: RUN/sessions)", default="")
    max_request_bytes: int = _help("largest request body accepted", default=1_000_000)
    max_prompt_chars: int = _help("longest prompt accepted, in characters", default=32_000)
    max_tokens_limit: int = _help("largest max_tokens a request may ask for", default=2048)
    max_live_sessions: int = _help("sessions kept in RAM; the least recently used beyond this go to disk",
                                   default=64)
    session_idle_s: float = _help("a session idle this long is written to disk and dropped from RAM",
                                  default=600.0)
    max_session_bytes: int = _help("per-session memory cap; a session whose memory grows past it is reset",
                                   default=256_000_000)
    max_sessions_on_disk: int = _help("session files kept in the sessions folder; past this the least recently "
                                      "used are deleted (never one of a session live in RAM); at least "
                                      "max_live_sessions", default=1000)
    max_sessions_disk_bytes: int = _help("bytes of session files kept in the sessions folder, the least recently "
                                         "used deleted first (live sessions' files are kept even past it)",
                                         default=4_000_000_000)
    max_queue: int = _help("requests waiting for the model at most; more are refused with 503", default=256)
    max_batch: int = _help("requests decoded together, one token each per step, as lanes of one batch (continuous "
                           "batching: a request joins and leaves between steps); 1 runs them one at a time",
                           default=8)
    batch_math: str = _help("exact: each lane computes bit for bit what its request alone would (one-row matmuls "
                            "per lane, attention per lane over its own cache); fast: one matmul for all lanes, "
                            "equal to the request alone up to float rounding", default="exact")
    attention_sink: int = _help("kind none: first positions kept in the decoding cache", default=4)
    turn_format: str = _help("chat API: how a message is fed ({text} its only field; an assistant's message is its "
                             "text and a newline); default: the model's chat template if it has one, else one line "
                             "per message prefixed by its role ('User: ...')", default="")
    max_inspect_tokens: int = _help("longest text /v1/inspect reads, in tokens", default=4096)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{f.name} must be a finite number, got {v}")
        for name in ("max_request_bytes", "max_prompt_chars", "max_tokens_limit", "max_live_sessions",
                     "max_session_bytes", "max_queue", "max_sessions_on_disk", "max_sessions_disk_bytes",
                     "max_inspect_tokens", "max_batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_sessions_on_disk < self.max_live_sessions:
            raise ValueError(f"max_sessions_on_disk ({self.max_sessions_on_disk}) must be at least "
                             f"max_live_sessions ({self.max_live_sessions}): live sessions are never deleted")
        if self.batch_math not in ("exact", "fast"):
            raise ValueError(f"batch_math must be 'exact' or 'fast', got {self.batch_math!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.session_idle_s <= 0:
            raise ValueError(f"session_idle_s must be positive, got {self.session_idle_s}")
        if self.turn_format:
            from longmem.generation.chat import check_turn_format
            check_turn_format(self.turn_format)

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
