"""Start, watch, restart (with backoff) and stop the `sdbridge run` process. No threads: the
owner calls poll() regularly (the TouchDesigner extension: once a frame).

    supervisor = Supervisor(command=argv, log_path="sdbridge.log")
    supervisor.start()
    supervisor.poll()     # each frame: restarts after a crash, reports state and message
    supervisor.stop()     # asks the bridge to stop (closes its stdin), kills it after the grace time
    supervisor.restart(command=new_argv)   # stop, then start anew once the old one is gone (in poll)

The bridge runs with `--stop-on-stdin-eof` and a pipe as its standard input: closing the pipe is
the stop request. SIGTERM / CTRL_BREAK_EVENT is sent as well, but from a GUI program without a
console (TouchDesigner on Windows) GenerateConsoleCtrlEvent fails, so the pipe is what works
there; whatever happens, a bridge still alive after the grace time is killed, never left holding
the GPU, the camera and the OSC port.

Exit status 0 (finished) and 2 (a bad flag, config, model or transport: restarting cannot help)
are final; anything else (a crash, a kill) restarts after 1, 2, 4 ... up to 30 seconds. A run
that lasted `stable_seconds` resets the backoff. Output goes to `log_path`; the last error line
becomes `message`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

FINAL_EXIT_CODES = {0: "finished", 2: "refused its settings"}
STOP_FLAG = "--stop-on-stdin-eof"  # `sdbridge run`: the end of its stdin stops it as SIGTERM does
STATES = ("stopped", "running", "waiting", "stopping", "failed")


@dataclass(frozen=True)
class Backoff:
    """Delay before restart number n (1-based): initial * factor**(n-1), at most maximum."""

    initial: float = 1.0
    factor: float = 2.0
    maximum: float = 30.0
    stable_seconds: float = 60.0  # a run this long resets the count

    def delay(self, attempt: int) -> float:
        return min(self.maximum, self.initial * self.factor ** max(0, attempt - 1))


def tail_lines(path: str, count: int = 20, *, max_bytes: int = 16384) -> list[str]:
    """The last `count` lines of a text file ([] when it does not exist)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-count:]


def last_error(lines: list[str]) -> str | None:
    """The last line that reads like an error (the bridge prints 'sdbridge run: error: ...')."""
    for line in reversed(lines):
        lowered = line.lower()
        if "error" in lowered or "traceback" in lowered or "exception" in lowered:
            return line.strip()
    return None


def with_stop_flag(command: list[str]) -> list[str]:
    """`command` with STOP_FLAG right after `run` (after everything when there is no `run`)."""
    command = list(command)
    if STOP_FLAG in command:
        return command
    at = command.index("run") + 1 if "run" in command else len(command)
    return command[:at] + [STOP_FLAG] + command[at:]


class Supervisor:
    """One bridge process at a time; keyword-only; start/stop/poll never block."""

    def __init__(self, *, command: list[str], log_path: str, backoff: Backoff = Backoff(), stop_grace: float = 5.0,
                 auto_restart: bool = True, spawn: Callable[..., subprocess.Popen] = subprocess.Popen,
                 clock: Callable[[], float] = time.monotonic, platform: str = sys.platform, cwd: str | None = None) -> None:
        if not command:
            raise ValueError("command: empty")
        self.command = with_stop_flag(command)
        self.log_path = log_path
        self.backoff, self.stop_grace, self.auto_restart = backoff, stop_grace, auto_restart
        self._spawn, self._clock, self._platform, self._cwd = spawn, clock, platform, cwd
        self._process: subprocess.Popen | None = None
        self._started_at = 0.0
        self._deadline = 0.0  # next start (waiting) or kill (stopping)
        self.state = "stopped"
        self.attempts = 0  # restarts since the last stable run
        self.starts = 0
        self.exit_code: int | None = None
        self.message = ""
        self.start_when_stopped = False  # start() or restart() while stopping: poll() starts it once gone

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Start now (also from waiting or failed); while stopping, as soon as the old process has
        exited or been killed (poll() starts it: nothing here waits)."""
        if self.state == "running":
            return
        if self.state == "stopping":
            self.start_when_stopped = True
            self.message = "restarting: waiting for the running bridge to stop"
            return
        self.attempts = 0
        self._launch()

    def restart(self, *, command: list[str] | None = None, auto_restart: bool | None = None) -> None:
        """Start with (new) settings: at once when no bridge runs, otherwise ask it to stop and let
        poll() start the new one once it has gone. Never blocks (TouchDesigner's main thread)."""
        if command is not None:
            self.command = with_stop_flag(command)
        if auto_restart is not None:
            self.auto_restart = auto_restart
        self.stop()
        self.start()

    def stop(self) -> None:
        """Ask the bridge to stop; poll() kills it when it has not gone after `stop_grace`."""
        self.start_when_stopped = False
        if self.state in ("waiting", "failed"):
            self.state, self.message = "stopped", "stopped"
            return
        if self.state != "running" or self._process is None:
            return
        self._terminate()
        self.state, self._deadline, self.message = "stopping", self._clock() + self.stop_grace, "stopping"

    def poll(self) -> str:
        now = self._clock()
        if self.state == "running" and self._process is not None and self._process.poll() is not None:
            self._exited(now)
        elif self.state == "stopping" and self._process is not None:
            if self._process.poll() is not None:
                self._stopped()
            elif now >= self._deadline:
                self._process.kill()  # always: a bridge left running holds the GPU, camera and port
                self._deadline = now + self.stop_grace
        elif self.state == "waiting" and now >= self._deadline:
            self._launch()
        return self.state

    def _stopped(self) -> None:
        """The process asked to stop has gone: stopped, or the start asked for meanwhile."""
        self._forget_process()
        self.state, self.message = "stopped", "stopped"
        if self.start_when_stopped:
            self.start_when_stopped = False
            self.start()

    def _forget_process(self) -> None:
        """The process has exited: keep its status, close our end of its stdin (one pipe a start)."""
        self._close_stdin()
        self.exit_code, self._process = self._process.returncode, None

    def _exited(self, now: float) -> None:
        self._forget_process()
        error = last_error(tail_lines(self.log_path))
        if now - self._started_at >= self.backoff.stable_seconds:
            self.attempts = 0
        if self.exit_code in FINAL_EXIT_CODES or not self.auto_restart:
            reason = FINAL_EXIT_CODES.get(self.exit_code, f"exited with status {self.exit_code}")
            self.state = "stopped" if self.exit_code == 0 else "failed"
            self.message = f"bridge {reason}" + (f": {error}" if error and self.exit_code != 0 else "")
            return
        self.attempts += 1
        delay = self.backoff.delay(self.attempts)
        self.state, self._deadline = "waiting", now + delay
        self.message = f"bridge exited with status {self.exit_code}; restart {self.attempts} in {delay:g} s" + (
            f" ({error})" if error else "")

    def _launch(self) -> None:
        # stdin: a pipe that only stop() closes; its end is the bridge's stop request (STOP_FLAG)
        kwargs: dict = {"stdin": subprocess.PIPE, "stderr": subprocess.STDOUT, "cwd": self._cwd}
        if self._platform.startswith("win"):  # own process group: CTRL_BREAK reaches the bridge only
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0) | getattr(
                subprocess, "CREATE_NO_WINDOW", 0)
        try:
            with open(self.log_path, "ab") as log:
                log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(self.command)}\n".encode())
                log.flush()
                self._process = self._spawn(self.command, stdout=log, **kwargs)
        except OSError as exc:
            self._process = None
            self.state, self.message = "failed", f"cannot start {self.command[0]!r}: {exc.strerror or exc}"
            return
        self._started_at = self._clock()
        self.state, self.exit_code, self.message = "running", None, "running"
        self.starts += 1

    def _terminate(self) -> None:
        """Ask the bridge to stop: close its stdin (works everywhere), then the signal too."""
        self._close_stdin()
        try:
            if self._platform.startswith("win") and hasattr(signal, "CTRL_BREAK_EVENT"):
                self._process.send_signal(signal.CTRL_BREAK_EVENT)
            else:
                self._process.terminate()
        except OSError:
            pass  # no console to send CTRL_BREAK from (a GUI host): the closed stdin is the request

    def _close_stdin(self) -> None:
        stdin = getattr(self._process, "stdin", None)
        if stdin is not None:
            try:
                stdin.close()
            except OSError:
                pass  # the bridge already gone: nothing to tell it

    def close(self) -> None:
        """For unload (the extension re-initialising, TouchDesigner quitting): close its stdin and
        kill it at once, without waiting (TouchDesigner's main thread must not stall)."""
        if self._process is not None:
            self._close_stdin()  # also when it exited on its own: the pipe is not left to the collector
            if self._process.poll() is None:
                self._process.kill()
        self._process = None
        self.start_when_stopped = False
        self.state = "stopped"
