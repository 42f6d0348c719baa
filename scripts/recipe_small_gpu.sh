#!/usr/bin/env bash
# A small modern instruct model on one GPU (GPUs + network; not run in CI): the whole pipeline on PKU-SafeRLHF
# with Qwen2.5-0.5B-Instruct and its own chat template. Add GPUs with NPROC=N.
set -euo pipefail
# Preempted? Run the script again: finished stages are skipped, an unfinished one resumes from its newest
# checkpoint (--save_every ... --resume; README "Resuming and failures").
cd "$(dirname "$0")/.."
OUT=${OUT:-output/qwen05}
BASE=${BASE:-Qwen/Qwen2.5-0.5B-Instruct}
DATA=${DATA:-PKU-Alignment/PKU-SafeRLHF}
RUN="torchrun --nproc_per_node=${NPROC:-1}"
for OBJ in reward cost; do
  [ -f $OUT/$OBJ/config.json ] || $RUN train_preference.py --objective $OBJ --model_name_or_path $BASE --chat_template --train_data $DATA:train \
    --eval_data $DATA:test --output_dir $OUT/$OBJ --save_every 200 --resume --epochs 2 --learning_rate 2e-5 --weight_decay 0.1 \
    --per_device_train_batch_size 16 --max_length 512
done
[ -f $OUT/ppo_lag/config.json ] || $RUN ppo_lagrangian.py --algo ppo_lag --actor_model_name_or_path $BASE --chat_template \
  --reward_model_name_or_path $OUT/reward --cost_model_name_or_path $OUT/cost --prompt_data $DATA:train \
  --eval_prompt_data $DATA:test --judge '' --output_dir $OUT/ppo_lag --save_every 25 --resume --max_prompt_length 256 --max_new_tokens 256 \
  --max_steps 500 --per_device_prompt_batch_size 32 --per_device_train_batch_size 8 --actor_lr 1e-6 --critic_lr 5e-6 \
  --kl_coeff 0.01 --threshold 0.0
$RUN evaluate.py --task arena --policies base=$BASE,ppo_lag=$OUT/ppo_lag --chat_template --judge '' \
  --reward_model_name_or_path $OUT/reward --cost_model_name_or_path $OUT/cost --prompt_data $DATA:test \
  --output_dir $OUT/eval --max_length 768 --max_new_tokens 256 --batch_size 16
