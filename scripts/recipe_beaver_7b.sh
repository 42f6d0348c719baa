#!/usr/bin/env bash
# Beaver-7B reproduction with safe-rlhf's released hyperparameters (GPUs + network; not run in CI).
# alpaca-7b-reproduced (the paper's SFT policy) -> reward + cost models on PKU-SafeRLHF -> PPO-Lagrangian.
# scripts/recipe_beaver_7b.md lists every safe-rlhf hyperparameter beside the flag that sets it here.
# One node of 8 GPUs; for several nodes replace --nproc_per_node=$NPROC by
#   --nnodes=$NNODES --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD_NODE:29500  (and set WORLD below)
set -euo pipefail
# Preempted? Run the script again: finished stages are skipped, an unfinished one resumes from its newest
# checkpoint (--save_every ... --resume; README "Resuming and failures").
cd "$(dirname "$0")/.."
OUT=${OUT:-output/beaver}
SFT=${SFT:-PKU-Alignment/alpaca-7b-reproduced}
DATA=${DATA:-PKU-Alignment/PKU-SafeRLHF}
NPROC=${NPROC:-8}
WORLD=${WORLD:-$NPROC}   # ranks over all nodes
RUN="torchrun --nproc_per_node=$NPROC"
for OBJ in reward cost; do
  [ -f $OUT/$OBJ/config.json ] || $RUN train_preference.py --objective $OBJ --model_name_or_path $SFT --train_data $DATA:train --eval_data $DATA:test \
    --output_dir $OUT/$OBJ --save_every 200 --resume --epochs 2 --learning_rate 2e-5 --warmup_ratio 0.03 --weight_decay 0.1 \
    --regularization 0.001 --per_device_train_batch_size 16 --max_length 512 --activation_checkpointing
done
# λ's window: safe-rlhf keeps the last 128 episode costs *per rank* and averages the ranks' means, i.e. about
# 128 x world episodes; our --episode_cost_window_size counts episodes of all ranks, hence 128 * WORLD.
# Lengths: safe-rlhf's max_length 512 bounds prompt + response together (generate's max_length on left-padded
# prompts): --max_length 512 does the same (responses get 512 - prompt width tokens at most).
# PTX: safe-rlhf steps ½(L_RL + 16·L_PTX); Adam is invariant to a constant scale of the loss, so that is our
# L_RL + 16·L_PTX at the same learning rate: --ptx_coeff 16 --actor_lr 1e-5.
[ -f $OUT/ppo_lag/config.json ] || $RUN ppo_lagrangian.py --algo ppo_lag --actor_model_name_or_path $SFT \
  --reward_model_name_or_path $OUT/reward --cost_model_name_or_path $OUT/cost \
  --prompt_data $DATA:train --eval_prompt_data $DATA:test --judge '' --ptx_data tatsu-lab/alpaca:train \
  --output_dir $OUT/ppo_lag --save_every 20 --resume --max_length 512 --max_prompt_length 448 --max_new_tokens 512 \
  --epochs 1 --max_steps -1 --per_device_prompt_batch_size 16 --per_device_train_batch_size 16 --ppo_epochs 1 \
  --actor_lr 1e-5 --weight_decay 0.01 --critic_lr 5e-6 --critic_weight_decay 0.0 \
  --lr_scheduler_type cosine --critic_lr_scheduler_type constant --warmup_ratio 0.03 \
  --kl_coeff 0.01 --clip_ratio 0.2 --clip_range_score 50 --clip_range_value 5 \
  --gamma 1.0 --gae_lambda 0.95 --threshold 0.0 --lambda_init 1.0 --lambda_lr 0.1 --lambda_max 5.0 \
  --lambda_update_delay_steps 0 --episode_cost_window_size $((128 * WORLD)) --ptx_coeff 16 \
  --temperature 1.0 --top_p 1.0 --activation_checkpointing
