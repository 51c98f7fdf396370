#!/usr/bin/env python3
"""A whole migration between two vmm processes, driven by QEMU's own Python QMP client
(qemu.qmp, from PyPI): the client QEMU's test suites and qmp-shell use, which nobody here
wrote. `cargo xtask ci` runs it with the interpreter of a virtual environment that has
qemu.qmp (.ci/run makes one).

Usage: qemu_qmp_migration.py PATH_TO_VMM
"""

import asyncio
import os
import subprocess
import sys
import tempfile

from qemu.qmp import ConnectError, ExecuteError, QMPClient


async def connect(path: str) -> QMPClient:
    client = QMPClient(os.path.basename(path))
    for _ in range(300):
        try:
            await client.connect(path)
            return client
        except ConnectError:
            # Not listening yet.
            await asyncio.sleep(0.02)
    await client.connect(path)
    return client


async def wait_event(client: QMPClient, name: str, status: str = None, timeout=60.0):
    """The first event NAME (with data.status STATUS) from now on; others are kept."""
    seen = []

    async def scan():
        async for ev in client.events:
            seen.append(ev)
            if ev["event"] == name and (status is None or ev["data"]["status"] == status):
                return ev
        return None

    ev = await asyncio.wait_for(scan(), timeout)
    return ev, seen


async def main(vmm: str) -> None:
    tmp = tempfile.mkdtemp(prefix="vmm-qemu-qmp-")
    src_qmp, dst_qmp = os.path.join(tmp, "src.qmp"), os.path.join(tmp, "dst.qmp")
    guest = ["--memory", "128M", "--range-size", "32M", "--serial", "none", "--progress", "never"]
    src = subprocess.Popen([vmm, "run", "--qmp", "unix:" + src_qmp] + guest)
    dst = subprocess.Popen(
        [vmm, "run", "--qmp", "unix:" + dst_qmp, "--incoming", "defer"] + guest)
    try:
        s = await connect(src_qmp)
        d = await connect(dst_qmp)
        assert s.greeting.QMP.version["qemu"]["major"] == 7, s.greeting

        status = await s.execute("query-status")
        assert status["status"] == "running", status
        assert (await d.execute("query-status"))["status"] == "inmigrate"

        # An error reply is an ExecuteError carrying QEMU's class.
        try:
            await s.execute("stop", {"bogus": 1})
            raise AssertionError("stop with a bogus argument was accepted")
        except ExecuteError as e:
            assert e.error_class == "GenericError", e
            assert "bogus" in str(e), e

        caps = {"capabilities": [{"capability": "events", "state": True}]}
        await s.execute("migrate-set-capabilities", caps)
        await d.execute("migrate-set-capabilities", caps)
        await s.execute("migrate-set-parameters", {"downtime-limit": 100})
        params = await s.execute("query-migrate-parameters")
        assert params["downtime-limit"] == 100, params

        incoming = await d.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        uri = incoming["uri"]
        src_events = asyncio.ensure_future(wait_event(s, "MIGRATION", "completed"))
        dst_events = asyncio.ensure_future(wait_event(d, "MIGRATION", "completed"))
        await asyncio.sleep(0)
        await s.execute("migrate", {"uri": uri})
        _, seen_s = await src_events
        _, seen_d = await dst_events
        names_s = [e["event"] + (":" + e["data"]["status"] if e["event"] == "MIGRATION" else "")
                   for e in seen_s]
        names_d = [e["event"] + (":" + e["data"]["status"] if e["event"] == "MIGRATION" else "")
                   for e in seen_d]
        for want in ["MIGRATION:active", "STOP", "MIGRATION:completed"]:
            assert want in names_s, names_s
        for want in ["MIGRATION:active", "RESUME", "MIGRATION:completed"]:
            assert want in names_d, names_d

        info = await s.execute("query-migrate")
        assert info["status"] == "completed", info
        assert info["ram"]["total"] == 128 << 20, info
        assert (await s.execute("query-status"))["status"] == "postmigrate"
        assert (await d.execute("query-status"))["status"] == "running"
        text = await d.execute("human-monitor-command", {"command-line": "info status"})
        assert text == "VM status: running\r\n", repr(text)

        for c in (s, d):
            await c.execute("quit")
            # The server closes the connection after quit, as QEMU does: the client's
            # reader sees the end of the stream.
            try:
                await c.disconnect()
            except EOFError:
                pass
        assert src.wait(30) == 0 and dst.wait(30) == 0, (src.returncode, dst.returncode)
        assert not os.path.exists(src_qmp) and not os.path.exists(dst_qmp)
        print("qemu.qmp: source events " + " ".join(names_s))
        print("qemu.qmp: destination events " + " ".join(names_d))
    finally:
        for p in (src, dst):
            if p.poll() is None:
                p.kill()
                p.wait()


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(sys.argv[1]), 120))
    print("qemu.qmp: the migration passed")
