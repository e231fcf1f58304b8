"""A real two-node federation on one machine: two network namespaces joined by a veth
pair (10.77.x.1 and 10.77.x.2, on that link only), one "node" in each, `torchrun
--nnodes=2 --rdzv_backend c10d` started in each. The ranks of each node see only their
own namespace, so every message between the nodes crosses the veth link. Same metrics as
the in-process run. Skipped, with the reason, where namespaces cannot be made.
"""
import json
import shutil
import subprocess
import sys
import uuid

import pytest

from fedrpc.config import load_config
from fedrpc.runtime import run_local
from launch import SMALL, Launch, assert_clean, rounds


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_nodes():
    """Two namespaces and the veth pair between them; deleted at the end."""
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2) to make network namespaces")
    tag = uuid.uuid4().hex[:6]
    names, link = [f"fedrpc-{tag}-a", f"fedrpc-{tag}-b"], [f"fr{tag}a", f"fr{tag}b"]
    subnet = 16 + int(tag, 16) % 200
    addrs = [f"10.77.{subnet}.1", f"10.77.{subnet}.2"]
    made: list[str] = []
    try:
        for ns in names:
            r = _ip("netns", "add", ns)
            if r.returncode != 0:
                pytest.skip(f"network namespaces refused here: ip netns add: {r.stderr.strip()}")
            made.append(ns)
        steps = [("link", "add", link[0], "type", "veth", "peer", "name", link[1])]
        for ns, dev, addr in zip(names, link, addrs):
            steps += [("link", "set", dev, "netns", ns),
                      ("netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", dev),
                      ("netns", "exec", ns, "ip", "link", "set", dev, "up"),
                      ("netns", "exec", ns, "ip", "link", "set", "lo", "up")]
        for step in steps:
            r = _ip(*step)
            if r.returncode != 0:
                pytest.skip(f"veth pair refused here: ip {' '.join(step)}: {r.stderr.strip()}")
        yield list(zip(names, link, addrs))
    finally:
        for ns in made:
            _ip("netns", "del", ns)       # takes its end of the veth pair with it
        _ip("link", "del", link[0])        # in case it never moved into a namespace
        left = _ip("netns", "list").stdout
        assert not any(ns in left for ns in names), left


@pytest.mark.timeout(400)
def test_torchrun_on_two_namespaces_gives_the_local_numbers(two_nodes, tmp_path):
    (_, _, addr_a), _ = two_nodes
    port = 29500 + uuid.uuid4().int % 1000
    out = tmp_path / "two"
    argv = []
    for ns, dev, addr in two_nodes:
        host = int(addr == addr_a)        # node a hosts the rendezvous store
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run",
               "--nnodes=2", "--nproc_per_node=2", "--rdzv_backend=c10d",
               f"--rdzv_endpoint={addr_a}:{port}", f"--rdzv_id=two-{port}",
               f"--rdzv_conf=is_host={host}",
               f"--local_addr={addr}", "-m", "fedrpc", "run", "configs/quickstart.yaml",
               *SMALL, f"run.out_dir={out}", "fed.transport=rpc",
               "runtime.startup_timeout_s=120"]
        argv.append((cmd, {"TP_SOCKET_IFNAME": dev, "GLOO_SOCKET_IFNAME": dev}))
    launch = Launch(argv, out / "logs", {}, timeout=300)
    assert_clean(launch)
    assert launch.returncodes == [0, 0], launch.text(0)[-3000:] + launch.text(1)[-3000:]

    ref = tmp_path / "local"
    run_local(load_config(None, SMALL + [f"run.out_dir={ref}"]))
    got = rounds(out)
    assert [r["metrics"] for r in got] == [r["metrics"] for r in rounds(ref)]
    assert [r["loss"] for r in got] == [r["loss"] for r in rounds(ref)]
    rt = json.load(open(out / "summary.json"))["runtime"]
    assert (rt["world_size"], rt["launcher"]) == (4, "torchrun")
    # the ranks of each namespace are on its own address: the server reached both nodes
    phys = got[-1]["bytes"]["physical"]
    assert set(phys) == {f"0->{w}" for w in (1, 2, 3)} | {f"{w}->0" for w in (1, 2, 3)}
