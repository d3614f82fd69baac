"""`--zeroconf`: the control plane advertised over real mDNS. Multicast runs only inside a
network namespace this test makes itself (`unshare -rn`, loopback up with multicast on): there
the bridge's control plane advertises, and a separate process browses for it with its own mDNS
stack, resolves the services, then reads OSCQuery's HOST_INFO over real HTTP at the address and
port it found; when the plane closes, its goodbyes reach the browser."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from bridge.control import ControlSettings
from bridge.control.mdns import advertised_addresses
from test_control_plane import namespace_problem

ROOT = pathlib.Path(__file__).resolve().parent.parent

BROWSER = r"""
import json, sys, time, urllib.request
from zeroconf import IPVersion, ServiceBrowser, Zeroconf

TYPES = ("_oscjson._tcp.local.", "_osc._udp.local.", "_osc._tcp.local.")
zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
seen, gone = {}, set()

class Listener:
    def add_service(self, z, kind, name):
        info = z.get_service_info(kind, name, timeout=3000)
        seen[kind] = {"name": name, "port": info.port, "addresses": info.parsed_addresses(),
                      "server": info.server, "properties": {k.decode(): (v or b"").decode() for k, v in info.properties.items()}}
    def remove_service(self, z, kind, name):
        gone.add(kind)
    def update_service(self, z, kind, name):
        pass

browsers = [ServiceBrowser(zc, kind, Listener()) for kind in TYPES]
print("browsing", flush=True)
deadline = time.monotonic() + 20
while len(seen) < len(TYPES) and time.monotonic() < deadline:
    time.sleep(0.05)
query = seen.get("_oscjson._tcp.local.")
if query:
    url = f"http://{query['addresses'][0]}:{query['port']}/?HOST_INFO"
    with urllib.request.urlopen(url, timeout=5) as response:
        query["host_info"] = json.loads(response.read())
print(json.dumps({"seen": seen}), flush=True)
sys.stdin.readline()  # the plane closes now
deadline = time.monotonic() + 10
while len(gone) < len(seen) and time.monotonic() < deadline:
    time.sleep(0.05)
print(json.dumps({"gone": sorted(gone)}), flush=True)
zc.close()
"""

PLANE = r"""
import json, subprocess, sys, time
from bridge.control import ControlPlane, ControlSettings
from bridge.params import ParameterStore

browser = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
assert browser.stdout.readline().strip() == "browsing"
plane = ControlPlane(store=ParameterStore(), settings=ControlSettings(osc_port=0, zeroconf=True)).start()
print(json.dumps({"osc_port": plane.osc_port, "oscquery_port": plane.oscquery_port}), flush=True)
print(browser.stdout.readline().strip(), flush=True)
started = time.monotonic()
plane.close()
print(json.dumps({"close_seconds": time.monotonic() - started}), flush=True)
browser.stdin.write("closed\n")
browser.stdin.flush()
print(browser.stdout.readline().strip(), flush=True)
browser.wait(timeout=20)
# a stop while the services still probe (e.g. a model that fails to load at once): no long wait
plane = ControlPlane(store=ParameterStore(), settings=ControlSettings(osc_port=0, zeroconf=True)).start()
time.sleep(0.3)
started = time.monotonic()
plane.close()
print(json.dumps({"early_close_seconds": time.monotonic() - started}), flush=True)
"""


def test_the_control_plane_is_found_over_mdns_and_says_goodbye():
    problem = namespace_problem()
    if problem:
        pytest.skip(problem)
    setup = "ip link set lo up && ip link set lo multicast on && ip route add 224.0.0.0/4 dev lo"
    result = subprocess.run(["unshare", "-rn", "sh", "-c", f'{setup} && exec "$0" "$@"', sys.executable, "-c", PLANE,
                             BROWSER], cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    ports, found, closed, goodbyes, early = (json.loads(line) for line in result.stdout.strip().splitlines())
    seen = found["seen"]
    assert set(seen) == {"_oscjson._tcp.local.", "_osc._udp.local.", "_osc._tcp.local."}, result.stderr[-2000:]
    assert seen["_osc._udp.local."]["port"] == seen["_osc._tcp.local."]["port"] == ports["osc_port"]
    query = seen["_oscjson._tcp.local."]
    assert query["port"] == ports["oscquery_port"] and query["properties"] == {"txtvers": "1"}
    assert all(entry["addresses"] == ["127.0.0.1"] for entry in seen.values())  # bound to loopback: that only
    assert query["name"] == f"sdbridge on {query['server'].split('.')[0]} (port {ports['osc_port']})._oscjson._tcp.local."
    assert query["host_info"]["OSC_PORT"] == ports["osc_port"]  # the OSCQuery server found through mDNS
    assert closed["close_seconds"] < 2.0
    assert set(goodbyes["gone"]) == set(seen)  # the services were taken back at close
    assert early["early_close_seconds"] < 1.0, result.stderr[-2000:]


def test_advertised_addresses_follow_the_bind_address():
    interfaces = ["127.0.0.1", "192.168.1.20", "10.0.0.5", "::1", "fe80::1%eth0", "2001:db8::7"]
    assert advertised_addresses("127.0.0.1", interfaces) == ["127.0.0.1"]
    assert advertised_addresses("localhost", interfaces) == ["127.0.0.1"]
    assert advertised_addresses("192.168.1.20", interfaces) == ["192.168.1.20"]
    # every interface of the family: never link-local (it needs its scope), nor loopback for a LAN
    assert advertised_addresses("0.0.0.0", interfaces) == ["192.168.1.20", "10.0.0.5"]
    assert advertised_addresses("::", interfaces) == ["2001:db8::7"]  # a socket on :: may be IPv6 only
    assert advertised_addresses("0.0.0.0", ["127.0.0.1", "fe80::1"]) == ["127.0.0.1"]  # nothing else: this machine


def test_zeroconf_without_the_package_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "zeroconf", None)  # import fails, as where it is not installed
    with pytest.raises(ValueError, match=r"zeroconf: the zeroconf package is not installed: pip install "
                                         r"'sdbridge\[zeroconf\]'"):
        ControlSettings(zeroconf=True)
