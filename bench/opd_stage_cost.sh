#!/usr/bin/env bash
# How Lightning OPD's stage cost compares with standard OPD's as the OPD work
# grows: for each prompt count N, writes N fresh OPD prompts (the generator of
# the experiment's task, with its seed, as its data/opd.parquet records it) and runs
# the four OPD modules of a finished experiment one at a time, with the
# arguments the rules give them, and one thread each (Snakemake sets
# OMP_NUM_THREADS to a job's threads), timing each (wall seconds).
# Prints the seconds per stage and Lightning / standard.
# The OPD settings are those of
#   --regime short_opd (the default of this script): config/short_opd.yaml, the
#     previous default: 2 epochs in steps of 64, standard OPD samples 4 per
#     prompt; the paper's cache, top_k 0;
#   --regime default: config/config.yaml: 3.75 epochs in steps of 256 at lr 6e-4
#     (120 steps for N = 8192, the default's prompts), standard OPD samples 1 per
#     prompt; the default's cache, top_k 16.
# Run it with the project's environment on PATH (`make env`, then
# `source .venv/bin/activate`), on an otherwise idle machine; on a GPU the
# modules run there. BENCH_LOG_DIR=DIR keeps every command's log in DIR.
# For timing only: the task's generator draws every split from one seed, so
# N prompts beyond the experiment's include the held-out problems.
#
#   bench/opd_stage_cost.sh results/short_opd 512 2048
#   bench/opd_stage_cost.sh --regime default results/default 8192
set -euo pipefail
regime=short_opd
if [[ ${1:-} == --regime ]]; then regime=${2:-}; shift 2 || true; fi
[[ $regime == short_opd || $regime == default ]] || { echo "$0: --regime is short_opd or default, not '$regime'" >&2; exit 2; }
[[ $# -ge 2 ]] || { echo "usage: $0 [--regime short_opd|default] RESULTS_DIR N [N ...]" >&2; exit 2; }
results=$(realpath "$1"); shift
for n in "$@"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "$0: N is a number of prompts, not '$n'" >&2; exit 2; }
done
for model in sft-A teacher-A; do
  [[ -d $results/models/$model ]] || { echo "$0: $results/models/$model is missing: run the experiment first" >&2; exit 1; }
done
[[ -f $results/data/opd.parquet ]] || { echo "$0: $results/data/opd.parquet is missing: run the experiment first" >&2; exit 1; }
# the experiment's task as its OPD prompts record it, less n_opd (each N sets its own)
task=$(python - "$results/data/opd.parquet" <<'PY'
import dataclasses, json, sys
from lightning_opd.artifacts import TASK_SCHEMA, read_table
from lightning_opd.task_data import recorded_task
params = dataclasses.asdict(recorded_task(sys.argv[1], read_table(sys.argv[1], TASK_SCHEMA)[1]))
print(json.dumps({key: value for key, value in params.items() if key != "n_opd"}))
PY
) || { echo "$0: cannot read the task of $results/data/opd.parquet" >&2; exit 1; }
work=$(mktemp -d)
trap 'exit 130' INT
trap 'exit 143' TERM
trap '[[ -n ${BENCH_LOG_DIR:-} ]] && mkdir -p "$BENCH_LOG_DIR" && cp "$work"/*.log "$BENCH_LOG_DIR"/ 2>/dev/null; rm -rf "$work"' EXIT
export OMP_NUM_THREADS=1
if [[ $regime == default ]]; then
  batch=256 epochs=3.75 lr=0.0006 log_steps=8 save_steps=20 samples=1 top_k=16
else
  batch=64 epochs=2 lr=0.0001 log_steps=2 save_steps=4 samples=4 top_k=0
fi
opd="{\"adam_beta1\": 0.9, \"adam_beta2\": 0.98, \"allow_teacher_mismatch\": false, \"batch_size\": $batch,
  \"epochs\": $epochs, \"learning_rate\": $lr, \"logging_steps\": $log_steps, \"lr_scheduler_type\": \"constant\",
  \"save_steps\": $save_steps, \"seed\": 0, \"tau\": 1.0, \"warmup_ratio\": 0.0, \"weight_decay\": 0.1}"
lightning=${opd%\}}', "loss": "sampled", "top_k": null}'
drift=(--drift-prompts "$results/data/eval.parquet" --drift-n 64 --drift-max-new-tokens 128 --drift-every 0)
tracking() { printf '{"log_dir": "%s", "project": "bench", "report_to": [], "run_name": "%s"}' "$work/tracking/$1" "$1"; }

logged() {  # logged NAME COMMAND...: COMMAND's output goes to $work/NAME.log, shown if it fails
  local name=$1; shift
  "$@" > "$work/$name.log" 2>&1 || { echo "$0: $name failed, its log:" >&2; tail -20 "$work/$name.log" >&2; exit 1; }
}
seconds() {  # seconds NAME COMMAND...: wall seconds of COMMAND, run as `logged`
  local start=$EPOCHREALTIME
  logged "$@"
  awk -v start="$start" -v end="$EPOCHREALTIME" 'BEGIN { printf "%.1f", end - start }'
}

printf '%6s %9s %14s %14s %14s %10s %9s\n' prompts rollouts teacher_cache lightning_opd "Lightning sum" standard "ratio"
for n in "$@"; do
  d=$work/$n
  logged "task_data-$n" python -m lightning_opd.task_data --out-dir "$d/data" --hparams "${task%\}}, \"n_opd\": $n}"
  roll=$(seconds rollouts-$n python -m lightning_opd.generate --model "$results/models/sft-A" \
    --prompts "$d/data/opd.parquet" --out "$d/rollouts.parquet" --label sft-A --backend hf --backend-options '{}' \
    --sampling '{"batch_size": 256, "max_new_tokens": 128, "n": 1, "seed": 1, "temperature": 1.0, "top_p": 1.0}' \
    --prompt-template '{problem}' --chat-template-kwargs '{}' --shard-size 256 --data-parallel 1 --work-dir "$d/w_roll")
  cache=$(seconds cache-$n python -m lightning_opd.teacher_cache --teacher "$results/models/teacher-A" \
    --rollouts "$d/rollouts.parquet" --out "$d/cache.parquet" --label A --backend hf --backend-options '{}' \
    --max-response-tokens 4096 --temperature 1.0 --top-k "$top_k" --shard-size 1024 --data-parallel 1 --work-dir "$d/w_cache")
  train=$(seconds lightning-$n python -m lightning_opd.lightning_opd --init "$results/models/sft-A" \
    --cache "$d/cache.parquet" --opd "$lightning" --round 1-of-1 --drift-reference "$results/models/sft-A" \
    --out "$d/lightning" --checkpoint-root "$d/ck_lightning" "${drift[@]}" --tracking "$(tracking lightning-$n)")
  standard=$(seconds standard-$n python -m lightning_opd.standard_opd --init "$results/models/sft-A" \
    --teacher "$results/models/teacher-A" --teacher-label A --prompts "$d/data/opd.parquet" --opd "$opd" \
    --sampling "{\"batch_size\": 256, \"max_new_tokens\": 128, \"n\": $samples, \"seed\": 0, \"temperature\": 1.0, \"top_p\": 1.0}" \
    --sampler hf --sampler-options '{}' --prompt-template '{problem}' --chat-template-kwargs '{}' \
    --out "$d/standard" --checkpoint-root "$d/ck_standard" "${drift[@]}" --tracking "$(tracking standard-$n)")
  python - "$n" "$roll" "$cache" "$train" "$standard" <<'EOF'
import sys
n, roll, cache, train, standard = sys.argv[1], *map(float, sys.argv[2:])
total = roll + cache + train
print(f"{n:>6} {roll:>9.1f} {cache:>14.1f} {train:>14.1f} {total:>14.1f} {standard:>10.1f} {total / standard:>9.3f}")
EOF
  rm -rf "$d"
done
