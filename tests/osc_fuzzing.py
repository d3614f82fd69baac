"""Packet generators shared by the OSC fuzz test and bench/osc_fuzz.py.

`valid_packets()` are well-formed messages and bundles for every address in the table;
`mutate(packet, rng)` breaks one in the ways the issue lists (truncation, bit flips, bad sizes,
non-UTF-8, deep nesting, huge sizes, future timetags, pathological wildcards).
"""

from __future__ import annotations

import random
import struct
import time

from bridge.control.osc import encode_bundle, encode_message
from bridge.control.table import addresses

PATHOLOGICAL_PATTERNS = (
    "/" + "*?" * 60 + "x",
    "/sd/" + "*" * 200,
    "/sd/" + "?*" * 40 + "{a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p}",
    "/sd/[!a-z" + "]" * 3,
    "/sd/{" + ",".join("x" * 3 for _ in range(60)) + "}",
    "/*/*/*/*/*/*/*/*/*/*/*/*/*/*/*/*",
    "/sd/g*d*n*c*e*n*o*r*m*x",
    "/{sd,xx}/{guidance,delta,seed}/{norm,x}",
    "/sd/[" + "a-z" * 80 + "]uidance",
)


def valid_messages(prefix: str = "/sd") -> list[bytes]:
    messages = []
    for address, (param, normalized) in addresses(prefix).items():
        if normalized:
            messages += [encode_message(address, 0.25), encode_message(address, 1)]
        elif param.kind == "string":
            messages += [encode_message(address, "a watercolor city"), encode_message(address, "é" * 300)]
        elif param.kind in ("float", "int"):
            messages += [encode_message(address, 1.5), encode_message(address, 3), encode_message(address, "0.5")]
        elif param.kind == "bool":
            messages += [encode_message(address, True), encode_message(address, 0)]
        elif param.kind == "int_list":
            messages += [encode_message(address, 10, 20, 30), encode_message(address, "32,45")]
        elif param.kind == "prompt_blend":
            messages.append(encode_message(address, "a cat", 0.25, "a dog", 0.75))
        elif param.kind == "seed_blend":
            messages += [encode_message(address, 7, 0.25, 42, 0.75), encode_message(address, "7", 1)]
        elif param.kind == "choice":
            messages.append(encode_message(address, "slerp"))
        elif param.kind == "cue":
            messages.append(encode_message(address, 1))
        else:
            messages += [encode_message(address), encode_message(address, 1)]
    return messages


def valid_packets(prefix: str = "/sd") -> list[bytes]:
    messages = valid_messages(prefix)
    bundles = [encode_bundle(messages[i:i + 4], timetag=(2**63) + i) for i in range(0, len(messages), 4)]
    bundles.append(encode_bundle([encode_bundle([messages[0]], timetag=2**64 - 1), messages[1]]))
    return messages + bundles


def nested_bundle(depth: int, inner: bytes) -> bytes:
    packet = inner
    for _ in range(depth):
        packet = encode_bundle([packet])
    return packet


def handmade_malformed() -> dict[str, bytes]:
    """One packet per failure the issue lists (and a few more), by name."""
    message = encode_message("/sd/guidance", 2.0)
    return {
        "empty": b"",
        "not_multiple_of_4": b"/sd\x00\x00",
        "non_utf8_string": b"/sd/prompt\x00\x00,s\x00\x00\xff\xfe\xfd\x00",
        "non_utf8_address": b"/\xff\xfe\x00,i\x00\x00\x00\x00\x00\x01",
        "unterminated_string": b"/sd/prompt\x00\x00,s\x00\x00abcd",
        "bundle_zero_size": b"#bundle\x00" + b"\x00" * 8 + b"\x00\x00\x00\x00" * 4,
        "bundle_negative_size": b"#bundle\x00" + b"\x00" * 8 + struct.pack(">i", -4) + message,
        "bundle_size_past_end": b"#bundle\x00" + b"\x00" * 8 + struct.pack(">i", 4096) + message,
        "bundle_truncated_header": b"#bundle\x00\x00\x00\x00\x00",
        "deep_nesting": nested_bundle(200, message),
        "nesting_just_over": nested_bundle(9, message),
        "huge_packet": message + b"\x00" * 70_000,
        "huge_string": encode_message("/sd/prompt", "x" * 10_000),
        "too_many_arguments": encode_message("/sd/t_index_list", *range(200)),
        "huge_blob_size": b"/sd/prompt\x00\x00,b\x00\x00" + struct.pack(">i", 2**31 - 1),
        "future_timetag": encode_bundle([message], timetag=2**64 - 1),
        "unknown_type": b"/sd/seed\x00\x00\x00\x00,x\x00\x00\x00\x00\x00\x01",
        "array_unbalanced": b"/sd/seed\x00\x00\x00\x00,[i\x00\x00\x00\x00\x01",
        "nan_guidance": b"/sd/guidance\x00\x00\x00\x00,f\x00\x00\x7f\xc0\x00\x00",
        "inf_guidance": b"/sd/guidance\x00\x00\x00\x00,f\x00\x00\x7f\x80\x00\x00",
        "trailing_bytes": message + b"\x00\x00\x00\x00",
        "many_messages": encode_bundle([message] * 1000),
        **{f"wildcard_{i}": encode_message(p, 1.0) for i, p in enumerate(PATHOLOGICAL_PATTERNS)},
    }


def mutate(packet: bytes, rng: random.Random) -> bytes:
    """One random corruption of `packet`."""
    data = bytearray(packet)
    choice = rng.randrange(9)
    if choice == 0 and data:  # flip bits
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif choice == 1:  # truncate (to any length, also not a multiple of 4)
        del data[rng.randrange(len(data) + 1):]
    elif choice == 2 and len(data) >= 4:  # overwrite a word with an extreme int32
        position = rng.randrange(0, len(data) - 3)
        data[position:position + 4] = struct.pack(">i", rng.choice((0, -1, -4, 2**31 - 1, -(2**31), 4096, 8)))
    elif choice == 3:  # splice in random bytes
        position = rng.randrange(len(data) + 1)
        data[position:position] = rng.randbytes(rng.choice((1, 3, 4, 8, 64)))
    elif choice == 4:  # non-UTF-8 inside
        position = rng.randrange(len(data) + 1)
        data[position:position] = b"\xff\xc3\x28\xa0"
    elif choice == 5:  # wrap in bundles, some nested deeply, future timetag
        return nested_bundle(rng.choice((1, 2, 7, 8, 9, 40)), bytes(data) + b"\x00" * (-len(data) % 4))
    elif choice == 6:  # a pathological pattern as the address
        return encode_message(rng.choice(PATHOLOGICAL_PATTERNS), rng.random())
    elif choice == 7:  # a random type tag string over real argument bytes
        tags = "".join(rng.choice("ifsbhdtcrmTFNI[]S") for _ in range(rng.randint(1, 12)))
        return encode_message("/sd/seed").replace(b",\x00\x00\x00", _osc_string("," + tags)) + rng.randbytes(16)
    else:  # random bytes of a random size
        return rng.randbytes(rng.choice((0, 4, 16, 100, 4096)))
    return bytes(data)


def _osc_string(text: str) -> bytes:
    raw = text.encode()
    return raw + b"\x00" * (4 - len(raw) % 4)


def mixed_packets(rng: random.Random, count: int, valid: list[bytes], invalid_share: float = 0.5):
    """`count` packets: about `invalid_share` of them corrupted valid ones."""
    for _ in range(count):
        packet = rng.choice(valid)
        yield mutate(packet, rng) if rng.random() < invalid_share else packet


# ---------------------------------------------------------------------------- flood

SENDER_SCRIPT = r"""
import random, socket, sys, time
sys.path.insert(0, sys.argv[1])
from osc_fuzzing import mixed_packets, valid_packets
port, rate, seconds = int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
packets = [p for p in mixed_packets(random.Random(5), 4000, valid_packets()) if len(p) <= 65507]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
per_tick, tick = max(1, int(rate / 100)), 0.01
start = time.monotonic()
sent = 0
while time.monotonic() - start < seconds:
    for _ in range(per_tick):
        try:
            sock.sendto(packets[sent % len(packets)], ("127.0.0.1", port))
        except OSError:
            pass
        sent += 1
    next_tick = start + (sent // per_tick) * tick
    delay = next_tick - time.monotonic()
    if delay > 0:
        time.sleep(delay)
print(sent)
"""


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


def render_stand_in(*, store, fps: float, seconds: float, work=None) -> list[float]:
    """A render loop at `fps`: wait for the deadline, take the store's pending values (as the
    inference thread does between frames), do `work()`; returns the frame intervals in ms."""
    period = 1.0 / fps
    ticks = []
    deadline = time.monotonic()
    end = deadline + seconds
    while deadline < end:
        deadline += period
        delay = deadline - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        ticks.append(time.monotonic())
        store.take()
        if work is not None:
            work()
    return [(b - a) * 1000 for a, b in zip(ticks, ticks[1:])]


def flood(*, port: int, store, rate: float, seconds: float, fps: float = 60.0, work=None) -> dict:
    """Send `rate` mixed packets per second to `port` from another process while the render
    stand-in ticks; frame interval percentiles and memory growth."""
    import os
    import subprocess
    import sys

    import gc

    here = os.path.dirname(os.path.abspath(__file__))
    render_stand_in(store=store, fps=fps, seconds=0.5, work=work)  # warm up
    gc.collect()
    rss_before = rss_bytes()
    samples = []  # RSS once a second during the flood

    def tick():
        if work is not None:
            work()
        if len(samples) < seconds + 1 and (not samples or time.monotonic() - samples[-1][0] >= 1.0):
            samples.append((time.monotonic(), rss_bytes()))

    sender = subprocess.Popen([sys.executable, "-c", SENDER_SCRIPT, here, str(port), str(rate), str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    try:
        intervals = render_stand_in(store=store, fps=fps, seconds=seconds, work=tick)
        sent = int(sender.communicate(timeout=seconds + 30)[0].strip() or 0)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait(5)
    rss_after = rss_bytes()
    ordered = sorted(intervals)
    return {
        "rate_per_second": rate, "seconds": seconds, "packets_sent": sent, "nominal_ms": 1000 / fps,
        "frame_interval_p50_ms": ordered[len(ordered) // 2], "frame_interval_p99_ms": ordered[int(len(ordered) * 0.99)],
        "frame_interval_max_ms": ordered[-1], "frames": len(ordered) + 1,
        "rss_growth_bytes": rss_after - rss_before, "rss_mib_each_second": [round(r / 2**20, 2) for _, r in samples],
    }
