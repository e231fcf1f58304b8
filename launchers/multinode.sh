#!/usr/bin/env bash
# Run a federation over several machines: start this script once on every node with the
# same settings and its own NODE_RANK. torchrun's c10d rendezvous (hosted on MASTER_ADDR)
# numbers the ranks; global rank 0 becomes the server, all other ranks workers.
#
#   node 0:  NNODES=2 NODE_RANK=0 NPROC_PER_NODE=4 MASTER_ADDR=node0 MASTER_PORT=29400 \
#              launchers/multinode.sh configs/ml100k.yaml
#   node 1:  NNODES=2 NODE_RANK=1 NPROC_PER_NODE=4 MASTER_ADDR=node0 MASTER_PORT=29400 \
#              launchers/multinode.sh configs/ml100k.yaml
#
# Environment:
#   NNODES, NODE_RANK      number of nodes, this node's index (0 .. NNODES-1)   [required]
#   NPROC_PER_NODE         ranks on this node (default 1)
#   MASTER_ADDR            host of node 0, reachable from every node             [required]
#   MASTER_PORT            a free TCP port on MASTER_ADDR for the rendezvous      [required]
#   RDZV_ID                rendezvous id shared by the nodes (default fedrpc-$MASTER_PORT)
#   OMP_NUM_THREADS        threads per rank (default 1)
#   TP_SOCKET_IFNAME       network interface TensorPipe should use (e.g. eth0, ib0)
#   TORCHRUN               the torchrun command (default: torchrun)
# Arguments: the config file and dotted overrides, passed through to `fedrpc run`;
# fed.transport=rpc is appended.
set -euo pipefail

: "${NNODES:?set NNODES (number of nodes)}"
: "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR (host of node 0)}"
: "${MASTER_PORT:?set MASTER_PORT (free port on MASTER_ADDR)}"
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
read -r -a RUNNER <<< "${TORCHRUN:-torchrun}"

exec "${RUNNER[@]}" --nnodes="$NNODES" --node_rank="$NODE_RANK" \
    --nproc_per_node="$NPROC_PER_NODE" --rdzv_backend=c10d \
    --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${RDZV_ID:-fedrpc-$MASTER_PORT}" \
    -m fedrpc run "$@" fed.transport=rpc
