"""One shutdown trial for the show-safety tests and bench/shutdown.py: start `sdbridge run` (tiny
model, OSC on a given port), send SIGINT or SIGTERM at a chosen kind of moment, time the exit,
then bind the OSC ports at once from this process.

Moments: "loading" (the model is being built), "step" (frames flowing, at a random time),
"prompt" (just after an OSC prompt change, while it is encoded and swapped in), "reconnect"
(the looping video file was deleted: the source is lost and being reopened with backoff).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MOMENTS = ("loading", "step", "prompt", "reconnect")


def free_port_pair() -> int:
    """A port P with P (UDP and TCP) and P + 1 (TCP) free now."""
    for _ in range(100):
        port = random.randint(20000, 40000)
        if all(can_bind(port + offset, kind) for offset, kind in ((0, socket.SOCK_DGRAM), (0, socket.SOCK_STREAM),
                                                                   (1, socket.SOCK_STREAM))):
            return port
    raise RuntimeError("no free port pair found")


def can_bind(port: int, kind: int) -> bool:
    """Whether a new server can bind 127.0.0.1:port now (TCP: a listener with SO_REUSEADDR, as
    sdbridge's own servers and every TCP server do, so connections in TIME_WAIT do not block it)."""
    sock = socket.socket(socket.AF_INET, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        if kind == socket.SOCK_STREAM:
            sock.listen(1)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def osc_string(text: str) -> bytes:
    data = text.encode() + b"\0"
    return data + b"\0" * (-len(data) % 4)


def send_prompt(port: int, text: str) -> socket.socket:
    """The prompt over UDP, and again over a TCP connection (OSC 1.0 length prefix) that is left
    open, so the process shuts down with a client connected; the caller closes the socket."""
    message = osc_string("/sd/prompt") + osc_string(",s") + osc_string(text)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(message, ("127.0.0.1", port))
    connection = socket.create_connection(("127.0.0.1", port), timeout=2)
    connection.sendall(len(message).to_bytes(4, "big") + message)
    return connection


def make_clip(path: Path, frames: int = 8, fps: int = 15, size=(96, 80)) -> None:
    import numpy as np

    from clips import write_clip

    pictures = [np.full((size[1], size[0], 3), (index * 30) % 255, np.uint8) for index in range(frames)]
    write_clip(path, pictures, fps=fps, codec="mpeg4")


def trial(*, moment: str, signum: int, port: int, workdir: Path, rng: random.Random, size: int = 128,
          timeout: float = 90.0) -> dict:
    """Run one trial; a dict with the moment, the signal, exit code, seconds from signal to exit,
    and whether the ports could be bound right after."""
    source = "testpattern"
    if moment == "reconnect":
        clip = workdir / f"clip-{port}.mp4"
        make_clip(clip)
        source = f"video:{clip}?loop=1"
    command = [sys.executable, "-m", "bridge.cli", "run", "--source", source, "--sink", "null", "--model", "random:tiny",
               "--width", str(size), "--height", str(size), "--device", "cpu", "--no-status", "--osc-port", str(port)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="2")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    lines: list[str] = []
    seen = {"building": threading.Event(), "running": threading.Event(), "lost": threading.Event()}

    def read_stderr() -> None:
        for line in process.stderr:
            lines.append(line)
            if "building random-weight model" in line:
                seen["building"].set()
            if "running:" in line:
                seen["running"].set()
            if "source lost" in line or "not available yet" in line:
                seen["lost"].set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    connection = None
    try:
        if moment == "loading":
            seen["building"].wait(timeout)
            time.sleep(rng.uniform(0.0, 0.3))
        else:
            seen["running"].wait(timeout)
            if moment == "step":
                time.sleep(rng.uniform(0.0, 1.5))
            elif moment == "prompt":
                time.sleep(rng.uniform(0.2, 0.8))
                connection = send_prompt(port, f"a prompt never seen before {rng.random()}")
                time.sleep(rng.uniform(0.0, 0.05))
            elif moment == "reconnect":
                time.sleep(0.3)
                clip.unlink()
                seen["lost"].wait(10)
                time.sleep(rng.uniform(0.0, 0.6))
        started = time.monotonic()
        process.send_signal(signum)
        try:
            code = process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        seconds = time.monotonic() - started
        rebind = {"udp": can_bind(port, socket.SOCK_DGRAM), "tcp": can_bind(port, socket.SOCK_STREAM),
                  "oscquery_tcp": can_bind(port + 1, socket.SOCK_STREAM)}
    finally:
        if connection is not None:
            connection.close()
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(2)
    return {"moment": moment, "signal": signal.Signals(signum).name, "exit_code": code, "exit_seconds": seconds,
            "was_running": seen["running"].is_set(), "source_was_lost": seen["lost"].is_set(),
            "ports_free": all(rebind.values()), "rebind": rebind,
            "stderr_tail": [line.rstrip() for line in lines[-3:]] if code != 0 else [],
            "warnings": [line.rstrip() for line in lines if "WARNING" in line]}
