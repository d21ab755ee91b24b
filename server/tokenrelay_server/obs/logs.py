"""Logs (issue 11): one line per stream lifecycle event, as text or as JSON
lines, and no secret in any line.

`StreamLog`, an engine observer, writes the lifecycle lines (logger
`tokenrelay.streams`):

    event            level     when
    stream_started   INFO      a generation began on this replica
    attempt_failed   INFO      an upstream attempt failed, or an open breaker refused it
    recovery         INFO      the decision: retry, resume or fall back, and its delay
    resumed          INFO      a call reattached (a resume, or a repeated idempotency key)
    taken_over       WARNING   this replica continues a stream whose owner died
    stream_ended     INFO      the End was written: complete or cancelled
                     WARNING   ... partial (the gateway gave up; the error code says why)
    attempt_started, attempt_ended (success or stopped): DEBUG

Each line carries `stream_id`, `trace_id` (when tracing is on: the trace
of the span current where the engine told the event, which is the call's,
obs/tracing.py), and `provider`, `attempt` and `outcome` where they apply.
As text the message is the event and its fields as key=value; as JSON
(`--log-format json`) each line is one object with `ts`, `level`, `logger`,
`msg` and the fields at the top level (every other log line of the gateway
is a JSON object too, with the current trace id when there is one).

Secrets (issue 13): the lifecycle lines hold ids, bounded labels, counts and
codes, never prompts, answers, provider error messages (they can quote the
request), keys or tokens; prompt and answer text only with `--log-content`
(a `prompt` line after `stream_started`, an `answer` line after
`stream_ended`, both at DEBUG, each with a `text` field). Third-party
loggers: hpack logs every header it encodes at DEBUG (with HTTP/2 that is
`authorization: Bearer <provider key>`), h2 and httpcore trace frames and
requests at DEBUG; `setup_logging` pins all three
at WARNING whatever `--log-level` says. And `SecretFilter`, on the handler,
masks in every record from any logger (its message, its exception text and
a lifecycle line's fields): the secrets the gateway knows by value (provider
API keys, every resume secret, the admin token), and by shape what it cannot
know by value: the credential of any `Bearer` or `x-api-key` header (tenant
API keys: the gateway holds only their hashes) and resume tokens.

The standard library is enough here: a 30-line formatter gives JSON lines,
and the records stay plain `logging` records, so third-party loggers (grpc,
httpx, redis) come out in the same format with no adapter. structlog or
python-json-logger would add a dependency for what this file does.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Literal, TextIO

from opentelemetry import trace

from tokenrelay_server.config.settings import Settings
from tokenrelay_server.core.errors import Fault
from tokenrelay_server.engine.events import (
    AttemptEnded,
    AttemptStarted,
    ChunkStored,
    EngineEvent,
    ReaderAttached,
    RecoveryAction,
    StreamEnded,
    StreamStarted,
    TakenOver,
)

LogFormat = Literal["text", "json"]
STREAM_LOGGER = "tokenrelay.streams"
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# The record attribute that carries a line's fields to the JSON formatter.
FIELDS = "tokenrelay_fields"
# Loggers that print what they send at DEBUG: never below WARNING (module doc).
QUIET_LOGGERS = ("hpack", "h2", "httpcore")
# A "secret" this short would mask ordinary words; no real key is.
MIN_SECRET_CHARS = 6

Value = str | int | float | bool


def current_trace_id() -> str | None:
    """The trace id of the current span, as 32 hex digits; None without one."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def _text_value(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


class StreamLog:
    """The engine observer that writes the lifecycle lines (module doc)."""

    observes_chunks = False  # no line per chunk (but with --log-content: __init__)

    def __init__(self, logger: logging.Logger | None = None, *, log_content: bool = False) -> None:
        self._log = logger or logging.getLogger(STREAM_LOGGER)
        # Each stream's last attempt (provider, number), for its later lines;
        # dropped at its end.
        self._last: dict[str, tuple[str, int]] = {}
        # --log-content: each stream's answer so far (its text chunks), for
        # stream_ended; only then does this observer see chunks.
        self.log_content = log_content
        self.observes_chunks = log_content
        self._answers: dict[str, list[str]] = {}

    def __call__(self, event: EngineEvent) -> None:
        match event:
            case AttemptStarted():
                self._last[event.stream_id] = (event.provider, event.attempt)
                self._write(
                    logging.DEBUG,
                    "attempt_started",
                    event.stream_id,
                    model=event.model,
                    provider=event.provider,
                    upstream_model=event.upstream_model,
                    attempt=event.attempt,
                    continuation=event.continuation,
                )
            case AttemptEnded():
                self._attempt_ended(event)
            case RecoveryAction():
                provider, attempt = self._last.get(event.stream_id, (event.from_provider, 0))
                self._write(
                    logging.INFO,
                    "recovery",
                    event.stream_id,
                    model=event.model,
                    provider=provider,
                    attempt=attempt or None,
                    outcome=event.step,
                    to_provider=event.to_provider,
                    delay_s=event.delay_s,
                    at_seq=event.at_seq,
                    **_fault_fields(event.fault),
                )
            case StreamStarted():
                self._write(logging.INFO, "stream_started", event.stream_id, model=event.model)
                if self.log_content:
                    self._answers[event.stream_id] = []
                    self._write(logging.DEBUG, "prompt", event.stream_id, text=event.prompt)
            case ChunkStored() if self.log_content:
                answer = self._answers.get(event.stream_id)
                if answer is not None and event.kind == "text":
                    answer.append(event.text)
            case StreamEnded():
                self._stream_ended(event)
            case ReaderAttached() if event.resumed:
                self._write(
                    logging.INFO,
                    "resumed",
                    event.stream_id,
                    model=event.model,
                    after_seq=event.after_seq,
                )
            case TakenOver():
                self._write(
                    logging.WARNING,
                    "taken_over",
                    event.stream_id,
                    model=event.model,
                    at_seq=event.at_seq,
                )
            case _:
                return

    def _attempt_ended(self, event: AttemptEnded) -> None:
        failed = event.outcome in ("failure", "refused")
        fields: dict[str, Value | None] = {
            "model": event.model,
            "provider": event.provider,
            "upstream_model": event.upstream_model,
            "attempt": event.attempt,
            "outcome": event.outcome,
            "tokens_received": event.deltas,
            "bytes_received": event.bytes_received,
            "time_to_first_token_s": event.first_token_s,
            "duration_s": event.duration_s,
        }
        if event.fault is not None:
            fields.update(_fault_fields(event.fault))
        name = "attempt_failed" if failed else "attempt_ended"
        self._write(logging.INFO if failed else logging.DEBUG, name, event.stream_id, **fields)

    def _stream_ended(self, event: StreamEnded) -> None:
        end = event.end
        provider, attempt = self._last.pop(event.stream_id, ("", 0))
        if end.finish_reason == "cancelled":
            outcome = "cancelled"
        elif end.partial:
            outcome = "partial"
        else:
            outcome = "complete"
        fields: dict[str, Value | None] = {
            "model": event.model,
            "provider": provider or None,
            "attempt": attempt or None,
            "outcome": outcome,
            "finish_reason": end.finish_reason,
            "total_seq": end.total_seq,
            "attempts": event.attempts,
            "completion_tokens": end.usage.completion_tokens,
            "duration_s": event.duration_s,
        }
        if end.error is not None:
            fields.update(_fault_fields(end.error))
        level = logging.WARNING if outcome == "partial" else logging.INFO
        self._write(level, "stream_ended", event.stream_id, **fields)
        answer = self._answers.pop(event.stream_id, None)
        if answer is not None:
            self._write(logging.DEBUG, "answer", event.stream_id, text="".join(answer))

    def _write(self, level: int, event: str, stream_id: str, **fields: Value | None) -> None:
        if not self._log.isEnabledFor(level):
            return
        line: dict[str, Value] = {"event": event, "stream_id": stream_id}
        trace_id = current_trace_id()
        if trace_id is not None:
            line["trace_id"] = trace_id
        line.update({key: value for key, value in fields.items() if value is not None})
        pairs = (f"{key}={_text_value(value)}" for key, value in line.items() if key != "event")
        text = " ".join([event, *pairs])
        self._log.log(level, text, extra={FIELDS: line})


def _fault_fields(fault: Fault) -> dict[str, Value | None]:
    # The type and the code, never the message: a provider's error text can
    # quote the request.
    return {
        "error_type": fault.type.name.lower(),
        "error_code": fault.code,
        "retryable": fault.retryable,
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ms), level, logger, msg, then a
    lifecycle line's fields (its msg is then the event's name), or else the
    current trace id when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict):
            # A lifecycle line: its fields say it all; msg is the event.
            entry["msg"] = fields.get("event", entry["msg"])
            entry.update(fields)
        elif (trace_id := current_trace_id()) is not None:
            entry["trace_id"] = trace_id
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


# Credentials by shape (SecretFilter): what follows `Bearer` (an
# authorization header, however a logger prints it: `authorization: Bearer
# K`, `(b'authorization', b'Bearer K')`), an `x-api-key` header's value
# (Anthropic), and a resume token: `v<N>.` dotted fields ending in a MAC of
# 32 or more base64url characters (api/tokens.py: HMAC-SHA256, 43; any
# later token version that keeps the `v<N>.` prefix and a MAC at the end).
SECRET_SHAPES = (
    re.compile(r"(?i)(bearer\s+)[^\s'\",;)\]}]+"),
    re.compile(r"(?i)(x-api-key['\"]?\s*[:=,]\s*b?['\"]?)[^\s'\",;)\]}]+"),
    re.compile(r"()\bv\d+\.[A-Za-z0-9_.:-]+\.[A-Za-z0-9_-]{32,}"),
)


class SecretFilter(logging.Filter):
    """Masks secrets in a record's message, exception text and lifecycle
    fields, for whatever logger wrote it (put it on the handler): the known
    ones by value, credentials and resume tokens by shape (SECRET_SHAPES)."""

    MASK = "***"

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._secrets = tuple(
            sorted({s for s in secrets if len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True)
        )
        self._format = logging.Formatter()

    def mask(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, self.MASK)
        for shape in SECRET_SHAPES:
            text = shape.sub(lambda match: match.group(1) + self.MASK, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = self.mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._format.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.mask(record.exc_text)
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict):
            setattr(
                record,
                FIELDS,
                {
                    key: self.mask(value) if isinstance(value, str) else value
                    for key, value in fields.items()
                },
            )
        return True


def known_secrets(settings: Settings, env: Mapping[str, str]) -> list[str]:
    """The secrets this gateway holds: its resume secrets (each of a
    comma-separated list, with and without a `KID:` prefix), its admin
    token, and the API keys its providers read from the environment."""
    secrets = [settings.admin_token or ""]
    for entry in (settings.resume_secret or "").split(","):
        secrets += [entry.strip(), entry.partition(":")[2].strip()]
    for provider in settings.upstream.providers.values():
        if provider.api_key_env is not None:
            secrets.append(env.get(provider.api_key_env, "").strip())
    return [secret for secret in secrets if secret]


def setup_logging(
    level: str,
    log_format: LogFormat = "text",
    *,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> logging.Handler:
    """Replace the root logger's handlers with one that writes `log_format`
    lines to `stream` (stderr), masking `secrets`; return it."""
    handler = logging.StreamHandler(stream or sys.stderr)
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    handler.addFilter(SecretFilter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # httpx logs every upstream request at INFO; keep that for debug.
    logging.getLogger("httpx").setLevel(logging.NOTSET if level == "debug" else logging.WARNING)
    return handler
