#!/usr/bin/env bash
# The main job on the bundled tiny default: SFT -> reward model -> cost model -> PPO (RLHF baseline) ->
# PPO-Lagrangian (Safe RLHF), plus the offline baselines DPO (helpfulness label) and SafeDPO -> arena of all five,
# judged by the models and by the exact rule judge. ~12 minutes on 2 CPU cores. NPROC=2 runs every stage under
# torchrun with 2 ranks. The wall time of each stage goes to $OUT/wall_times.tsv.
#   bash scripts/pipeline.sh            OUT=output NPROC=1 by default
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-output}
NPROC=${NPROC:-1}
EXTRA=${EXTRA:-}          # extra flags for the PPO stages, e.g. EXTRA="--max_steps 10" for a smoke run
STAGE_EXTRA=${STAGE_EXTRA:-}  # extra flags for SFT and both score models, e.g. "--max_steps 20"
ARENA_EXTRA=${ARENA_EXTRA:-}  # extra flags for the arena, e.g. "--samples_per_prompt 1"
if [ "$NPROC" -gt 1 ]; then
  export OMP_NUM_THREADS=1
  RUN="python -m torch.distributed.run --nproc_per_node=$NPROC --rdzv_backend=c10d --rdzv_endpoint=localhost:0"
else
  RUN=python
fi
mkdir -p $OUT
: > $OUT/wall_times.tsv
timed() {  # timed NAME command...: run it, append "NAME<TAB>seconds" to $OUT/wall_times.tsv
  local name=$1 t0=$SECONDS; shift
  "$@"
  printf '%s\t%s\n' "$name" $((SECONDS - t0)) >> $OUT/wall_times.tsv
}
set -x
timed sft $RUN sft.py --output_dir $OUT/sft --overwrite $STAGE_EXTRA
timed reward $RUN train_preference.py --objective reward --model_name_or_path $OUT/sft --output_dir $OUT/reward --overwrite $STAGE_EXTRA
timed cost $RUN train_preference.py --objective cost --model_name_or_path $OUT/sft --output_dir $OUT/cost --overwrite $STAGE_EXTRA
MODELS="--actor_model_name_or_path $OUT/sft --reward_model_name_or_path $OUT/reward --cost_model_name_or_path $OUT/cost"
timed ppo $RUN ppo_lagrangian.py --algo ppo $MODELS --output_dir $OUT/ppo --overwrite $EXTRA
timed ppo_lag $RUN ppo_lagrangian.py --algo ppo_lag $MODELS --output_dir $OUT/ppo_lag --overwrite $EXTRA
timed dpo $RUN dpo.py --loss dpo --preference better --model_name_or_path $OUT/sft --output_dir $OUT/dpo --overwrite $STAGE_EXTRA
timed safedpo $RUN dpo.py --loss safedpo --model_name_or_path $OUT/sft --output_dir $OUT/safedpo --overwrite $STAGE_EXTRA
timed arena $RUN evaluate.py --task arena --policies sft=$OUT/sft,ppo=$OUT/ppo,ppo_lag=$OUT/ppo_lag,dpo=$OUT/dpo,safedpo=$OUT/safedpo \
  --reward_model_name_or_path $OUT/reward --cost_model_name_or_path $OUT/cost --output_dir $OUT/eval $ARENA_EXTRA
python evaluate.py --task curves --run_dirs $OUT/ppo,$OUT/ppo_lag --output_dir $OUT/eval/curves
set +x
echo
cat $OUT/eval/arena.md
echo
echo "plots: $OUT/eval/reward_cost_scatter.png and $OUT/eval/curves/*.png"
echo "wall time per stage (s):"; cat $OUT/wall_times.tsv
