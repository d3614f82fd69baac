"""TouchDesigner-independent logic of the sdbridge component (plain Python, tested on CI).

The extension (touchdesigner/extension.py) imports these modules; nothing here imports
TouchDesigner or the bridge. The parameter table arrives as the JSON of `sdbridge params --json`.

    table.py       the table: TouchDesigner parameter page plan, parameter value -> OSC message
    command.py     the `sdbridge run` command line from the component's settings
    status.py      /sd/status/* messages -> status values
    supervisor.py  start, watch, restart with backoff and stop the bridge process
"""
