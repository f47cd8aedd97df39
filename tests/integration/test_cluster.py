"""Two node agents in the lab: create, join with a key, refusals, ``cluster nodes``.

No guest: agents on host A and host B (their own namespaces and state
directories) reach each other only over the lab's migration-link addresses. One
test proves the happy path and every refusal the issue names — wrong
fingerprint, tampered token, expired token, replayed key, a client without a
cluster certificate (none at all, or one from another CA) — each refused with one
line and a non-zero exit, logged by the agent, and with nothing changed on either
node.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from lab.cluster import LabCluster
from lab.net import Lab
from migrate.cluster.address import parse_address
from migrate.cluster.joinkey import JoinKey
from migrate.cluster.state import StateDir, create_cluster

pytestmark = pytest.mark.integration


def _snapshot(path: Path) -> dict[str, str]:
    """Every file of a state directory but the agent's log, by content hash and mode."""
    if not path.exists():
        return {}
    return {
        p.name: f"{hashlib.sha256(p.read_bytes()).hexdigest()} {oct(p.stat().st_mode & 0o777)}"
        for p in sorted(path.iterdir())
        if p.is_file() and p.name != "agent.log"
    }


def _log(cluster: LabCluster, host_name: str) -> str:
    return (cluster.root / host_name / "agent.log").read_text()


def _refused(result: subprocess.CompletedProcess[str], needle: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("livemig: error: "), lines
    assert needle in lines[0], lines[0]
    return lines[0]


def _qemu_loads_the_certificates(state: Path, work: Path) -> None:
    """The node certificate serves as QEMU's tls-creds-x509 server and client cert."""
    names = {"ca-cert.pem": "ca.pem", "server-cert.pem": "node.pem",
             "server-key.pem": "node-key.pem", "client-cert.pem": "node.pem",
             "client-key.pem": "node-key.pem"}  # fmt: skip
    work.mkdir()
    for qemu_name, ours in names.items():
        (work / qemu_name).symlink_to(state / ours)
    qmp = '{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n'
    for endpoint in ("server", "client"):
        obj = f"tls-creds-x509,id=tls0,dir={work},endpoint={endpoint},verify-peer=on"
        result = subprocess.run(
            ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
             "-object", obj, "-qmp", "stdio"],
            input=qmp, capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
        assert result.returncode == 0 and '"return": {}' in result.stdout, result.stderr


def _refusal_counts(text: str) -> dict[str, float]:
    counts = {}
    for line in text.splitlines():
        match = re.fullmatch(r'livemig_agent_refusals_total\{reason="([^"]+)"\} (\S+)', line)
        if match:
            counts[match.group(1)] = float(match.group(2))
    return counts


def test_two_agents_join_refuse_and_list(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("the cluster lab needs root (network namespaces)")
    with Lab() as lab, LabCluster(lab, tmp_path) as cluster:
        a, b = lab.host_a, lab.host_b
        dir_a, dir_b = cluster.state_dir(a), cluster.state_dir(b)
        dir_c = cluster.state_dir(b, "c")  # a second would-be node on host B
        addr_a, addr_b = cluster.address(a), cluster.address(b)

        made = cluster.cli(a, "cluster", "create", "--state-dir", str(dir_a),
                           "--name", "a", "--address", addr_a)  # fmt: skip
        assert made.returncode == 0, made.stderr
        assert oct((dir_a / "ca-key.pem").stat().st_mode & 0o777) == "0o600"
        assert oct((dir_a / "node-key.pem").stat().st_mode & 0o777) == "0o600"
        cluster.start_agent(a)

        made = cluster.cli(a, "cluster", "join-key", "--state-dir", str(dir_a))
        assert made.returncode == 0, made.stderr
        assert len(made.stdout.splitlines()) == 1
        key_text = made.stdout.strip()
        key = JoinKey.decode(key_text)
        assert key.address == addr_a and key.token not in (dir_a / "tokens.json").read_text()

        def join(host_dir: Path, name: str, text: str) -> subprocess.CompletedProcess[str]:
            return cluster.cli(b, "cluster", "join", "--state-dir", str(host_dir),
                               "--name", name, "--address", addr_b, text)  # fmt: skip

        before_a = _snapshot(dir_a)

        # A damaged key (one character changed): caught by its check, nothing sent.
        flipped = key_text[:-3] + ("A" if key_text[-3] != "A" else "B") + key_text[-2:]
        _refused(join(dir_b, "b", flipped), "join key is damaged")

        # Wrong fingerprint, key well-formed: refused before the token is sent.
        wrong_fp = dataclasses.replace(key, ca_sha256=hashlib.sha256(b"other").hexdigest())
        _refused(join(dir_b, "b", wrong_fp.encode()), "refusing to send the token")
        assert "is not this cluster's" in _log(cluster, "a")

        # Tampered token (well-formed key): the agent does not know it.
        other_token = key.token[:-1] + ("A" if key.token[-1] != "A" else "B")
        tampered = dataclasses.replace(key, token=other_token)
        _refused(join(dir_b, "b", tampered.encode()), "join token unknown")
        assert "REFUSED" in _log(cluster, "a") and "join token unknown" in _log(cluster, "a")
        assert _snapshot(dir_a) == before_a and _snapshot(dir_b) == {}

        # The valid key.
        joined = join(dir_b, "b", key_text)
        assert joined.returncode == 0, joined.stderr
        assert "members: a, b" in joined.stdout
        assert not (dir_b / "ca-key.pem").exists() and not (dir_b / "tokens.json").exists()
        assert oct((dir_b / "node-key.pem").stat().st_mode & 0o777) == "0o600"
        cluster.start_agent(b)
        assert "JOINED b" in _log(cluster, "a")
        _qemu_loads_the_certificates(dir_b, tmp_path / "qemu-tls")

        # Replayed key: refused by A, nothing written on either side.
        before_a, before_b = _snapshot(dir_a), _snapshot(dir_b)
        _refused(join(dir_c, "c", key_text), "join token already used")
        # Expired key.
        short = cluster.cli(a, "cluster", "join-key", "--state-dir", str(dir_a), "--ttl-s", "1")
        assert short.returncode == 0, short.stderr
        before_a = _snapshot(dir_a)  # the new token's hash
        time.sleep(1.2)  # let the 1 s key expire (time passing is the point here)
        _refused(join(dir_c, "c", short.stdout.strip()), "join token expired")
        log_a = _log(cluster, "a")
        assert "join token already used" in log_a and "join token expired" in log_a
        assert _snapshot(dir_a) == before_a and _snapshot(dir_b) == before_b
        assert _snapshot(dir_c) == {}

        # A client without a certificate: TLS passes, every member route refuses.
        url = f"https://{addr_a}/v1/node"
        plain = cluster.python(b, "-m", "lab.cluster", "request", url)
        answer = json.loads(plain.stdout)
        assert answer["status"] == 403, answer
        assert "client certificate is required" in answer["body"]["error"]
        # A certificate from another cluster's CA: the TLS handshake is refused.
        foreign = StateDir(tmp_path / "foreign")
        create_cluster(foreign, "x", parse_address(addr_b))
        alien = cluster.python(b, "-m", "lab.cluster", "request", url,
                               "--cert", str(foreign.cert_path), "--key", str(foreign.key_path))  # fmt: skip
        assert "error" in json.loads(alien.stdout), alien.stdout
        log_a = _log(cluster, "a")
        assert "client certificate is required" in log_a
        assert "TLS handshake" in log_a and "REFUSED" in log_a
        assert _snapshot(dir_a) == before_a and _snapshot(dir_b) == before_b

        # Members see each other over mutual TLS.
        for host, state in ((a, dir_a), (b, dir_b)):
            listed = cluster.cli(host, "cluster", "nodes", "--state-dir", str(state), "--json")
            assert listed.returncode == 0, listed.stderr
            nodes = {n["name"]: n for n in json.loads(listed.stdout)["nodes"]}
            assert set(nodes) == {"a", "b"}
            for name, address in (("a", addr_a), ("b", addr_b)):
                node = nodes[name]
                assert node["reachable"] and node["address"] == address, node
                assert node["memory"]["available_bytes"] > 0 and node["cpu"]["vendor"]
        table = cluster.cli(b, "cluster", "nodes", "--state-dir", str(dir_b))
        assert table.returncode == 0 and "a (ca)" in table.stdout

        # Metrics count what happened (a member's certificate needed).
        metrics = cluster.python(b, "-m", "lab.cluster", "request", f"https://{addr_a}/metrics",
                                 "--cert", str(dir_b / "node.pem"), "--key", str(dir_b / "node-key.pem"))  # fmt: skip
        counts = _refusal_counts(json.loads(metrics.stdout)["body"])
        # the client may try the handshake twice (aiohttp retries a dropped connection)
        assert counts["tls-handshake"] >= 1 and counts["no-client-cert"] == 1, counts
        assert counts["token-used"] == counts["token-expired"] == counts["token-unknown"] == 1
        assert counts["ca-fingerprint"] == 1

        # `cluster remove b` on the CA's node: a's agent refuses b's (CA-signed)
        # certificate from then on, in one line, logged; refused requests change nothing.
        removed = cluster.cli(a, "cluster", "remove", "b", "--state-dir", str(dir_a))
        assert removed.returncode == 0 and "node b removed (members: a)" in removed.stdout, (
            removed.stderr
        )
        gone = cluster.python(b, "-m", "lab.cluster", "request", url,
                              "--cert", str(dir_b / "node.pem"), "--key", str(dir_b / "node-key.pem"))  # fmt: skip
        answer = json.loads(gone.stdout)
        assert answer["status"] == 403 and "node 'b'" in answer["body"]["error"], answer
        assert "is not a member of this cluster" in answer["body"]["error"], answer
        seen_from_b = cluster.cli(b, "cluster", "nodes", "--state-dir", str(dir_b), "--json")
        nodes = {n["name"]: n for n in json.loads(seen_from_b.stdout)["nodes"]}
        assert not nodes["a"]["reachable"] and "not a member" in nodes["a"]["error"], nodes["a"]
        assert "REFUSED" in _log(cluster, "a") and "is not a member" in _log(cluster, "a")

        assert cluster.stop_agent(a) == 0 and cluster.stop_agent(b) == 0
