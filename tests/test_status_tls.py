"""`status` and `watch` against the shipped TLS broker config and ACL: a unit's own certificate may not read its
status, an operator's may; records are read with a hub-like identity."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import unit_dict, wait_for
from tests.fleet import AgentProc
from tests.test_tls import Broker, broker, pki, scale_urls, tls_keys  # noqa: F401  (fixtures)

pytestmark = pytest.mark.broker


def identity(certs: Path, name: str) -> list[str]:
    return ["--tls-cert", str(certs / f"{name}.crt"), "--tls-key", str(certs / f"{name}.key")]


def test_status_and_watch_over_tls_with_the_identities_the_acl_allows(tmp_path: Path, pki: Path,  # noqa: F811
                                                                      broker: Broker,  # noqa: F811
                                                                      scale_urls: dict[str, str]) -> None:  # noqa: F811
    cfg = unit_dict(tmp_path, scale_urls["socket"], broker.port, device_id="dev-a", sync=tls_keys(pki, "dev-a"),
                    health_interval_s=1.0)
    agent = AgentProc(cfg, tmp_path).start()
    watch = None
    try:
        wait_for(Path(cfg["outbox"]["path"]).exists, 60, "the agent's outbox")

        def status(*extra: str) -> dict[str, object]:
            res = subprocess.run([sys.executable, "-m", "customs_edge", "status", "--config", str(agent.path),
                                  "--json", *extra], capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, res.stderr
            got: dict[str, object] = json.loads(res.stdout)
            return got

        op = wait_for(lambda: (s := status(*identity(pki, "op-1")))["health"] and s, 60, "status as op-1")
        assert op["broker"] == {"address": f"127.0.0.1:{broker.port}", "error": None}
        # the unit's own certificate: never used (the broker takes its name as client id: a takeover)
        own = status()
        assert own["status"] is None and own["health"] is None
        assert "would take the running unit's session over" in str(own["broker"])
        res = subprocess.run([sys.executable, "-m", "customs_edge", "watch", "--config", str(agent.path)],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and "would take the running unit's session over" in res.stderr
        sync = wait_for(lambda: (s := status(*identity(pki, "op-1")))["status"] and s, 60, "the status")["status"]
        assert isinstance(sync, dict) and sync["sync"]["connects"] == 1  # the agent was never kicked off

        watch = subprocess.Popen([sys.executable, "-m", "customs_edge", "watch", "--config", str(agent.path),
                                  *identity(pki, "hub-1")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert watch.stdout is not None
        first = watch.stdout.readline()  # blocks until a record comes: the test's timeout bounds it
        assert first.split()[1].startswith("#") and first.split()[3] in ("weighing", "weight_summary"), first
        watch.send_signal(signal.SIGINT)
        assert watch.wait(30) == 0
    finally:
        if watch is not None and watch.poll() is None:
            watch.kill()
            watch.wait()
        agent.kill9()
