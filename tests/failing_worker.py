"""`fedrpc` with a worker that fails, for tests/test_rpc.py, test_mpi.py and test_slurm.py.

    FEDRPC_FAIL_RANK=2 FEDRPC_FAIL_MODE=raise|exit|kill|hang|slow FEDRPC_FAIL_ROUND=0 \
        python tests/failing_worker.py run <config> <overrides>

On rank FEDRPC_FAIL_RANK, from round FEDRPC_FAIL_ROUND on, Worker.train raises
RuntimeError (raise), ends the process with os._exit(3) (exit), SIGKILLs it (kill),
never returns (hang) or trains normally after FEDRPC_SLOW_S seconds (slow: a run that
is still mid-way when a test signals it; the numbers are unchanged);
every other rank is unchanged.
"""
import os
import signal
import sys
import time

from fedrpc.cli import main
from fedrpc.worker import Worker

FAIL_RANK = int(os.environ.get("FEDRPC_FAIL_RANK", "-1"))
FAIL_MODE = os.environ.get("FEDRPC_FAIL_MODE", "raise")
FAIL_ROUND = int(os.environ.get("FEDRPC_FAIL_ROUND", "0"))
_train = Worker.train


def failing_train(self, req):
    if self.rank == FAIL_RANK and req.round >= FAIL_ROUND:
        if FAIL_MODE == "slow":
            time.sleep(float(os.environ.get("FEDRPC_SLOW_S", "1")))
            return _train(self, req)
        if FAIL_MODE == "exit":
            os._exit(3)
        if FAIL_MODE == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if FAIL_MODE == "hang":
            time.sleep(3600)
        raise RuntimeError(f"injected failure in round {req.round}")
    return _train(self, req)


Worker.train = failing_train

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
