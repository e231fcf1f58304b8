#!/usr/bin/env bash
# Run a federation on this machine, one process per rank: rank 0 is the server, ranks
# 1..NPROC-1 are workers (each hosts a shard of the clients), over torch RPC.
#
#   launchers/local.sh configs/quickstart.yaml
#   NPROC=5 launchers/local.sh configs/ml100k.yaml fed.rounds=3 gfmfr.enabled=false
#
# Environment:
#   NPROC            ranks to start (default 3: 1 server + 2 workers; at least 2)
#   OMP_NUM_THREADS  threads per rank (default 1; raise it when cores >> NPROC)
#   TORCHRUN         the torchrun command (default: torchrun, else python -m torch.distributed.run)
# Arguments: the config file and dotted overrides, passed through to `fedrpc run`;
# fed.transport=rpc is appended.
set -euo pipefail

NPROC="${NPROC:-3}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [[ -n "${TORCHRUN:-}" ]]; then
    read -r -a RUNNER <<< "$TORCHRUN"
elif command -v torchrun >/dev/null 2>&1; then
    RUNNER=(torchrun)
else
    RUNNER=(python -m torch.distributed.run)
fi

exec "${RUNNER[@]}" --standalone --nproc_per_node="$NPROC" \
    -m fedrpc run "$@" fed.transport=rpc
