#!/usr/bin/env bash
# Run a federation under MPI, one process per rank: rank 0 is the server, ranks
# 1..NPROC-1 are workers, over mpi4py (fed.transport=mpi) or over torch RPC with its
# rendezvous shared over MPI (TRANSPORT=rpc: no MASTER_ADDR/MASTER_PORT needed).
#
#   launchers/mpi.sh configs/quickstart.yaml
#   NPROC=4 launchers/mpi.sh configs/ml100k.yaml fed.rounds=3 gfmfr.enabled=false
#   MPIEXEC_ARGS="-hosts node1,node2" NPROC=8 launchers/mpi.sh configs/ml100k.yaml
#
# Environment:
#   NPROC            ranks to start (default 3: 1 server + 2 workers; at least 2)
#   TRANSPORT        mpi (default) or rpc
#   MPIEXEC          the mpiexec command (default: mpiexec; pip install 'fedrpc[mpi]' puts
#                    MPICH's in the virtual environment)
#   MPIEXEC_ARGS     extra mpiexec options (hosts, binding), split on spaces
#   PYTHON           the Python that has fedrpc (default: python)
#   OMP_NUM_THREADS  threads per rank (default 1; raise it when cores >> NPROC)
# Arguments: the config file and dotted overrides, passed through to `fedrpc run`;
# fed.transport=$TRANSPORT is appended.
set -euo pipefail

NPROC="${NPROC:-3}"
TRANSPORT="${TRANSPORT:-mpi}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
read -r -a RUNNER <<< "${MPIEXEC:-mpiexec}"
read -r -a EXTRA <<< "${MPIEXEC_ARGS:-}"

exec "${RUNNER[@]}" ${EXTRA[@]+"${EXTRA[@]}"} -n "$NPROC" "${PYTHON:-python}" \
    -m fedrpc run "$@" fed.transport="$TRANSPORT"
