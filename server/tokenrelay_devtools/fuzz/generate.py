"""Fuzz cases drawn from the contract: what one call sends.

A case is the call's metadata (its credentials) and 1-4 request frames. The
first frame is a start that often gets past validation (so later frames and
the stream itself are reached), a resume with a token good or bad, or
anything: a `StreamRequest` drawn from its descriptor, that message's bytes
mutated (bits flipped, cut short, extended), random bytes, or (rarely) a
frame past the transport limit. Later frames are acks and cancels, mutated or
not, or anything again.

Every field is decided from its descriptor: a oneof picks one member or none,
a proto3 optional is set or not, a repeated field gets 0-3 values, a map gets
entries biased towards the `sim.*` keys the simulator parses (fault scripts,
numbers in other scripts), enums get unknown values too, strings are empty,
huge, non-ASCII or the names the gateway routes, integers sit on their edges,
messages nest.

Credentials and tokens come from `Material`: the tenant's key (when the
gateway has keys), a foreign tenant's key, resume tokens the gateway issued,
and what is made from them: tampered (a character changed, parts dropped or
added), signed with a foreign secret, and, when the gateway's secret is
known (a gateway the fuzzer started), valid signatures for streams that do
not exist or that expired. A case says which credential and which kind of
token it carries, so the runner can check that a bad one was never accepted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any, cast

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay_devtools.fuzz.draw import Draw

UINT32_EDGES = [0, 1, 2, 3, 9, 10, 100, 101, 1_000_000, 1_000_001, 2**31 - 1, 2**31, 2**32 - 1]
UINT64_EDGES = [0, 1, 2, 3, 4, 5, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1]
INT32_EDGES = [0, 1, -1, 7, 2**31 - 1, -(2**31)]
INT64_EDGES = [0, 1, -1, 2**63 - 1, -(2**63), 2**53 + 1]
UNKNOWN_ENUM_VALUES = [99, -5, 2**31 - 1]
# Past the gateway's transport limit (limits.max_request_bytes, 4 MiB by
# default; 16 MiB was the old one): RESOURCE_EXHAUSTED.
OVERSIZED_FRAME_BYTES = 17 << 20

STRINGS = [
    "",
    " ",
    "sim",
    " sim ",
    "gpt-9",
    "user",
    "system",
    "assistant",
    "tool",
    "wizard",
    "\x00",
    "²",
    "٣",
    "é" * 300,
    "🚀",
    "x" * 257,
    "x" * 600,
    "x" * 5000,
]
SIM_KEYS = [
    "sim.faults",
    "sim.pace_ms",
    "sim.seed",
    "sim.overlap",
    "sim.retry_after_s",
    "sim.tokens_per_chunk",
    "sim.reasoning",
    "sim.tool_calls",
    "sim.preamble",
    "sim.",
]
# No 429/503/529: their Retry-After (default 1 s) would make the gateway
# really wait; they are typed like any other status in test_relay_stream.
FAULT_ITEMS = [
    "ok",
    "reset@0",
    "reset@2",
    "stall@1",
    "eof@1",
    "garbage@2",
    "http:400",
    "http:401",
    "http:500",
    "http:200",
    "http:600",
    "reset@²",
    "reset@٣",
    "http:٤٠٠",
    "explode@1",
    "reset@",
    "@3",
    "",
]
NUMBERS = ["0", "1", "2", "-1", "0.5", "1e3", "nan", "inf", "²", "٣", " 1 ", "1_0", "", "x", "17"]
IDEMPOTENCY_KEYS = ["k1", "k2", *STRINGS]

# What a case's credentials are. BAD_CREDENTIALS must never open a stream on
# a gateway that has keys.
KEY, FOREIGN_KEY, NO_KEY = "key", "foreign-key", "no-key"
MALFORMED_KEY, UNKNOWN_KEY, TWO_KEYS = "malformed-key", "unknown-key", "two-keys"
BAD_CREDENTIALS = frozenset({NO_KEY, MALFORMED_KEY, UNKNOWN_KEY, TWO_KEYS})
# Kinds of resume token. REFUSED_TOKENS must never open a stream.
VALID, TAMPERED, FOREIGN, UNKNOWN_STREAM, EXPIRED = (
    "valid",
    "tampered",
    "foreign",
    "unknown-stream",
    "expired",
)
REFUSED_TOKENS = frozenset({TAMPERED, FOREIGN, UNKNOWN_STREAM, EXPIRED})


@dataclass
class Material:
    """What cases are made from besides the contract: keys and tokens.

    `tokens` are resume tokens the gateway issued to `api_key`'s tenant;
    `secret` is the gateway's resume secret when the fuzzer knows it."""

    tokens: list[str] = field(default_factory=list)
    api_key: str | None = None
    foreign_key: str | None = None
    secret: str | None = None
    huge_chars: int = (64 << 10) + 10
    foreign_secret: bytes = b"another deployment's resume secret"

    def huge(self) -> str:
        return "x" * self.huge_chars


@dataclass(frozen=True)
class FuzzCase:
    frames: list[bytes]
    metadata: tuple[tuple[str, str], ...] = ()
    # "start", "resume:<token kind>", "any" (drawn, mutated or random).
    first: str = "any"
    credential: str = NO_KEY

    @property
    def first_token_kind(self) -> str | None:
        return self.first.partition(":")[2] if self.first.startswith("resume:") else None

    def to_json(self) -> dict[str, Any]:
        return {
            "frames": [frame.hex() for frame in self.frames],
            "metadata": [list(entry) for entry in self.metadata],
            "first": self.first,
            "credential": self.credential,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FuzzCase:
        return cls(
            frames=[bytes.fromhex(frame) for frame in data["frames"]],
            metadata=tuple((str(k), str(v)) for k, v in data.get("metadata", [])),
            first=str(data.get("first", "any")),
            credential=str(data.get("credential", NO_KEY)),
        )

    def describe(self) -> str:
        sizes = ",".join(str(len(frame)) for frame in self.frames)
        return f"first={self.first} credential={self.credential} frames=[{sizes}] bytes"

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)


# --- credentials ----------------------------------------------------------------------


def bearer(key: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {key}")


def credentials(draw: Draw, material: Material) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The call's metadata and what kind of credential it is."""
    good: list[str] = [KEY] * 6 if material.api_key else [NO_KEY] * 6
    if material.foreign_key:
        good.append(FOREIGN_KEY)
    kind = draw.choice([*good, NO_KEY, MALFORMED_KEY, UNKNOWN_KEY, TWO_KEYS])
    key = material.api_key or "tr_" + "0" * 64
    if kind == KEY:
        return kind, (bearer(key),)
    if kind == FOREIGN_KEY:
        assert material.foreign_key is not None
        return kind, (bearer(material.foreign_key),)
    if kind == NO_KEY:
        return kind, ()
    unknown = "tr_" + draw.binary(32).hex()
    if kind == UNKNOWN_KEY:
        return kind, (bearer(unknown),)
    if kind == TWO_KEYS:
        return kind, (bearer(key), bearer(unknown))
    # Not here: "bearer <key>" and "Bearer  <key>", which are the key itself
    # (RFC 7235 section 2.1: the scheme is case-insensitive, then 1*SP), and
    # the gateway accepts them; a first run against a keyed gateway counted
    # them as malformed keys that opened streams.
    malformed = draw.choice(
        [
            "Bearer",
            "Bearer ",
            "Token " + key,
            "Basic " + base64.b64encode(key.encode()).decode(),
            f"Bearer {key} {key}",
            f"Bearer:{key}",
            "Bearer " + key[: len(key) // 2],
            "Bearer " + "k" * 2000,
            key,
        ]
    )
    return MALFORMED_KEY, (("authorization", malformed),)


# --- resume tokens --------------------------------------------------------------------


def _sign(secret: bytes, payload: str) -> str:
    mac = hmac.new(secret, payload.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def resign(token: str, secret: bytes) -> str:
    """The token's payload signed with another secret (the signature is the
    part after the last dot, base64url HMAC-SHA256 of the rest)."""
    payload = token.rpartition(".")[0] or token
    return f"{payload}.{_sign(secret, payload)}"


def tamper(draw: Draw, token: str) -> str:
    """The token edited: it must no longer be accepted."""
    how = draw.choice(["char", "stream", "expiry", "drop", "add", "case", "cut", "swap"])
    parts = token.split(".")
    if how == "stream" and len(parts) >= 3:
        parts[1] = draw.binary(16).hex() or "0"
    elif how == "expiry" and len(parts) >= 3:
        parts[2] = str(int(parts[2]) + 1 if parts[2].isdigit() else 9_999_999_999)
    elif how == "drop" and len(parts) >= 2:
        del parts[draw.integer(0, len(parts) - 1)]
    elif how == "add":
        parts.insert(draw.integer(0, len(parts)), draw.choice(["x", "", "v1", "0"]))
    elif how == "case" and token.swapcase() != token:
        return token.swapcase()
    elif how == "cut" and len(token) > 1:
        return token[: draw.integer(0, len(token) - 1)]
    elif how == "swap" and len(parts) >= 4 and parts[1] != parts[3]:
        parts[1], parts[3] = parts[3], parts[1]
    else:
        index = draw.integer(0, len(token) - 1) if token else 0
        old = token[index : index + 1]
        new = draw.choice([c for c in "AZaz09-_." if c != old])
        return token[:index] + new + token[index + 1 :]
    edited = ".".join(parts)
    return edited if edited != token else token + "x"


def resume_token(draw: Draw, material: Material) -> tuple[str, str]:
    """A resume token and its kind."""
    kinds = [TAMPERED, FOREIGN]
    if material.tokens:
        kinds += [VALID, VALID]
    if material.secret:
        kinds += [UNKNOWN_STREAM, EXPIRED]
    kind = draw.choice(kinds)
    base = (
        draw.choice(material.tokens)
        if material.tokens
        else "v2.k0.-." + "a" * 32 + ".1.9999999999.x"
    )
    if kind == VALID:
        return base, kind
    if kind == TAMPERED:
        return tamper(draw, base), kind
    if kind == FOREIGN:
        return resign(base, material.foreign_secret), kind
    assert material.secret is not None
    # v2.<kid>.<tenant>.<stream>.<issued>.<expires>.<mac> (api/tokens.py)
    parts = base.split(".")
    if len(parts) != 7:  # not the v2 format: nothing to forge from
        return tamper(draw, base), TAMPERED
    if kind == UNKNOWN_STREAM:
        parts[3] = draw.binary(16).hex().ljust(32, "0") if draw.roll(4) else ""
    else:
        expires = draw.integer(1, 1_000_000_000)  # long past
        parts[4], parts[5] = str(max(expires - 60, 0)), str(expires)
    payload = ".".join(parts[:6])
    # A secret given as KID:SECRET signs as that kid; a bare one is the token's.
    kid, colon, secret = material.secret.partition(":")
    if colon and secret:
        parts[1] = kid
        payload = ".".join(parts[:6])
    else:
        secret = material.secret
    return f"{payload}.{_sign(secret.encode(), payload)}", kind


# --- messages from descriptors --------------------------------------------------------


def strings(draw: Draw, material: Material) -> str:
    roll = draw.roll(20)
    if roll == 19:
        return material.huge()
    if roll >= 12:
        return draw.text(12)
    return draw.choice(STRINGS)


def sim_value(draw: Draw, key: str, material: Material) -> str:
    if key == "sim.faults":
        return ",".join(draw.choice(FAULT_ITEMS) for _ in range(draw.integer(1, 3)))
    if key == "sim.seed":
        return strings(draw, material) if draw.roll(2) else draw.text(10)
    return draw.choice(NUMBERS)


def metadata_entries(draw: Draw, material: Material) -> dict[str, str]:
    entries: dict[str, str] = {}
    for _ in range(draw.integer(0, 3)):
        roll = draw.roll(3)
        key = (
            draw.choice(SIM_KEYS)
            if roll == 0
            else draw.choice(STRINGS)
            if roll == 1
            else draw.text(8)
        )
        entries[key] = sim_value(draw, key, material) if key in SIM_KEYS else draw.choice(STRINGS)
    if draw.roll(20) == 0:  # past any entry limit
        entries.update({f"k{i}": "v" for i in range(65)})
    return entries


def scalar(draw: Draw, field_: FieldDescriptor, material: Material) -> Any:
    kind = field_.type
    if kind == FieldDescriptor.TYPE_STRING:
        if field_.name == "resume_token":
            roll = draw.roll(3)
            if roll == 0:
                return resume_token(draw, material)[0]
            return strings(draw, material) if roll == 1 else draw.text(80)
        return strings(draw, material)
    if kind == FieldDescriptor.TYPE_BYTES:
        return draw.binary(32)
    if kind == FieldDescriptor.TYPE_BOOL:
        return draw.choice([False, True])
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return draw.floating()
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return draw.choice(UINT32_EDGES) if draw.roll(2) else draw.integer(0, 2**32 - 1)
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return draw.choice(UINT64_EDGES) if draw.roll(2) else draw.integer(0, 2**64 - 1)
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field_.enum_type is not None
        known = [value.number for value in field_.enum_type.values]
        return draw.choice(known) if draw.roll(3) else draw.choice(UNKNOWN_ENUM_VALUES)
    if kind in (
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_SFIXED64,
    ):
        return draw.choice(INT64_EDGES) if draw.roll(2) else draw.integer(-(2**63), 2**63 - 1)
    return draw.choice(INT32_EDGES) if draw.roll(2) else draw.integer(-(2**31), 2**31 - 1)


def is_map(field_: FieldDescriptor) -> bool:
    return field_.message_type is not None and field_.message_type.GetOptions().map_entry


def fill(draw: Draw, target: Message, material: Material, depth: int = 0) -> None:
    """Set `target`'s fields, every one decided from its descriptor."""
    descriptor = cast(Descriptor, target.DESCRIPTOR)
    chosen = {oneof.name: draw.choice([None, *oneof.fields]) for oneof in descriptor.oneofs}
    for field_ in descriptor.fields:
        oneof = field_.containing_oneof
        if oneof is not None and chosen[oneof.name] is not field_:
            continue
        if oneof is None and not draw.choice([False, True]):
            continue  # left at its default
        value = getattr(target, field_.name)
        if is_map(field_):
            value.update(metadata_entries(draw, material))
        elif field_.message_type is not None:
            if depth > 2:
                continue
            if field_.is_repeated:
                for _ in range(draw.integer(0, 3)):
                    fill(draw, value.add(), material, depth + 1)
            else:
                value.SetInParent()  # a message field set, even when empty
                fill(draw, value, material, depth + 1)
        elif field_.is_repeated:
            value.extend(scalar(draw, field_, material) for _ in range(draw.integer(0, 3)))
        else:
            setattr(target, field_.name, scalar(draw, field_, material))


def message(draw: Draw, descriptor: Descriptor, material: Material) -> Message:
    """A message of `descriptor`, every field decided from its descriptor."""
    result = message_factory.GetMessageClass(descriptor)()
    fill(draw, result, material)
    return result


def mostly_valid_start(draw: Draw, material: Material) -> pb.StreamRequest:
    """A start that often gets past validation, so that later frames and the
    stream itself are reached: a good one with some of its parts fuzzed."""
    start = pb.StartGeneration(
        model="sim",
        messages=[pb.Message(role="user", content="tell me about streams")],
        params=pb.GenerationParams(max_tokens=draw.choice([1, 3, 12, 40])),
        metadata={"sim.pace_ms": "0"},
    )
    if draw.roll(4) == 0:
        start.params.Clear()
        fill(draw, start.params, material)
    if draw.roll(4) == 0:
        start.policy.SetInParent()
        fill(draw, start.policy, material)
    if draw.roll(3) == 0:
        start.metadata.update(metadata_entries(draw, material))
    if draw.roll(8) == 0:
        del start.messages[:]
        for _ in range(draw.integer(0, 3)):
            fill(draw, start.messages.add(), material)
    if draw.roll(8) == 0:
        fill(draw, start.tools.add(), material)
    if draw.roll(8) == 0:
        start.idempotency_key = draw.choice(IDEMPOTENCY_KEYS)
    return pb.StreamRequest(start=start)


def mutated(draw: Draw, encoded: bytes) -> bytes:
    how = draw.choice(["flip", "truncate", "extend", "as-is"])
    if how == "flip" and encoded:
        data = bytearray(encoded)
        for _ in range(draw.integer(1, 3)):
            data[draw.integer(0, len(data) - 1)] ^= 1 << draw.integer(0, 7)
        return bytes(data)
    if how == "truncate" and encoded:
        return encoded[: draw.integer(0, len(encoded) - 1)]
    if how == "extend":
        return encoded + draw.binary(8)
    return encoded


def any_frame(draw: Draw, material: Material) -> bytes:
    roll = draw.roll(1000)
    if roll == 999:
        return b"\x0a" + b"\xff" * 3 + b"\x07" + bytes(OVERSIZED_FRAME_BYTES)
    encoded = message(draw, pb.StreamRequest.DESCRIPTOR, material).SerializeToString()
    if roll < 333:
        return encoded
    if roll < 666:
        return mutated(draw, encoded)
    return draw.binary(64)


def first_frame(draw: Draw, material: Material) -> tuple[str, bytes]:
    kind = draw.choice(["start", "start", "start", "resume", "any", "any"])
    if kind == "start":
        return kind, mostly_valid_start(draw, material).SerializeToString()
    if kind == "resume":
        token, token_kind = resume_token(draw, material)
        last_seq = draw.choice(UINT64_EDGES)
        request = pb.StreamRequest(resume=pb.ResumeStream(resume_token=token, last_seq=last_seq))
        return f"resume:{token_kind}", request.SerializeToString()
    return kind, any_frame(draw, material)


LATER: list[pb.StreamRequest] = [
    pb.StreamRequest(ack=pb.Ack(seq=1)),
    pb.StreamRequest(cancel=pb.Cancel()),
    pb.StreamRequest(cancel=pb.Cancel(reason="x" * 600)),
]


def later_frame(draw: Draw, material: Material) -> bytes:
    roll = draw.roll(4)
    if roll < 2:
        return draw.choice(LATER).SerializeToString()
    if roll == 2:
        return mutated(draw, draw.choice(LATER).SerializeToString())
    return any_frame(draw, material)


def fuzz_case(draw: Draw, material: Material) -> FuzzCase:
    """One call: its credentials and 1-4 frames."""
    credential, metadata = credentials(draw, material)
    first, frame = first_frame(draw, material)
    frames = [frame, *(later_frame(draw, material) for _ in range(draw.integer(0, 3)))]
    return FuzzCase(frames=frames, metadata=metadata, first=first, credential=credential)
