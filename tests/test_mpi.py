"""The federation under mpiexec (pip mpich): fed.transport=mpi, and fed.transport=rpc with
its rendezvous shared over MPI. Same numbers as the in-process run; bytes counted as
sent; failing and SIGKILLed workers end the run, non-zero, named, with nothing left.
The serialisation is checked without starting processes."""
import json
import pickle
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrpc.config import ConfigError, load_config
from fedrpc.messages import TrainReply, TrainRequest
from fedrpc.runtime import launch_info, run_local
from fedrpc.transport.mpi import buffer_sizes, decode, encode, wire_bytes
from launch import REPO, SMALL, Launch, assert_clean, mpich_shm_cleanup, rounds  # noqa: F401

MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or \
    shutil.which("mpiexec")
needs_mpiexec = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec: pip install "
                                                          "'fedrpc[mpi]' (mpi4py, mpich)")


pytestmark = pytest.mark.usefixtures("mpich_shm_cleanup")
def mpiexec(n: int, out: Path, *overrides: str, entry=("-m", "fedrpc"), env=None,
            transport="mpi") -> Launch:
    cmd = [MPIEXEC, "-n", str(n), sys.executable, *entry, "run", "configs/quickstart.yaml",
           *SMALL, f"run.out_dir={out}", f"fed.transport={transport}", *overrides]
    return Launch([(cmd, {})], out / "logs", env or {})


# ---------------------------------------------------------------------- same numbers
@pytest.fixture(scope="module")
def federations(tmp_path_factory):
    root = tmp_path_factory.mktemp("mpi")
    run_local(load_config(None, SMALL + [f"run.out_dir={root / 'local'}"]))
    rpc3 = root / "rpc3"                     # launchers/mpi.sh, RPC rendezvous over MPI
    script = Launch([(["bash", "launchers/mpi.sh", "configs/quickstart.yaml", *SMALL,
                       f"run.out_dir={rpc3}"], {})], rpc3 / "logs",
                    {"MPIEXEC": MPIEXEC, "PYTHON": sys.executable, "TRANSPORT": "rpc"})
    return {"local": (root / "local", None),
            "mpi3": (root / "mpi3", mpiexec(3, root / "mpi3")),
            "rpc3": (rpc3, script)}


@needs_mpiexec
@pytest.mark.timeout(400)
def test_mpiexec_runs_give_the_local_runs_numbers(federations):
    ref = rounds(federations["local"][0])
    ref_test = json.load(open(federations["local"][0] / "summary.json"))["test"]
    for key, transport in (("mpi3", "mpi"), ("rpc3", "rpc")):
        out, launch = federations[key]
        assert_clean(launch)
        assert launch.returncodes == [0], launch.text(0)[-3000:]
        got = rounds(out)
        assert len(got) == 3
        assert [r["metrics"] for r in got] == [r["metrics"] for r in ref], key
        assert [r["loss"] for r in got] == [r["loss"] for r in ref], key
        summary = json.load(open(out / "summary.json"))
        assert summary["test"] == ref_test
        rt = summary["runtime"]
        assert (rt["transport"], rt["launcher"], rt["world_size"]) == (transport, "mpi", 3)


@needs_mpiexec
@pytest.mark.timeout(60)
def test_mpi_bytes_are_the_local_logical_bytes_and_what_mpi_was_handed(federations):
    ref = rounds(federations["local"][0])
    got = rounds(federations["mpi3"][0])
    for a, b in zip(got, ref):
        assert a["bytes"]["logical"] == b["bytes"]["logical"]
        phys = a["bytes"]["physical"]
        assert set(phys) == {"0->1", "0->2", "1->0", "2->0"}
        for pair in phys.values():
            assert pair["messages"] == 2                      # train + eval
            # tensors out of band, plus a pickle of names, shapes and dtypes
            assert pair["payload"] < pair["wire"] < pair["payload"] + 2000
        assert a["bytes"]["physical_total"]["wire"] == sum(p["wire"] for p in phys.values())


# ---------------------------------------------------------------------- failures
def mpiexec_failing(tmp_path, rank: int, mode: str, round_timeout_s: int) -> Launch:
    return mpiexec(3, tmp_path, f"runtime.round_timeout_s={round_timeout_s}",
                   entry=(str(REPO / "tests/failing_worker.py"),),
                   env={"FEDRPC_FAIL_RANK": str(rank), "FEDRPC_FAIL_MODE": mode,
                        "FEDRPC_FAIL_ROUND": "1"})


@needs_mpiexec
@pytest.mark.timeout(200)
def test_a_raising_worker_under_mpiexec_ends_the_run_and_is_named(tmp_path):
    launch = mpiexec_failing(tmp_path, 2, "raise", round_timeout_s=30)
    assert_clean(launch)
    assert launch.returncodes[0] != 0
    text = launch.text(0)
    assert ("fedrpc: error: worker rank 2: RuntimeError: injected failure in round 1 "
            "(round 1, train)") in text
    assert "injected failure in round 1\n" in text        # the worker's own traceback
    assert not (tmp_path / "summary.json").exists()
    assert launch.seconds < 30 + 60


@needs_mpiexec
@pytest.mark.timeout(200)
def test_a_hanging_worker_under_mpiexec_times_out_and_is_named(tmp_path):
    launch = mpiexec_failing(tmp_path, 1, "hang", round_timeout_s=5)
    assert_clean(launch)
    assert launch.returncodes[0] != 0
    assert ("fedrpc: error: worker rank 1: no reply within 5 s (runtime.round_timeout_s): "
            "it hangs or died (round 1, train)") in launch.text(0)
    assert launch.seconds < 5 + 60


@needs_mpiexec
@pytest.mark.timeout(200)
def test_a_worker_killed_mid_round_under_mpiexec_ends_the_whole_job_at_once(tmp_path):
    """MPICH's mpiexec ends every rank as soon as one dies (before the server could name
    it; its banner gives a PID of the job, and the server's start-up line maps PIDs to
    ranks). Bounded (well under the round timeout), non-zero, nothing left."""
    launch = mpiexec_failing(tmp_path, 2, "kill", round_timeout_s=120)
    assert_clean(launch)
    assert launch.returncodes[0] == 9                     # SIGKILL, as mpiexec reports it
    text = launch.text(0)
    assert "round 0 " in text and "round 1 " not in text  # it died in round 1
    pids = dict(re.findall(r"rank (\d) = pid (\d+) on", text))
    assert sorted(pids) == ["0", "1", "2"]
    assert re.search(r"PID (\d+) RUNNING AT", text).group(1) in pids.values()
    assert not (tmp_path / "summary.json").exists()
    assert launch.seconds < 60


# ---------------------------------------------------------------------- no processes
def test_tensors_go_out_of_band_and_come_back_bit_identical():
    base = torch.randn(100, 30)
    msg = {"view": base[3:7, 2:9], "t": base.t(), "scalar": torch.tensor(2.5),
           "empty": torch.zeros(0, 4), "bool": torch.tensor([True, False, True]),
           "half": torch.randn(5, dtype=torch.bfloat16), "long": torch.arange(7),
           "array": np.arange(12, dtype=np.int64).reshape(3, 4), "text": "x" * 10}
    header, views = encode(msg)
    tensor_bytes = sum(v.numel() * v.element_size() for v in msg.values()
                       if isinstance(v, torch.Tensor)) + msg["array"].nbytes
    assert buffer_sizes(header) == [v.nbytes for v in views]
    assert sum(v.nbytes for v in views) == tensor_bytes          # views: their elements only
    assert len(header) < 1200                                    # no tensor data inline
    back = decode(header, [bytearray(v) for v in views])
    for k, v in msg.items():
        if isinstance(v, torch.Tensor):
            assert back[k].dtype == v.dtype and back[k].shape == v.shape
            assert torch.equal(back[k].view(torch.uint8) if v.dtype == torch.bool else back[k],
                               v.view(torch.uint8) if v.dtype == torch.bool else v)
        elif isinstance(v, np.ndarray):
            assert np.array_equal(back[k], v)
        else:
            assert back[k] == v


def test_wire_bytes_are_header_plus_buffers():
    users = np.arange(5)
    shared = {"C": torch.randn(50, 8), "w": torch.randn(8)}
    req = TrainRequest(0, users, shared, 0.1, 1.0, 1.0)
    rep = TrainReply(0, users, {k: v.expand(5, *v.shape).clone() for k, v in shared.items()},
                     np.ones(5, dtype=np.int64), 0, 0)
    arrays = {id(req): 5 * 8 + (50 * 8 + 8) * 4,                 # users, C, w
              id(rep): 5 * 8 + 5 * (50 * 8 + 8) * 4 + 5 * 8}  # + n_samples (loss: sums)
    for msg in (req, rep):
        header, views = encode(msg)
        assert wire_bytes(msg) == len(header) + sum(v.nbytes for v in views)
        assert sum(v.nbytes for v in views) == arrays[id(msg)]
        inline = pickle.dumps(msg, protocol=5)                   # torch pickles storages inline
        assert len(header) < len(inline) - msg.payload_bytes() + 100


def test_mpi_launch_errors_are_clear():
    with pytest.raises(ConfigError, match=r"fed.transport: mpi needs a launcher.*mpiexec -n 3"):
        launch_info("mpi", {})
    with pytest.raises(ConfigError, match="mpi needs at least 2 ranks"):
        launch_info("mpi", {"PMI_RANK": "0", "PMI_SIZE": "1"})
    info = launch_info("mpi", {"PMI_RANK": "2", "PMI_SIZE": "4"})   # no rendezvous needed
    assert (info.rank, info.world_size, info.launcher) == (2, 4, "mpi")


@needs_mpiexec
@pytest.mark.timeout(300)
def test_encoded_uploads_cross_mpi_with_the_local_numbers_and_bytes(tmp_path):
    over = ["fed.protocol=sparse", "fed.precision=bf16"]
    run_local(load_config(None, SMALL + [f"run.out_dir={tmp_path / 'local'}", *over]))
    launch = mpiexec(3, tmp_path / "mpi", *over)
    assert_clean(launch)
    assert launch.returncodes == [0], launch.text(0)[-3000:]
    ref, got = rounds(tmp_path / "local"), rounds(tmp_path / "mpi")
    assert len(got) == len(ref) == 3
    for a, b in zip(got, ref):
        assert (a["metrics"], a["loss"]) == (b["metrics"], b["loss"])
        assert a["bytes"]["logical"] == b["bytes"]["logical"]
        for pair in a["bytes"]["physical"].values():   # tensors out of band + a pickle
            assert pair["payload"] < pair["wire"] < pair["payload"] + 2000
