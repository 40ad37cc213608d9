#!/usr/bin/env bash
# Launch llmtrain on NNODES machines x NPROC_PER_NODE GPUs with torchrun's c10d rendezvous.
# Run the same command on every node (or let scripts/launch/slurm.sbatch do it for you).
#
#   # node 0 (its hostname or IP is MASTER_ADDR)          # node 1
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 \              NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 \
#     scripts/launch/multinode.sh run_dir=/shared/runs/7b +experiment=llama7b_adamw distributed.strategy=hsdp
#
# Environment variables (all optional except MASTER_ADDR on more than one node):
#   NNODES          number of machines (default 1)
#   NODE_RANK       this machine's index, 0..NNODES-1 (default 0)
#   NPROC_PER_NODE  processes (GPUs) per machine (default: visible GPUs, or 1 without a GPU)
#   MASTER_ADDR     host every node can reach that runs the rendezvous (default 127.0.0.1)
#   MASTER_PORT     its TCP port (default 29500)
#   RDZV_ID         job id shared by all nodes (default llmtrain)
#   TIMEOUT_S       seconds a collective may wait before the job fails (default 600)
# Arguments are llmtrain's Hydra overrides. Give run_dir= a path on a filesystem every node
# shares: each rank writes its checkpoint shards there (rank 0 writes logs and metrics).
# A rank that fails ends the whole job: torchrun stops the other local ranks, the other nodes'
# agents see the rendezvous close, and NCCL aborts a collective stuck longer than TIMEOUT_S.
set -euo pipefail

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-llmtrain}
TIMEOUT_S=${TIMEOUT_S:-600}

export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

exec torchrun \
  --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID" \
  --max-restarts=0 \
  -m llmtrain distributed.timeout_s="$TIMEOUT_S" "$@"
