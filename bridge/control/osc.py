"""A small, defensive OSC 1.0/1.1 decoder and encoder: pure functions over bytes.

Why not python-osc's parser: it raises uncaught errors on non-UTF-8 strings, loops forever on
some malformed bundles, recurses without bound into nested bundles and sleeps until a bundle's
timetag. This one:

- never recurses (bundles are walked with an explicit stack, nesting capped by `Limits.max_depth`);
- always advances: every loop consumes at least four bytes or stops, so it ends in linear time;
- caps packet size, string and blob length, argument count and messages per packet;
- ignores timetags (bundles apply at once; live control has no use for scheduling);
- raises only `OSCError` (a ValueError) with a short, loggable `reason` key.

Inside a bundle each element is decoded alone: a broken message is reported in
`Packet.errors` and its well-formed neighbours still arrive.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

BUNDLE_TAG = b"#bundle\x00"
_INT32 = struct.Struct(">i")
_UINT32 = struct.Struct(">I")
_INT64 = struct.Struct(">q")
_UINT64 = struct.Struct(">Q")
_FLOAT32 = struct.Struct(">f")
_FLOAT64 = struct.Struct(">d")


class Impulse:
    """The OSC 1.1 'I' argument (an impulse / bang: a trigger without a value)."""

    def __repr__(self) -> str:
        return "IMPULSE"


IMPULSE = Impulse()


@dataclass(frozen=True)
class Limits:
    """Caps on what one packet may contain; anything beyond them is refused, not truncated."""

    max_packet_bytes: int = 65507  # the largest UDP/IPv4 datagram payload; TCP frames are held to the same
    max_depth: int = 8  # bundles inside bundles
    max_string_bytes: int = 2048  # one string argument (a prompt) in UTF-8 bytes, also addresses
    max_address_bytes: int = 256  # OSC address pattern
    max_blob_bytes: int = 8192  # one blob
    max_arguments: int = 64  # arguments of one message (array brackets not counted)
    max_messages: int = 128  # messages in one packet, across all its bundles (counted before decoding)

    def __post_init__(self) -> None:
        for name in ("max_packet_bytes", "max_depth", "max_string_bytes", "max_address_bytes",
                     "max_blob_bytes", "max_arguments", "max_messages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {value!r} must be a positive integer")


DEFAULT_LIMITS = Limits()


class OSCError(ValueError):
    """A packet or message that cannot be decoded. `reason` is a short key for counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Message:
    address: str  # the address pattern as sent (may hold OSC wildcards)
    typetags: str  # without the leading ',' and without array brackets
    args: tuple  # Python values: int, float, str, bytes, bool, None, IMPULSE, tuples for 'r'/'m'/'t'


@dataclass
class Packet:
    messages: list[Message] = field(default_factory=list)
    errors: list[OSCError] = field(default_factory=list)  # bundle elements that were refused


def decode_packet(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Packet:
    """All messages in `data` (a message or a bundle); OSCError when the packet as a whole is
    unusable. Element errors inside bundles are collected in `Packet.errors`."""
    if len(data) > limits.max_packet_bytes:
        raise OSCError("too_large", f"packet of {len(data)} bytes exceeds {limits.max_packet_bytes}")
    if not data:
        raise OSCError("malformed", "empty packet")
    if len(data) % 4:
        raise OSCError("malformed", f"packet length {len(data)} is not a multiple of 4")
    packet = Packet()
    if not data.startswith(BUNDLE_TAG):
        packet.messages.append(decode_message(data, limits))
        return packet
    _walk_bundle(memoryview(data), limits, packet)
    return packet


def _walk_bundle(view: memoryview, limits: Limits, packet: Packet) -> None:
    """Flatten nested bundles in order without recursion. Stack entries are (start, end, depth);
    depth 0 marks a message, bundles count from 1."""
    stack = [(0, len(view), 1)]
    found = 0  # messages seen so far, decoded or not
    while stack:
        start, end, depth = stack.pop()
        if depth == 0:
            _add_message(bytes(view[start:end]), limits, packet)
            continue
        if end - start < 16 or bytes(view[start:start + 8]) != BUNDLE_TAG:
            raise OSCError("malformed", "bundle shorter than its header")
        children = []
        position = start + 16  # '#bundle\0' + timetag, which is ignored: bundles apply at once
        while position < end:
            if end - position < 4:
                raise OSCError("malformed", "bundle element size cut off")
            size = _INT32.unpack_from(view, position)[0]
            position += 4
            if size <= 0 or size % 4 or size > end - position:
                raise OSCError("malformed", f"bundle element size {size} is invalid")
            is_bundle = bytes(view[position:position + 8]) == BUNDLE_TAG
            if is_bundle and depth >= limits.max_depth:
                raise OSCError("too_deep", f"bundles nested deeper than {limits.max_depth}")
            if not is_bundle:
                found += 1
                if found > limits.max_messages:
                    raise OSCError("too_many_messages", f"more than {limits.max_messages} messages in one packet")
            children.append((position, position + size, depth + 1 if is_bundle else 0))
            position += size
        stack.extend(reversed(children))  # reversed: the stack pops them in order


def _add_message(data: bytes, limits: Limits, packet: Packet) -> None:
    try:
        packet.messages.append(decode_message(data, limits))
    except OSCError as exc:
        packet.errors.append(exc)


def decode_message(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Message:
    """One OSC message; OSCError for anything malformed or over the limits."""
    address, position = read_string(data, 0, limits.max_address_bytes, "address")
    if not address.startswith("/") or not address.isascii() or not address.isprintable():
        raise OSCError("bad_address", f"address {address[:64]!r} is not a printable ASCII OSC address")
    if position >= len(data):
        return Message(address, "", ())  # OSC 1.0 allows a missing type tag string
    tags, position = read_string(data, position, limits.max_arguments * 4 + 4, "typetags")
    if not tags.startswith(","):
        raise OSCError("malformed", "type tag string does not start with ','")
    tags = tags[1:]
    if sum(1 for tag in tags if tag not in "[]") > limits.max_arguments:
        raise OSCError("too_many_arguments", f"more than {limits.max_arguments} arguments")
    args, plain_tags, position = _read_arguments(data, position, tags, limits)
    if position != len(data):
        raise OSCError("malformed", f"{len(data) - position} bytes after the last argument")
    return Message(address, plain_tags, tuple(args))


def _read_arguments(data: bytes, position: int, tags: str, limits: Limits):
    args, plain_tags, depth = [], [], 0
    for tag in tags:
        if tag == "[":
            depth += 1
            if depth > limits.max_depth:
                raise OSCError("too_deep", f"arrays nested deeper than {limits.max_depth}")
            continue
        if tag == "]":
            depth -= 1
            if depth < 0:
                raise OSCError("malformed", "']' without '['")
            continue
        value, position = _read_argument(data, position, tag, limits)
        args.append(value)
        plain_tags.append(tag)
    if depth:
        raise OSCError("malformed", "'[' without ']'")
    return args, "".join(plain_tags), position


def _need(data: bytes, position: int, size: int, tag: str) -> None:
    if position + size > len(data):
        raise OSCError("malformed", f"argument '{tag}' cut off")


def _read_argument(data: bytes, position: int, tag: str, limits: Limits):
    if tag in "TFNI":
        return {"T": True, "F": False, "N": None, "I": IMPULSE}[tag], position
    if tag in ("s", "S"):
        return read_string(data, position, limits.max_string_bytes, "string")
    if tag in "ifcrm":
        _need(data, position, 4, tag)
        if tag == "i":
            value = _INT32.unpack_from(data, position)[0]
        elif tag == "f":
            value = _FLOAT32.unpack_from(data, position)[0]
        elif tag == "c":  # "an ascii character, sent as 32 bits": a printable one, else refused
            code = _UINT32.unpack_from(data, position)[0]
            if not 0x20 <= code <= 0x7E:
                raise OSCError("bad_type", f"char argument {code:#x} is not a printable ASCII character")
            value = chr(code)
        else:
            value = tuple(data[position:position + 4])
        return value, position + 4
    if tag in "hdt":
        _need(data, position, 8, tag)
        unpacker = {"h": _INT64, "d": _FLOAT64, "t": _UINT64}[tag]
        return unpacker.unpack_from(data, position)[0], position + 8
    if tag == "b":
        _need(data, position, 4, tag)
        size = _INT32.unpack_from(data, position)[0]
        if size < 0 or size > limits.max_blob_bytes:
            raise OSCError("too_large", f"blob of {size} bytes (limit {limits.max_blob_bytes})")
        _need(data, position + 4, size, tag)
        return bytes(data[position + 4:position + 4 + size]), position + 4 + _padded(size)
    raise OSCError("bad_type", f"unknown type tag {tag!r}")


def read_string(data: bytes, position: int, max_bytes: int, what: str) -> tuple[str, int]:
    """A NUL-terminated, 4-byte padded UTF-8 string at `position`; (text, next position)."""
    end = data.find(b"\x00", position, position + max_bytes + 1)
    if end < 0:
        if len(data) - position > max_bytes:
            raise OSCError("too_long", f"{what} longer than {max_bytes} bytes")
        raise OSCError("malformed", f"{what} not NUL-terminated")
    try:
        text = data[position:end].decode("utf-8")
    except UnicodeDecodeError:
        raise OSCError("bad_utf8", f"{what} is not valid UTF-8") from None
    next_position = position + _padded(end - position + 1)
    if next_position > len(data):
        raise OSCError("malformed", f"{what} padding cut off")
    return text, next_position


def _padded(size: int) -> int:
    return (size + 3) & ~3


# ---------------------------------------------------------------------------- encoding


def _encode_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    if b"\x00" in raw:
        raise ValueError(f"string: {text[:40]!r} contains a NUL character")
    return raw + b"\x00" * (4 - len(raw) % 4)


def encode_message(address: str, *args) -> bytes:
    """One OSC message; types from the Python values: bool T/F, int i (h beyond 32 bits),
    float f, str s, bytes b, None N, IMPULSE I. ValueError names what cannot be sent."""
    if not isinstance(address, str) or not address.startswith("/"):
        raise ValueError(f"address: {address!r} must start with '/'")
    tags, payload = [","], []
    for value in args:
        if isinstance(value, bool):
            tags.append("T" if value else "F")
        elif value is None:
            tags.append("N")
        elif value is IMPULSE:
            tags.append("I")
        elif isinstance(value, int):
            if -(2**31) <= value < 2**31:
                tags.append("i")
                payload.append(_INT32.pack(value))
            else:
                tags.append("h")
                payload.append(_INT64.pack(value))
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError(f"{address}: {value!r} is not a finite number")
            tags.append("f")
            payload.append(_FLOAT32.pack(value))
        elif isinstance(value, str):
            tags.append("s")
            payload.append(_encode_string(value))
        elif isinstance(value, (bytes, bytearray)):
            tags.append("b")
            payload.append(_INT32.pack(len(value)) + bytes(value) + b"\x00" * (-len(value) % 4))
        else:
            raise ValueError(f"{address}: cannot send a {type(value).__name__} ({value!r})")
    return _encode_string(address) + _encode_string("".join(tags)) + b"".join(payload)


def encode_bundle(elements: list[bytes], timetag: int = 1) -> bytes:
    """A bundle of already encoded messages or bundles; timetag 1 means 'immediately'."""
    parts = [BUNDLE_TAG, _UINT64.pack(timetag)]
    for element in elements:
        parts.append(_INT32.pack(len(element)))
        parts.append(element)
    return b"".join(parts)


# ---------------------------------------------------------------------------- stream framing

SLIP_END, SLIP_ESC, SLIP_ESC_END, SLIP_ESC_ESC = 0xC0, 0xDB, 0xDC, 0xDD


def slip_encode(packet: bytes) -> bytes:
    """OSC 1.1 SLIP framing (RFC 1055), double-END form."""
    body = packet.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc")
    return b"\xc0" + body + b"\xc0"


def slip_decode(frame: bytes) -> bytes:
    """The packet inside one SLIP frame (without its END bytes); OSCError for a bad escape."""
    if b"\xdb" not in frame:
        return frame
    out = bytearray()
    escaped = False
    for byte in frame:
        if escaped:
            if byte == SLIP_ESC_END:
                out.append(SLIP_END)
            elif byte == SLIP_ESC_ESC:
                out.append(SLIP_ESC)
            else:
                raise OSCError("malformed", f"bad SLIP escape 0x{byte:02x}")
            escaped = False
        elif byte == SLIP_ESC:
            escaped = True
        else:
            out.append(byte)
    if escaped:
        raise OSCError("malformed", "SLIP frame ends inside an escape")
    return bytes(out)
