#!/bin/bash
# Time-to-loss comparison (issue part 3): DDP, Local SGD, DiLoCo, PALSGD, interleaved repetitions; and the
# overlapped (delayed, eager, streaming) and int8 variants of DiLoCo (BENCHMARKS.md §7).
#
#   bench/launch_wan.sh OUTDIR REPS N M [extra hf_localsgd.train flags...]
#
# DDP runs N steps, the local methods M steps (they may need more steps than DDP to reach its loss).
# Each repetition runs every method once, in an order rotated every repetition; logs go to
# OUTDIR/<method>_<rep>.jsonl, then `python bench/time_to_loss.py analyze OUTDIR --n N` prints the table.
#
# Where the ranks run:
#   MODE=loopback (default): `accelerate launch --config_file accelerate_configs/cpu_2proc.yaml` (2 processes).
#   MODE=prefix: one process per rank, started torchrun-style (RANK, WORLD_SIZE, LOCAL_RANK=0, MASTER_ADDR,
#     MASTER_PORT, ACCELERATE_USE_CPU=true) behind a per-rank command prefix in which {k} is rank+1, e.g.
#     for the namespaces of ../shared/tools/wan (rank r in namespace w(r+1), interface t(r+1)):
#       MODE=prefix MASTER_ADDR=10.78.0.1 PREFIX='ip netns exec w{k} env GLOO_SOCKET_IFNAME=t{k}' \
#         bench/launch_wan.sh runs/wan100 2 150 225
#     On a real cluster PREFIX would be e.g. 'ssh node{k} cd /path/to/repo &&' and MASTER_ADDR node1's address.
#   WORLD (default 2), MASTER_PORT (default 29531), THREADS (OMP threads per rank, default 1),
#   FIRST_REP (index of the first repetition, default 0: append repetitions to an existing OUTDIR),
#   METHODS (the methods to run, default "ddp localsgd diloco palsgd"; all are listed in FLAGS below),
#   TIMEOUT (seconds one run may take, default 900).
#
# Overlapped and compressed outer syncs (BENCHMARKS.md §7): GPT-Neo 8M at its full 50,257-token vocabulary
# (--vocab_size 50257: 8.05M parameters, a 32 MB sync), short sequences, all variants of DiLoCo with H = 16:
#   METHODS="ddp diloco diloco_delayed diloco_eager diloco_streaming diloco_int8 diloco_int8_ef diloco_eager_int8" \
#     bench/launch_wan.sh runs/overlap_loopback 3 N M --vocab_size 50257 --block_size 32 \
#       --per_device_train_batch_size 8 --max_eval_samples 64
set -u
OUT=$1; REPS=$2; N=$3; M=$4; shift 4
EXTRA=("$@")
MODE=${MODE:-loopback}; WORLD=${WORLD:-2}; PORT=${MASTER_PORT:-29531}; THREADS=${THREADS:-1}
PY=${PY:-$(command -v python)}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"

COMMON=(recipes/gptneo-tinystories/demo.yaml --model_config gpt-neo-8m --block_size 64
        --per_device_train_batch_size 16 --learning_rate 3e-3 --local_sgd_warmup_steps 0 --sync_every 16
        --seed 0 --report_to none)
DILOCO="--trainer localsgd --outer_optimizer nesterov --outer_lr 0.2 --outer_momentum 0.9 --max_steps $M"
declare -A FLAGS=(
  [ddp]="--trainer ddp --max_steps $N"
  [localsgd]="--trainer localsgd --outer_optimizer average --outer_lr 1.0 --outer_momentum 0.0 --max_steps $M"
  [diloco]="$DILOCO"
  [palsgd]="$DILOCO --pseudo_sync_prob 0.1"
  # overlapped outer steps (docs/methods.md, "Overlapped outer steps")
  [diloco_delayed]="$DILOCO --outer_overlap delayed"
  [diloco_eager]="$DILOCO --outer_overlap eager"
  # streaming: P = 4 fragments of a 16-step round, each sent tau = 2 steps before its outer step, alpha = 0.5
  [diloco_streaming]="$DILOCO --num_fragments 4 --fragment_sync_delay 2 --fragment_update_alpha 0.5"
  # int8 outer gradients (blocking), without and with error feedback; eager with int8
  [diloco_int8]="$DILOCO --outer_comm_dtype int8"
  [diloco_int8_ef]="$DILOCO --outer_comm_dtype int8 --outer_error_feedback true"
  [diloco_eager_int8]="$DILOCO --outer_overlap eager --outer_comm_dtype int8"
)
read -r -a METHODS <<< "${METHODS:-ddp localsgd diloco palsgd}"
TIMEOUT=${TIMEOUT:-900}

launch() {  # method rep
  local m=$1 rep=$2 log="$OUT/${1}_${2}.jsonl" odir="/tmp/ttl_out_$$/$1"
  local args=(bench/time_to_loss.py run --log "$log" "${COMMON[@]}" ${FLAGS[$m]} --output_dir "$odir" "${EXTRA[@]}")
  PORT=$((PORT + 1))
  if [ "$MODE" = loopback ]; then
    OMP_NUM_THREADS=$THREADS timeout $TIMEOUT "$PY" -m accelerate.commands.launch --main_process_port $PORT \
      --config_file accelerate_configs/cpu_2proc.yaml "${args[@]}" > "$OUT/${m}_${rep}.out" 2>&1
  else
    local pids=() r k prefix
    for r in $(seq 0 $((WORLD - 1))); do
      k=$((r + 1)); prefix=${PREFIX//\{k\}/$k}
      timeout $TIMEOUT $prefix env RANK=$r WORLD_SIZE=$WORLD LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 \
        MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$PORT ACCELERATE_USE_CPU=true OMP_NUM_THREADS=$THREADS \
        "$PY" "${args[@]}" > "$OUT/${m}_${rep}.rank$r.out" 2>&1 &
      pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
  fi
  rm -rf "$odir"
  echo "$(date -u +%T) $m rep $rep: $(tail -n1 "$log" 2>/dev/null)"
}

for rep in $(seq ${FIRST_REP:-0} $((${FIRST_REP:-0} + REPS - 1))); do
  n=${#METHODS[@]}
  for i in $(seq 0 $((n - 1))); do
    launch "${METHODS[$(((i + rep) % n))]}" "$rep"
  done
done
