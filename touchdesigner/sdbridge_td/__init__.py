"""TouchDesigner-independent logic of the sdbridge component (plain Python, tested on CI).

The extension (touchdesigner/extension.py) imports these modules; nothing here imports
TouchDesigner or the bridge. The parameter table arrives as the JSON of `sdbridge params --json`.

    table.py       the table: TouchDesigner parameter page plan, parameter value -> OSC message
    command.py     the `sdbridge run` command line from the component's settings
    status.py      /sd/status/* messages -> status values
    supervisor.py  start, watch, restart with backoff and stop the bridge process
"""

import sys

# command.py's @dataclass(kw_only=True) needs Python 3.10; TouchDesigner 2023.11 builds ship 3.11,
# 2022 builds 3.9, where the import would fail with a TypeError that names no version at all
MINIMUM_PYTHON = (3, 10)
MINIMUM_TOUCHDESIGNER = "2023.11"


def check_python(version=None) -> None:
    """ImportError that names the TouchDesigner build needed, on a Python older than MINIMUM_PYTHON."""
    version = tuple(sys.version_info if version is None else version)
    if version[:2] < MINIMUM_PYTHON:
        raise ImportError(f"sdbridge_td needs Python {MINIMUM_PYTHON[0]}.{MINIMUM_PYTHON[1]} or newer, that is "
                          f"TouchDesigner {MINIMUM_TOUCHDESIGNER} or later (Python 3.11); this is Python "
                          f"{version[0]}.{version[1]}")


check_python()
