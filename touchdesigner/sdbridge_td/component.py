"""The component's three custom pages, as plain data the setup script turns into parameters.

    pages = component_pages(table)       # {"Bridge": [TDPar...], "Parameters": [...], "Status": [...]}
    options = bridge_options(values, table)   # BridgeOptions from the Bridge page's current values
"""

from __future__ import annotations

import re
import sys
from typing import Any

from .command import MODES, TRANSPORTS, BridgeOptions
from .status import FIELDS
from .table import Table, TDPar, parameter_page, td_name

NAME_PATTERN = re.compile(r"^[A-Z][a-z0-9]*$")  # TouchDesigner custom parameter names
STATUS_PORT_OFFSET = 2  # OSC port + 1 is the bridge's OSCQuery port


def bridge_page(table: Table, *, platform: str = sys.platform) -> list[TDPar]:
    """Settings of the bridge process and the video path; pulses that act on it."""
    transport = "spout" if platform.startswith("win") else "syphon" if platform == "darwin" else "ndi"
    return [
        TDPar("Executable", "sdbridge program", "Str", default="sdbridge",
              help="path of sdbridge (e.g. C:/sdbridge/.venv/Scripts/sdbridge.exe)"),
        TDPar("Transport", "Video transport", "Menu", default=transport, menu=TRANSPORTS,
              help="spout: Windows, same machine; syphon: macOS, same machine; ndi: any OS, also across machines"),
        TDPar("Inputname", "Sender to the bridge", "Str", default="sdbridge-in"),
        TDPar("Outputname", "Sender from the bridge", "Str", default="sdbridge-out"),
        TDPar("Model", "Model", "Str", default="", help="--model: hub id, folder or .safetensors; empty: the bridge's default"),
        TDPar("Width", "Width", "Int", default=512, minimum=64, maximum=2048),
        TDPar("Height", "Height", "Int", default=512, minimum=64, maximum=2048),
        TDPar("Config", "Config file", "Str", default="", help="--config show.toml (presets and more)"),
        TDPar("Mode", "Mode", "Menu", default="img2img", menu=MODES,
              help="img2img: the picture sent to the bridge, turned by the prompt; txt2img: pictures from the prompt alone"),
        TDPar("Liveloras", "Live LoRAs", "Str", default="",
              help="--live-lora: 'FILE[:SCALE] | FILE[:SCALE]' (up to 4); Lora1 .. Lora4 then set their strengths"),
        TDPar("Extraargs", "Extra flags", "Str", default="", help="more `sdbridge run` flags"),
        TDPar("Bridgehost", "Bridge host", "Str", default="127.0.0.1",
              help="where OSC goes; another machine: run the Command there with --osc-bind 0.0.0.0"),
        TDPar("Oscport", "OSC port", "Int", default=table.osc_port, minimum=1, maximum=65535),
        TDPar("Statusport", "Status port", "Int", default=table.osc_port + STATUS_PORT_OFFSET, minimum=1, maximum=65535),
        TDPar("Statushost", "This machine (seen from the bridge)", "Str", default="127.0.0.1"),
        TDPar("Launch", "Start the bridge here", "Toggle", default=True,
              help="off: the bridge runs elsewhere (NDI across machines); the component only sends OSC"),
        TDPar("Autorestart", "Restart after a crash", "Toggle", default=True),
        TDPar("Start", "Start", "Pulse"),
        TDPar("Stop", "Stop", "Pulse"),
        TDPar("Sendall", "Send all parameters", "Pulse"),
        TDPar("Command", "Command", "Str", default="", read_only=True, help="the command line, to run by hand"),
    ]


def status_page() -> list[TDPar]:
    page = [TDPar(td_name("status", name), name.replace("_", " ").capitalize(),
                  {"i": "Int", "f": "Float", "s": "Str"}[kind], default={"i": 0, "f": 0.0, "s": ""}[kind],
                  read_only=True) for name, kind in FIELDS]
    return page + [TDPar("Process", "Process", "Str", default="stopped", read_only=True),
                   TDPar("Message", "Message", "Str", default="", read_only=True)]


def component_pages(table: Table, *, platform: str = sys.platform) -> dict[str, list[TDPar]]:
    pages = {"Bridge": bridge_page(table, platform=platform), "Parameters": parameter_page(table),
             "Status": status_page()}
    check_pages(pages)
    return pages


def check_pages(pages: dict[str, list[TDPar]]) -> None:
    """ValueError when two parameters share a name or a name is not a TouchDesigner name."""
    seen: set[str] = set()
    for page in pages.values():
        for par in page:
            if not NAME_PATTERN.match(par.name):
                raise ValueError(f"{par.name!r}: not a TouchDesigner parameter name (Capital + lower-case/digits)")
            if par.name in seen:
                raise ValueError(f"{par.name!r}: two parameters with this name")
            seen.add(par.name)


def bridge_options(values: dict[str, Any], *, platform: str = sys.platform) -> BridgeOptions:
    """BridgeOptions from the Bridge page (TouchDesigner names -> values) and the Prompt parameter."""
    return BridgeOptions(
        executable=str(values["Executable"]), transport=str(values["Transport"]),
        input_name=str(values["Inputname"]), output_name=str(values["Outputname"]), model=str(values["Model"]),
        width=int(values["Width"]), height=int(values["Height"]), prompt=str(values.get("Prompt", "")),
        osc_port=int(values["Oscport"]), osc_bind="127.0.0.1" if _local(values["Bridgehost"]) else "0.0.0.0",
        status_host=str(values["Statushost"]), status_port=int(values["Statusport"]), config=str(values["Config"]),
        mode=str(values.get("Mode", "img2img")), live_loras=str(values.get("Liveloras", "")),
        extra=str(values["Extraargs"]), platform=platform)


def _local(host: Any) -> bool:
    return str(host).strip() in ("127.0.0.1", "localhost", "::1", "")
