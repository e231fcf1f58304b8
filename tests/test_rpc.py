"""The real multi-process federation over torch RPC (TensorPipe) on 127.0.0.1.

Same numbers as the in-process transport for 1, 2 and 3 workers; the same logical bytes
and measured physical bytes; failing and dying workers stop the run with a message that
names them, within the round timeout; no process outlives its test. The wire-size model
and the launcher environment are checked without starting processes.
"""
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrpc.config import ConfigError, load_config
from fedrpc.messages import TrainReply, TrainRequest
from fedrpc.runtime import RankInfo, first_slurm_host, launch_info, run_local
from fedrpc.transport.rpc import (_as_sent, _storage_bytes, _TensorTablePickle,
                                  tensorpipe_transports, wire_bytes)
from launch import REPO, SMALL, Launch, assert_clean, free_port, rounds

def spawn(n: int, out: Path, *overrides: str, entry=("-m", "fedrpc"), env=None) -> Launch:
    """n ranks as our own processes (RANK/WORLD_SIZE/MASTER_* set here)."""
    port = str(free_port())
    cmd = [sys.executable, *entry, "run", "configs/quickstart.yaml", *SMALL,
           f"run.out_dir={out}", "fed.transport=rpc", *overrides]
    ranks = [(cmd, {"RANK": str(r), "WORLD_SIZE": str(n), "LOCAL_RANK": str(r),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in range(n)]
    return Launch(ranks, out / "logs", env or {})


def torchrun(n: int, out: Path, *overrides: str) -> Launch:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={n}", "-m", "fedrpc", "run", "configs/quickstart.yaml", *SMALL,
           f"run.out_dir={out}", "fed.transport=rpc", *overrides]
    return Launch([(cmd, {})], out / "logs", {})


# ---------------------------------------------------------------------- same numbers
@pytest.fixture(scope="module")
def federations(tmp_path_factory):
    """The same federation in one process, and over RPC with 2, 3 and 4 ranks."""
    root = tmp_path_factory.mktemp("rpc")
    run_local(load_config(None, SMALL + [f"run.out_dir={root / 'local'}"]))
    runs = {"local": (root / "local", None)}
    runs[2] = (root / "rpc2", spawn(2, root / "rpc2"))
    runs[3] = (root / "rpc3", torchrun(3, root / "rpc3"))
    (root / "probe4").mkdir()
    runs[4] = (root / "rpc4", spawn(4, root / "rpc4", entry=(str(REPO / "tests/rpc_probe.py"),),
                                    env={"FEDRPC_PROBE_DIR": str(root / "probe4")}))
    return runs


@pytest.mark.timeout(420)
def test_metrics_are_identical_to_the_local_run_for_1_2_3_workers(federations):
    for n in (2, 3, 4):
        out, launch = federations[n]
        assert_clean(launch)
        assert launch.returncodes and set(launch.returncodes) == {0}, launch.text(0)[-3000:]
    ref = rounds(federations["local"][0])
    assert len(ref) == 3 and all("metrics" in r for r in ref)
    ref_summary = json.load(open(federations["local"][0] / "summary.json"))
    for n in (2, 3, 4):
        out = federations[n][0]
        got = rounds(out)
        assert [r["metrics"] for r in got] == [r["metrics"] for r in ref], f"{n} ranks"
        assert [r["loss"] for r in got] == [r["loss"] for r in ref], f"{n} ranks"
        summary = json.load(open(out / "summary.json"))
        assert summary["test"] == ref_summary["test"]
        assert summary["runtime"]["world_size"] == n
        assert summary["runtime"]["tensorpipe_transports"] == ["uv"]
    assert json.load(open(federations[3][0] / "summary.json"))["runtime"]["launcher"] == "torchrun"


@pytest.mark.timeout(60)
def test_logical_bytes_equal_the_local_run_and_physical_bytes_are_measured(federations):
    ref = rounds(federations["local"][0])
    for n in (2, 3, 4):
        got = rounds(federations[n][0])
        for a, b in zip(got, ref):
            assert a["bytes"]["logical"] == b["bytes"]["logical"]
            phys = a["bytes"]["physical"]
            pairs = {f"0->{w}" for w in range(1, n)} | {f"{w}->0" for w in range(1, n)}
            assert set(phys) == pairs
            for pair in phys.values():
                # what crossed: tensors' storages + pickles, never less than the tensors
                assert pair["wire"] > 0 and pair["wire"] >= pair["payload"] > 0
            total = a["bytes"]["physical_total"]
            assert total["wire"] == sum(p["wire"] for p in phys.values())
        assert b["bytes"]["physical_total"]["wire"] is None      # local: nothing crossed


@pytest.mark.timeout(60)
def test_workers_never_load_content_or_encoders(federations):
    probe = federations[4][0].parent / "probe4"
    reports = {r: json.loads((probe / f"rank{r}.json").read_text()) for r in range(4)}
    assert "server_features" in reports[0]["calls"]
    for r in (1, 2, 3):
        assert reports[r]["calls"] == [] and reports[r]["heavy"] == []
        assert not any(m.split(".")[2] in ("builtin", "neural", "images")
                       for m in reports[r]["encoders_loaded"]), reports[r]
    # only rank 0 prints the per-round progress line
    out = federations[4][1]
    assert "round 2 " in out.text(0)
    assert all("round " not in out.text(r) for r in (1, 2, 3))


# ---------------------------------------------------------------------- failures
def spawn_failing(tmp_path, rank: int, mode: str, round_timeout_s: int):
    """3 ranks where worker `rank` fails in round 1 the way `mode` says (raise | exit |
    hang); see tests/failing_worker.py."""
    return spawn(3, tmp_path, f"runtime.round_timeout_s={round_timeout_s}",
                 entry=(str(REPO / "tests/failing_worker.py"),),
                 env={"FEDRPC_FAIL_RANK": str(rank), "FEDRPC_FAIL_MODE": mode,
                      "FEDRPC_FAIL_ROUND": "1"})


@pytest.mark.timeout(200)
def test_a_raising_worker_stops_the_run_and_is_named(tmp_path):
    launch = spawn_failing(tmp_path, 2, "raise", round_timeout_s=30)
    assert_clean(launch)
    assert launch.returncodes[0] == 1
    assert all(rc != 0 for rc in launch.returncodes)
    server = launch.text(0)
    assert ("fedrpc: error: worker rank 2: RuntimeError: injected failure in round 1 "
            "(round 1, train)") in server
    assert "Traceback" not in server                     # one clear line, no stack dump
    assert "injected failure" in launch.text(2)          # the worker logged its traceback
    assert launch.seconds < 30 + 60


@pytest.mark.timeout(200)
def test_a_dying_worker_stops_the_run_and_is_named(tmp_path):
    launch = spawn_failing(tmp_path, 1, "exit", round_timeout_s=30)
    assert_clean(launch)
    assert launch.returncodes[1] == 3
    assert launch.returncodes[0] == 1 and launch.returncodes[2] != 0
    server = launch.text(0)
    assert "fedrpc: error: worker rank 1: " in server
    assert "(round 1, train)" in server
    assert launch.seconds < 30 + 60


@pytest.mark.timeout(200)
def test_a_hanging_worker_times_out_and_is_named(tmp_path):
    launch = spawn_failing(tmp_path, 2, "hang", round_timeout_s=5)
    assert_clean(launch)
    assert all(rc != 0 for rc in launch.returncodes)
    assert ("fedrpc: error: worker rank 2: no reply within 5 s (runtime.round_timeout_s) "
            "(round 1, train)") in launch.text(0)
    assert launch.seconds < 5 + 60


# ---------------------------------------------------------------------- no processes
def _torch_table_pickle(tensors) -> int:
    """Length of the TorchScript pickle torch writes for a tensor list (its own writer)."""
    z = zipfile.ZipFile(io.BytesIO(torch._C._pickle_save(list(tensors))))
    return z.getinfo("archive/data.pkl").file_size


def _as_torch_sends(t: torch.Tensor) -> torch.Tensor:
    """torch's cloneSparseTensors rule: a view of < half of a storage >= 8 KiB is cloned."""
    st = t.untyped_storage().nbytes()
    return t.clone() if st >= 8192 and st >= 2 * t.numel() * t.element_size() else t


def test_tensor_table_pickle_size_matches_torch():
    base = torch.randn(100, 300)
    cases = [[torch.zeros(10)], [base, base[:10], torch.randn(3000)[5:10]],
             [torch.tensor(3.0)], [torch.zeros(70000)], [torch.zeros(3, 100000).t()],
             [torch.zeros(2, dtype=torch.bool), torch.zeros(3, dtype=torch.float64),
              torch.zeros(1, dtype=torch.int64)],
             [torch.randn(5, 4) for _ in range(150)],       # memo ids beyond 255
             [base] * 3, [base[i] for i in range(100)]]
    for ts in cases:
        want = _torch_table_pickle([_as_torch_sends(t) for t in ts])
        assert _TensorTablePickle.size([_as_sent(t) for t in ts]) == want


def test_views_send_their_storage_unless_torch_clones_them():
    big = torch.zeros(1000, 64)                      # 256 KB storage
    half = big[:600]                                  # 60% of it: the whole storage goes
    assert _storage_bytes([_as_sent(half)]) == big.numel() * 4
    row = big[3]                                      # < half of it: torch clones the row
    assert _storage_bytes([_as_sent(row)]) == 64 * 4
    small = torch.zeros(100)[:10]                     # storage < 8 KiB: sent whole
    assert _storage_bytes([_as_sent(small)]) == 400
    # views of one storage share it: it is sent once
    assert _storage_bytes([_as_sent(big), _as_sent(big[10:700])]) == big.numel() * 4


def test_wire_bytes_of_messages_cover_their_tensors():
    users = np.arange(5)
    shared = {"C": torch.randn(50, 8), "w": torch.randn(8)}
    req = TrainRequest(0, users, shared, 0.1, 1.0, 1.0)
    rep = TrainReply(0, users, {k: v.expand(5, *v.shape).clone() for k, v in shared.items()},
                     np.ones(5, dtype=np.int64), 0, 0)
    for msg, call in ((req, True), (rep, False)):
        w = wire_bytes(msg, call=call)
        assert msg.payload_bytes() < w < msg.payload_bytes() + 3000


# ---------------------------------------------------------------------- launch environment
def test_rank_info_from_launcher_environments():
    tr = RankInfo.from_env({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0",
                            "MASTER_ADDR": "n1", "MASTER_PORT": "29400",
                            "TORCHELASTIC_RUN_ID": "x"})
    assert (tr.rank, tr.world_size, tr.local_rank, tr.launcher, tr.name, tr.role) == \
        (2, 4, 0, "torchrun", "worker2", "worker")
    assert tr.init_method == "tcp://n1:29400"
    sl = RankInfo.from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "3", "SLURM_LOCALID": "0",
                            "SLURM_JOB_NODELIST": "gpu[07-09,12],cpu1", "SLURM_JOB_ID": "77"})
    assert (sl.rank, sl.world_size, sl.name, sl.master_addr, sl.launcher) == \
        (0, 3, "server", "gpu07", "slurm")
    assert 20000 <= sl.master_port < 50000
    mp = RankInfo.from_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "3",
                            "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "3",
                            "MASTER_PORT": "4000"})
    assert (mp.rank, mp.world_size, mp.local_rank, mp.master_addr, mp.launcher) == \
        (1, 3, 1, "127.0.0.1", "mpi")
    pm = RankInfo.from_env({"PMI_RANK": "3", "PMI_SIZE": "5", "MASTER_ADDR": "h",
                            "MASTER_PORT": "4000"})
    assert (pm.rank, pm.world_size, pm.launcher) == (3, 5, "mpi")
    assert first_slurm_host("node1") == "node1"
    assert RankInfo.from_env({}) is None


def test_rpc_launch_errors_are_clear():
    with pytest.raises(ConfigError, match="needs a launcher"):
        launch_info("rpc", {})
    with pytest.raises(ConfigError, match="at least 2 ranks"):
        launch_info("rpc", {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": "4000"})
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        launch_info("rpc", {"PMI_RANK": "0", "PMI_SIZE": "4", "MASTER_PORT": "4000"})
    with pytest.raises(ConfigError, match="MASTER_PORT"):
        launch_info("rpc", {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"})


def test_tensorpipe_transports_default_to_uv():
    assert tensorpipe_transports({}) == ["uv"]            # shm's reactor busy-polls
    assert tensorpipe_transports({"FEDRPC_TP_TRANSPORTS": "shm, uv"}) == ["shm", "uv"]
    with pytest.raises(ConfigError, match="FEDRPC_TP_TRANSPORTS"):
        tensorpipe_transports({"FEDRPC_TP_TRANSPORTS": "tcp"})


@pytest.mark.timeout(300)
@pytest.mark.parametrize("protocol", ["sparse", "secagg"])
def test_encoded_uploads_cross_torch_rpc_with_the_local_numbers_and_bytes(tmp_path, protocol):
    """Sparse rows, public keys and masked sums at fp16 (codecs' own message types, and
    secagg's second phase) go through TensorPipe: the same numbers and logical bytes as in
    one process, wire bytes measured."""
    over = [f"fed.protocol={protocol}", "fed.precision=fp16"]
    run_local(load_config(None, SMALL + [f"run.out_dir={tmp_path / 'local'}", *over]))
    launch = spawn(3, tmp_path / "rpc", *over)
    assert_clean(launch)
    assert set(launch.returncodes) == {0}, launch.text(0)[-3000:]
    ref, got = rounds(tmp_path / "local"), rounds(tmp_path / "rpc")
    assert len(got) == len(ref) == 3
    for a, b in zip(got, ref):
        assert (a["metrics"], a["loss"]) == (b["metrics"], b["loss"])
        assert a["bytes"]["logical"] == b["bytes"]["logical"]
        for pair in a["bytes"]["physical"].values():
            assert pair["wire"] >= pair["payload"] > 0
