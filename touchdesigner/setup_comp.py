"""Builds the sdbridge component inside a TouchDesigner project. Run once, in the Textport:

    import sys; sys.path.insert(0, r'C:/sdbridge/touchdesigner')
    import setup_comp; setup_comp.build(op('/project1'), sdbridge=r'C:/sdbridge/.venv/Scripts/sdbridge.exe')

It asks `sdbridge params --json` for the parameter table (or takes `params_json=` text), then
creates /project1/sdbridge: three custom pages (Bridge, Parameters, Status), the extension
(a Text DAT synced to extension.py), an OSC Out DAT, an OSC In DAT for /sd/status/*, a Parameter
Execute DAT, an Execute DAT, and the video path: In TOP -> Syphon Spout Out TOP / NDI Out TOP to
the bridge; Syphon Spout In TOP / NDI In TOP -> Switch TOP -> Out TOP from it. Running it again
replaces the component. Only documented TouchDesigner calls are used: COMP.create,
COMP.appendCustomPage, Page.append<Style>, Par members, Connector.connect, COMP.initializeExtensions.
"""

import os
import subprocess
import sys

FOLDER = os.path.dirname(os.path.abspath(__file__))
if FOLDER not in sys.path:
    sys.path.insert(0, FOLDER)

from sdbridge_td.component import component_pages  # noqa: E402
from sdbridge_td.table import load_table  # noqa: E402

PAR_EXEC = """# calls the component's extension; see touchdesigner/extension.py
def onValueChange(par, prev):
    parent().ext.SdbridgeExt.OnValueChange(par)

def onPulse(par):
    parent().ext.SdbridgeExt.OnPulse(par)
"""
FRAMES = """def onFrameStart(frame):
    parent().ext.SdbridgeExt.OnFrame()
"""
STATUS_CALLBACKS = """def onReceiveOSC(dat, rowIndex, message, byteData, timeStamp, address, args, peer):
    parent().ext.SdbridgeExt.OnStatus(address, args)
"""
OPERATORS = (  # (name, TouchDesigner type, x, y)
    ("params_json", "textDAT", -400, 400), ("SdbridgeExt", "textDAT", -200, 400), ("par_exec", "parameterexecuteDAT", 0, 400),
    ("frames", "executeDAT", 200, 400), ("osc_out", "oscoutDAT", 400, 400), ("status_in", "oscinDAT", 600, 400),
    ("status_callbacks", "textDAT", 600, 250),
    ("in1", "inTOP", -400, 0), ("spout_out", "syphonspoutoutTOP", -200, 100), ("ndi_out", "ndioutTOP", -200, -100),
    ("spout_in", "syphonspoutinTOP", 100, 100), ("ndi_in", "ndiinTOP", 100, -100), ("video_select", "switchTOP", 300, 0),
    ("out1", "outTOP", 500, 0),
)


def read_table_json(sdbridge):
    """The JSON of `sdbridge params --json`; RuntimeError with the reason when it cannot run."""
    try:
        done = subprocess.run([sdbridge, "params", "--json"], capture_output=True, text=True, timeout=60)
    except OSError as exc:
        raise RuntimeError(f"cannot run {sdbridge!r}: {exc.strerror or exc}; give sdbridge= its full path") from None
    if done.returncode != 0:
        raise RuntimeError(f"{sdbridge} params --json failed: {(done.stderr or done.stdout).strip()[:300]}")
    return done.stdout


def build(parent, *, sdbridge="sdbridge", name="sdbridge", params_json=None, types=None, platform=sys.platform):
    """Create (or replace) parent/<name>; returns the component."""
    text = params_json if params_json is not None else read_table_json(sdbridge)
    table = load_table(text)
    types = types or _td_types()
    old = parent.op(name)
    if old is not None:
        old.destroy()
    comp = parent.create(types["baseCOMP"], name)
    ops = {}
    for op_name, op_type, x, y in OPERATORS:
        ops[op_name] = comp.create(types[op_type], op_name)
        ops[op_name].nodeX, ops[op_name].nodeY = x, y
    _pages(comp, table, sdbridge, platform)
    _wire(comp, ops, text, table)
    _set_extension(comp, "op('./SdbridgeExt').module.SdbridgeExt(me)")
    comp.initializeExtensions()
    return comp


def _set_extension(comp, expression):
    """The first extension slot, promoted. TouchDesigner 2022 and later name it ext0object /
    ext0promote; older builds extension1 / promoteextension1 (a missing name raises AttributeError)."""
    if getattr(comp.par, "ext0object", None) is not None:
        comp.par.ext0object = expression
        comp.par.ext0promote = True
    else:
        comp.par.extension1 = expression
        comp.par.promoteextension1 = True


def _td_types():
    import td  # TouchDesigner's module: the operator classes (baseCOMP, textDAT, ...)

    return {op_type: getattr(td, op_type) for _, op_type, _, _ in OPERATORS} | {"baseCOMP": td.baseCOMP}


def _pages(comp, table, sdbridge, platform):
    pages = component_pages(table, platform=platform)
    folder_page = comp.appendCustomPage("Bridge")
    folder = folder_page.appendFolder("Folder", label="sdbridge_td folder")[0]
    folder.default = folder.val = FOLDER
    for page_name, pars in pages.items():
        page = folder_page if page_name == "Bridge" else comp.appendCustomPage(page_name)
        for spec in pars:
            _append(page, spec)
    comp.par.Executable = sdbridge


def _append(page, spec):
    par = getattr(page, "append" + spec.style)(spec.name, label=spec.label)[0]
    if spec.style == "Menu":
        par.menuNames = list(spec.menu)
        par.menuLabels = list(spec.menu)
    if spec.minimum is not None:
        par.min = par.normMin = spec.minimum
        par.clampMin = True
    if spec.maximum is not None:
        par.max = par.normMax = spec.maximum
        par.clampMax = True
    if spec.default is not None and spec.style != "Pulse":
        par.default = spec.default
        par.val = spec.default
    par.help = spec.help
    par.readOnly = spec.read_only


def _wire(comp, ops, table_text, table):
    ops["params_json"].text = table_text
    ext = ops["SdbridgeExt"]
    with open(os.path.join(FOLDER, "extension.py"), encoding="utf-8") as handle:
        ext.text = handle.read()
    ext.par.file = os.path.join(FOLDER, "extension.py").replace("\\", "/")
    ext.par.syncfile = True
    ops["par_exec"].text = PAR_EXEC
    ops["par_exec"].par.op = comp.path
    ops["par_exec"].par.pars = "*"
    ops["par_exec"].par.custom = True
    ops["par_exec"].par.builtin = False
    ops["par_exec"].par.valuechange = True
    ops["par_exec"].par.onpulse = True
    ops["frames"].text = FRAMES
    ops["frames"].par.framestart = True
    ops["osc_out"].par.address = "127.0.0.1"
    ops["osc_out"].par.port = table.osc_port
    ops["status_callbacks"].text = STATUS_CALLBACKS
    ops["status_in"].par.port = comp.par.Statusport.eval()
    ops["status_in"].par.callbacks = ops["status_callbacks"].path
    ops["spout_out"].inputConnectors[0].connect(ops["in1"])
    ops["ndi_out"].inputConnectors[0].connect(ops["in1"])
    ops["spout_in"].outputConnectors[0].connect(ops["video_select"])
    ops["ndi_in"].outputConnectors[0].connect(ops["video_select"])
    ops["out1"].inputConnectors[0].connect(ops["video_select"])
    spout = comp.par.Transport.eval() in ("spout", "syphon")  # the Syphon Spout TOPs: Spout on Windows, Syphon on macOS
    ops["spout_out"].par.sendername = comp.par.Inputname.eval()
    ops["spout_in"].par.sendername = comp.par.Outputname.eval()
    ops["ndi_out"].par.name = comp.par.Inputname.eval()
    for op_name in ("spout_out", "spout_in"):
        ops[op_name].par.active = spout
    for op_name in ("ndi_out", "ndi_in"):
        ops[op_name].par.active = not spout
    ops["video_select"].par.index = 0 if spout else 1
