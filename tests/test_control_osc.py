"""The OSC decoder/encoder, the wildcard matcher and the TCP framer: pure functions, no sockets."""

import struct
import time

import pytest
from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder

from bridge.control.osc import (
    IMPULSE, Limits, OSCError, decode_message, decode_packet, encode_bundle, encode_message, slip_encode,
)
from bridge.control.patterns import PatternError, compile_pattern, matches
from bridge.control.servers import StreamFramer
from osc_fuzzing import PATHOLOGICAL_PATTERNS, handmade_malformed, nested_bundle


def python_osc_message(address, *args):
    builder = OscMessageBuilder(address=address)
    for arg in args:
        builder.add_arg(arg)
    return builder.build().dgram


def test_decodes_what_python_osc_encodes():
    data = python_osc_message("/sd/prompt_blend", "a cat", 0.25, "é dog", 0.75, True, False, None, 7, b"\x01\x02")
    message = decode_message(data)
    assert message.address == "/sd/prompt_blend"
    assert message.typetags == "sfsfTFNib"
    assert message.args == ("a cat", 0.25, "é dog", 0.75, True, False, None, 7, b"\x01\x02")


def test_python_osc_parses_what_we_encode():
    data = encode_message("/sd/status/fps", 29.5, 3, "running", True, 2**40)
    parsed = OscMessage(data)
    assert parsed.address == "/sd/status/fps"
    assert parsed.params == [29.5, 3, "running", True, 2**40]


def test_bundles_nested_flatten_in_order_and_ignore_timetags():
    builder = OscBundleBuilder(IMMEDIATELY)
    builder.add_content(OscMessageBuilder("/a").build())
    inner = OscBundleBuilder(IMMEDIATELY)
    inner.add_content(OscMessageBuilder("/b").build())
    builder.add_content(inner.build())
    builder.add_content(OscMessageBuilder("/c").build())
    packet = decode_packet(builder.build().dgram)
    assert [m.address for m in packet.messages] == ["/a", "/b", "/c"]
    far_future = encode_bundle([encode_message("/x", 1)], timetag=2**64 - 1)
    started = time.monotonic()
    assert decode_packet(far_future).messages[0].args == (1,)
    assert time.monotonic() - started < 0.5  # applied now, no waiting for the timetag


def test_all_types_and_arrays():
    data = (b"/t\x00\x00,ihfdsSbTFNIcrmt[ii]\x00\x00\x00\x00" + struct.pack(">i", -5) + struct.pack(">q", 2**40)
            + struct.pack(">f", 1.5) + struct.pack(">d", 2.25) + b"ab\x00\x00" + b"cd\x00\x00"
            + struct.pack(">i", 3) + b"xyz\x00" + struct.pack(">I", 65) + b"\x01\x02\x03\x04" + b"\x90\x40\x7f\x00"
            + struct.pack(">Q", 7) + struct.pack(">ii", 1, 2))
    message = decode_message(data)
    assert message.typetags == "ihfdsSbTFNIcrmtii"
    assert message.args == (-5, 2**40, 1.5, 2.25, "ab", "cd", b"xyz", True, False, None, IMPULSE, "A",
                            (1, 2, 3, 4), (0x90, 0x40, 0x7F, 0), 7, 1, 2)


@pytest.mark.parametrize("code", [0x0, 0x0A, 0x7F, 0xD800, 0x10FFFF, 0xFFFFFFFF])
def test_a_char_argument_must_be_a_printable_ascii_character(code):
    """'c' used to be masked into any code point: NUL or a lone surrogate reached the prompt,
    past the UTF-8 check every string gets, and failed in the text encoder."""
    with pytest.raises(OSCError, match="bad_type: char argument"):
        decode_message(b"/sd/prompt\x00\x00,c\x00\x00" + struct.pack(">I", code))
    assert decode_message(b"/sd/prompt\x00\x00,c\x00\x00" + struct.pack(">I", 0x7E)).args == ("~",)


def test_missing_type_tags_mean_no_arguments():
    assert decode_message(b"/sd/pause\x00\x00\x00").args == ()


@pytest.mark.parametrize("name,packet", sorted(handmade_malformed().items()))
def test_handmade_malformed_packets_raise_only_oscerror(name, packet):
    started = time.perf_counter()
    try:
        decode_packet(packet)
    except OSCError as exc:
        assert exc.reason in {"malformed", "too_large", "too_deep", "too_long", "too_many_arguments",
                              "too_many_messages", "bad_utf8", "bad_type", "bad_address"}
    assert time.perf_counter() - started < 0.5


def test_limits_are_exact():
    limits = Limits(max_depth=3, max_string_bytes=8, max_arguments=2, max_messages=2)
    message = encode_message("/a", 1)
    decode_packet(nested_bundle(3, message), limits)
    with pytest.raises(OSCError, match="too_deep"):
        decode_packet(nested_bundle(4, message), limits)
    decode_message(encode_message("/a", "x" * 8), limits)
    with pytest.raises(OSCError, match="too_long"):
        decode_message(encode_message("/a", "x" * 9), limits)
    with pytest.raises(OSCError, match="too_many_arguments"):
        decode_message(encode_message("/a", 1, 2, 3), limits)
    with pytest.raises(OSCError, match="too_many_messages"):
        decode_packet(encode_bundle([message] * 3), limits)
    with pytest.raises(ValueError, match="max_depth"):
        Limits(max_depth=0)


def test_a_bad_element_does_not_spoil_its_bundle():
    bad = b"/sd/prompt\x00\x00,s\x00\x00\xff\xfe\x00\x00"
    packet = decode_packet(encode_bundle([encode_message("/a", 1), bad, encode_message("/b", 2)]))
    assert [m.address for m in packet.messages] == ["/a", "/b"]
    assert [e.reason for e in packet.errors] == ["bad_utf8"]


def test_encoder_refuses_what_osc_cannot_carry():
    with pytest.raises(ValueError, match="finite"):
        encode_message("/a", float("nan"))
    with pytest.raises(ValueError, match="NUL"):
        encode_message("/a", "x\x00y")
    with pytest.raises(ValueError, match="address"):
        encode_message("a")


def _match(pattern, address):
    return matches(compile_pattern(pattern), tuple(address[1:].split("/")))


@pytest.mark.parametrize("pattern,address,expected", [
    ("/sd/guidance", "/sd/guidance", True),
    ("/sd/gui*", "/sd/guidance", True),
    ("/sd/*", "/sd/guidance", True),
    ("/sd/*", "/sd/guidance/norm", False),  # '*' does not cross '/'
    ("/*/*/norm", "/sd/guidance/norm", True),
    ("/sd/guid?nce", "/sd/guidance", True),
    ("/sd/guid?nce", "/sd/guidnce", False),
    ("/sd/[gd]elta", "/sd/delta", True),
    ("/sd/[!d]elta", "/sd/delta", False),
    ("/sd/[a-e]elta", "/sd/delta", True),
    ("/sd/{seed,delta}", "/sd/delta", True),
    ("/sd/{seed,delta}", "/sd/prompt", False),
    ("/sd/de{,l}ta", "/sd/delta", True),
    ("/sd/*a*a*", "/sd/guidance", False),
    ("/sd/*i*a*", "/sd/guidance", True),
    ("/sd//prompt", "/sd/prompt", False),
])
def test_wildcards(pattern, address, expected):
    assert _match(pattern, address) is expected


def test_character_ranges_are_kept_as_ranges_not_expanded():
    """A bundle of 128 patterns of 80 ranges each used to expand every range character by
    character, packet after packet: 55-67 ms of CPU per 34 KB packet."""
    (_, part) = compile_pattern("/sd/[" + " -~" * 80 + "]*")
    assert part.tokens[0].ranges == ((0x20, 0x7E),) and part.tokens[0].chars == frozenset()
    assert _match("/sd/[a-eg]uidance", "/sd/guidance") and not _match("/sd/[!a-z]uidance", "/sd/guidance")
    assert _match("/sd/[x-zd-f]elta", "/sd/delta") and not _match("/sd/[x-z]elta", "/sd/delta")


@pytest.mark.parametrize("pattern", ["/sd/[abc", "/sd/{a,b", "/sd/a]", "nostartslash",
                                     "/" + "?" * 40, "/{" + ",".join("abcdefghijklmnopqrstuvwxyz0123456789") + "}"])
def test_bad_or_too_complex_patterns_are_refused(pattern):
    with pytest.raises(PatternError):
        compile_pattern(pattern)


def test_pathological_patterns_take_microseconds_not_exponential_time():
    target = tuple("sd/similarity/threshold/norm".split("/"))
    for pattern in PATHOLOGICAL_PATTERNS + ("/" + "*a" * 15 + "b",):
        started = time.perf_counter()
        try:
            matches(compile_pattern(pattern), target)
        except PatternError:
            pass
        assert time.perf_counter() - started < 0.05, pattern


def test_framer_length_prefixed_in_pieces():
    framer = StreamFramer(max_packet_bytes=1024)
    message = encode_message("/sd/seed", 5)
    stream = struct.pack(">i", len(message)) + message + struct.pack(">i", len(message)) + message
    packets = []
    for byte in stream:  # one byte at a time
        packets += framer.feed(bytes([byte]))
    assert packets == [message, message]


def test_framer_length_prefix_over_limit_closes():
    framer = StreamFramer(max_packet_bytes=64)
    with pytest.raises(OSCError, match="length prefix"):
        framer.feed(struct.pack(">i", 2**31 - 1))


def test_framer_slip_with_escapes_and_oversized_frames():
    framer = StreamFramer(max_packet_bytes=64)
    message = encode_message("/sd/prompt", "\u00c0\u00db")  # UTF-8 bytes include 0xC3 0x80, 0xC3 0x9B
    tricky = encode_message("/b", b"\xc0\xdb\xc0")
    stream = slip_encode(message) + slip_encode(b"\x00" * 400) + slip_encode(tricky) + b"\xc0\xdb\x01\xc0"
    assert framer.feed(stream) == [message, tricky]
    assert [e.reason for e in framer.take_errors()] == ["too_large", "malformed"]
    endless = StreamFramer(max_packet_bytes=64)
    for _ in range(100):  # a frame that never ends holds bounded memory
        endless.feed(b"/" + b"x" * 1000)
    assert len(endless._buffer) < 2000
