"""SdbridgeExt: the TouchDesigner extension of the sdbridge component (thin glue).

Loaded by the component's `SdbridgeExt` Text DAT (synced to this file). All decisions live in
the plain-Python package sdbridge_td next to this file; this class only reads and writes
TouchDesigner parameters and operators:

- Parameters page change  -> OSC Out DAT `osc_out`.sendOSC(address, values)
- Bridge page pulses      -> start / stop the `sdbridge run` process (sdbridge_td.supervisor)
- OSC In DAT `status_in`  -> Status page (sdbridge_td.status), and all parameters re-sent
                             whenever the bridge comes (back) alive
- Execute DAT, each frame -> OnFrame(): supervisor.poll(), status timeout
"""

import importlib
import os
import socket
import sys
import tempfile
import time


class SdbridgeExt:
    def __init__(self, ownerComp):
        self.ownerComp = ownerComp
        folder = ownerComp.par.Folder.eval()
        if folder and folder not in sys.path:
            sys.path.insert(0, folder)
        import sdbridge_td.command, sdbridge_td.component, sdbridge_td.status, sdbridge_td.supervisor, sdbridge_td.table
        for module in (sdbridge_td.table, sdbridge_td.command, sdbridge_td.status, sdbridge_td.supervisor,
                       sdbridge_td.component):
            importlib.reload(module)  # pick up edits of the folder when the extension re-initialises
        self.lib = sdbridge_td
        self.table = sdbridge_td.table.load_table(ownerComp.op('params_json').text)
        self.page = sdbridge_td.table.parameter_page(self.table)
        self.names = {par.name for par in self.page}
        self.status = sdbridge_td.status.StatusBoard(prefix=self.table.prefix)
        self.supervisor = None
        self.was_alive = False

    # -- parameter callbacks (Parameter Execute DAT `par_exec`) --------------------------------

    def OnValueChange(self, par):
        if par.name in self.names:
            self._send_par(par.name, par.eval())
        elif par.name == 'Transport':
            self._apply_transport()

    def OnPulse(self, par):
        name = par.name
        if name == 'Start':
            self.Start()
        elif name == 'Stop':
            self.Stop()
        elif name == 'Sendall':
            self.SendAll()
        elif name in self.names:
            recall_of = name[:-len('recall')] if name.endswith('recall') else None
            self._send_par(name, getattr(self.ownerComp.par, recall_of).eval() if recall_of in self.names else 1)

    # -- status (OSC In DAT `status_in` callbacks) and frames (Execute DAT `frames`) -----------

    def OnStatus(self, address, args):
        self.status.update(address, list(args), now=time.monotonic())

    def OnFrame(self):
        now = time.monotonic()
        alive = self.status.alive(now)
        if alive and not self.was_alive:
            self.SendAll()  # the bridge (re)started: give it every current value
        self.was_alive = alive
        par = self.ownerComp.par
        for name, kind in self.lib.status.FIELDS:
            value = self.status.values.get(name)
            if value is not None:
                setattr(par, self.lib.table.td_name('status', name), value)
        par.Statusalive = 1 if alive else 0
        if self.supervisor is not None:
            par.Process = self.supervisor.poll()
            par.Message = self.supervisor.message

    # -- actions --------------------------------------------------------------------------------

    def Start(self):
        try:
            options = self.lib.component.bridge_options(self._values())
        except ValueError as exc:
            self._report(str(exc))
            return
        argv = self.lib.command.build_command(options)
        self.ownerComp.par.Command = self.lib.command.command_text(argv)
        self._apply_transport()
        out = self.ownerComp.op('osc_out')
        out.par.address, out.par.port = self.ownerComp.par.Bridgehost.eval(), options.osc_port
        self.ownerComp.op('status_in').par.port = options.status_port
        if not self.ownerComp.par.Launch.eval():
            self._report('not launched here: run the Command on the bridge machine')
            return
        log_path = os.path.join(tempfile.gettempdir(), 'sdbridge-touchdesigner.log')
        auto_restart = bool(self.ownerComp.par.Autorestart.eval())
        if self.supervisor is None:
            self.supervisor = self.lib.supervisor.Supervisor(command=argv, log_path=log_path, auto_restart=auto_restart)
        # Never waits here (this is TouchDesigner's main thread): a bridge still running is asked to
        # stop, and OnFrame's poll() starts the new one once it has exited or been killed.
        self.supervisor.restart(command=argv, auto_restart=auto_restart)
        self._report(self.supervisor.message + f' (log: {log_path})')

    def Stop(self):
        if self.supervisor is not None:
            self.supervisor.stop()
        self.status.clear()

    def SendAll(self):
        values = {name: getattr(self.ownerComp.par, name).eval() for name in self.names}
        try:
            messages = self.lib.table.snapshot_messages(self.table, values, page=self.page)
        except ValueError as exc:
            self._report(str(exc))
            return
        self._send(messages, 'all')

    def onDestroyTD(self):
        # re-initialising or quitting: no poll() will come to finish a stop, so kill now (no waiting)
        if self.supervisor is not None:
            self.supervisor.close()

    # -- helpers ----------------------------------------------------------------------------------

    def _values(self):
        names = [par.name for par in self.lib.component.bridge_page(self.table)] + ['Prompt']
        values = {}
        for name in names:  # a component made by an older setup_comp lacks the newer ones: their defaults
            par = getattr(self.ownerComp.par, name, None)
            if par is not None:
                values[name] = par.eval()
        return values

    def _send_par(self, name, value):
        try:
            messages = self.lib.table.osc_messages(self.table, name, value, page=self.page)
        except ValueError as exc:
            self._report(str(exc))
            return
        self._send(messages, name)

    def _send(self, messages, what):
        out = self.ownerComp.op('osc_out')
        for address, values in messages:
            out.sendOSC(address, values)

    def _apply_transport(self):
        comp = self.ownerComp
        spout = comp.par.Transport.eval() in ('spout', 'syphon')  # the Syphon Spout TOPs: Spout on Windows, Syphon on macOS
        comp.op('spout_out').par.active = spout
        comp.op('spout_in').par.active = spout
        comp.op('ndi_out').par.active = not spout
        comp.op('ndi_in').par.active = not spout
        comp.op('spout_out').par.sendername = comp.par.Inputname.eval()
        comp.op('spout_in').par.sendername = comp.par.Outputname.eval()
        comp.op('ndi_out').par.name = comp.par.Inputname.eval()
        comp.op('video_select').par.index = 0 if spout else 1
        if comp.par.Bridgehost.eval().strip() in ('127.0.0.1', 'localhost', ''):
            # NDI names senders "MACHINE (name)"; pick it from the NDI In TOP's menu if this differs
            machine = socket.gethostname().split('.')[0].upper()
            comp.op('ndi_in').par.name = f'{machine} ({comp.par.Outputname.eval()})'

    def _report(self, text):
        self.ownerComp.par.Message = text
