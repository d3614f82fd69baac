"""The `sdbridge run` command line for the component's settings.

    options = BridgeOptions(transport="spout", osc_port=table.osc_port, status_port=table.osc_port + 2)
    argv = build_command(options)     # ['sdbridge', 'run', '--source', 'spout:sdbridge-in', ...]

Video goes TouchDesigner -> bridge on `input_name` and back on `output_name`: Spout on Windows,
Syphon on macOS (both through TouchDesigner's Syphon Spout In/Out TOPs), NDI anywhere (also
across machines).
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass

TRANSPORTS = ("spout", "syphon", "ndi")
MODES = ("img2img", "txt2img")
LIVE_LORA_SEPARATOR = "|"  # "C:/loras/ink.safetensors:0.8 | C:/loras/neon.safetensors"
MAX_LIVE_LORAS = 4  # the bridge's /sd/lora/1 .. /sd/lora/4
TRANSPORT_PLATFORMS = {"spout": ("win", "Windows"), "syphon": ("darwin", "macOS")}  # sys.platform prefix, name


@dataclass(frozen=True, kw_only=True)
class BridgeOptions:
    """What the component's Bridge page holds; validated on construction."""

    executable: str = "sdbridge"  # the sdbridge program (a path when it is not on PATH)
    transport: str = "spout"  # spout (Windows), syphon (macOS) or ndi
    input_name: str = "sdbridge-in"  # sender TouchDesigner publishes and the bridge reads
    output_name: str = "sdbridge-out"  # sender the bridge publishes and TouchDesigner reads
    model: str = ""  # --model ('' leaves the bridge's default / config file)
    width: int = 512
    height: int = 512
    prompt: str = ""  # --prompt for the first frames, before OSC arrives
    osc_port: int  # --osc-port: where the component sends parameters (the table's default port)
    osc_bind: str = "127.0.0.1"  # --osc-bind: 0.0.0.0 when TouchDesigner runs on another machine
    status_host: str = "127.0.0.1"  # where the bridge sends /sd/status (this machine, seen from the bridge)
    status_port: int  # --status-target port: the component's OSC In DAT
    config: str = ""  # --config show.toml (presets, anything else)
    mode: str = "img2img"  # --mode: img2img (TouchDesigner's picture turned) or txt2img (from the prompt alone)
    live_loras: str = ""  # --live-lora each: "FILE[:SCALE] | FILE[:SCALE]", strengths then on Lora1 .. Lora4
    extra: str = ""  # more flags, split like a shell would (on Windows, backslashes in paths kept)
    platform: str = sys.platform

    def __post_init__(self) -> None:
        if not self.executable.strip():
            raise ValueError("executable: give the path of the sdbridge program")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport: {self.transport!r} must be one of {', '.join(TRANSPORTS)}")
        prefix, system = TRANSPORT_PLATFORMS.get(self.transport, ("", ""))
        if not self.platform.startswith(prefix):
            raise ValueError(f"transport: {self.transport} exists only on {system}; use ndi here")
        for field in ("input_name", "output_name"):
            if not getattr(self, field).strip():
                raise ValueError(f"{field}: give a sender name")
        if self.input_name == self.output_name:
            raise ValueError(f"output_name: {self.output_name!r} must differ from input_name")
        for field in ("width", "height"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 64 or value % 8:
                raise ValueError(f"{field}: {value!r} must be a multiple of 8, at least 64")
        for field in ("osc_port", "status_port"):
            value = getattr(self, field)
            if not isinstance(value, int) or not 1 <= value <= 65535:
                raise ValueError(f"{field}: {value!r} must be a port number in 1..65535")
        if self.osc_port == self.status_port:
            raise ValueError(f"status_port: {self.status_port} must differ from osc_port")
        if self.mode not in MODES:
            raise ValueError(f"mode: {self.mode!r} must be one of {', '.join(MODES)}")
        loras = live_lora_list(self.live_loras)
        if len(loras) > MAX_LIVE_LORAS:
            raise ValueError(f"live_loras: {len(loras)} given; at most {MAX_LIVE_LORAS} (Lora1 .. Lora{MAX_LIVE_LORAS})")
        try:
            split_flags(self.extra, platform=self.platform)
        except ValueError as exc:
            raise ValueError(f"extra: {exc}") from None


def live_lora_list(text: str) -> list[str]:
    """'a.safetensors:0.8 | b.safetensors' -> ['a.safetensors:0.8', 'b.safetensors'] (empty parts dropped)."""
    return [part.strip() for part in str(text).split(LIVE_LORA_SEPARATOR) if part.strip()]


def split_flags(text: str, *, platform: str = sys.platform) -> list[str]:
    """Flags typed as one line, split like a shell: quotes group words. On Windows a backslash is
    a path's separator, not an escape (C:\\loras\\ink.safetensors stays whole), as cmd.exe reads it."""
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    if platform.startswith("win"):
        lexer.escape = ""
    return list(lexer)


def source_spec(options: BridgeOptions) -> str:
    return f"{options.transport}:{options.input_name}"


def sink_spec(options: BridgeOptions) -> str:
    return f"{options.transport}:{options.output_name}"


def build_command(options: BridgeOptions) -> list[str]:
    """argv for subprocess (no shell): executable, 'run', flags."""
    argv = [options.executable, "run", "--source", source_spec(options), "--sink", sink_spec(options),
            "--width", str(options.width), "--height", str(options.height),
            "--osc-port", str(options.osc_port), "--osc-bind", options.osc_bind,
            "--status-target", f"{options.status_host}:{options.status_port}"]
    if options.model.strip():
        argv += ["--model", options.model.strip()]
    if options.prompt.strip():
        argv += ["--prompt", options.prompt]
    if options.config.strip():
        argv += ["--config", options.config.strip()]
    if options.mode != "img2img":
        argv += ["--mode", options.mode]
    for lora in live_lora_list(options.live_loras):
        argv += ["--live-lora", lora]
    return argv + split_flags(options.extra, platform=options.platform)


def command_text(argv: list[str], *, platform: str = sys.platform) -> str:
    """The command as one line to paste into a terminal (the GPU machine's, for NDI setups)."""
    if platform.startswith("win"):
        import subprocess
        return subprocess.list2cmdline(argv)
    return shlex.join(argv)
