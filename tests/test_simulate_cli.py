"""`customs-edge simulate scale` as a technician runs it: prints its URLs, serves frames, and injects
the faults its flags ask for."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from customs_edge.drivers.toledo import ToledoConfig, ToledoContinuous


def test_simulate_scale_serves_frames_and_scheduled_disconnects() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "customs_edge", "simulate", "scale", "--rate", "50",
                             "--disconnect-every", "1.5", "--corrupt-rate", "0.2", "--seed", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        urls = json.loads(proc.stdout.readline())["urls"]["scale"]
        assert urls["pty"].startswith("/dev/") and urls["socket"].startswith("socket://127.0.0.1:")
        d = ToledoContinuous("scale", ToledoConfig(driver="toledo-continuous", port=urls["socket"]))
        d.open()
        got, faults = 0, 0
        deadline = time.monotonic() + 15  # the first disconnect is due after 1.5 s
        while time.monotonic() < deadline and not (got > 50 and faults >= 1 and d.stats.corrupt > 3):
            try:
                if d.read() is not None:
                    got += 1
            except Exception:
                faults += 1  # the scheduled disconnect (the simulator keeps listening: reopen at once)
                d.close()
                d.open()
        d.close()
        assert got > 50
        assert faults >= 1
        assert d.stats.corrupt > 3  # about a fifth of the frames were damaged on the wire
    finally:
        proc.terminate()
        proc.wait(5)
    assert proc.returncode == 0
