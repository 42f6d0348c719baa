#!/usr/bin/env bash
# The whole pipeline on a real chat model: SFT -> reward model -> cost model -> PPO-Lagrangian -> arena, with the
# model's own chat template (--chat_template) and pad == EOS, on real preference rows. Default: SmolLM2-135M-Instruct
# (python scripts/get_smollm2.py) and the offline rows in ../shared/data/real, in a smoke setting that finishes on a
# 2-core CPU in about 20 minutes. README "A real chat model" has the measured numbers and the settings of a real run.
#
#   pip install -r requirements-real.txt && python scripts/get_smollm2.py    # once: the model, ~30 s
#   bash scripts/pipeline_real.sh                                            # smoke setting (CPU)
#   SCALE=full NPROC=1 bash scripts/pipeline_real.sh                         # one GPU (see README)
#   BF16=false bash scripts/pipeline_real.sh                                 # fp32 compute (bf16 is on by default)
#   MODEL=Qwen/Qwen2.5-0.5B-Instruct DATA=PKU-Alignment/PKU-SafeRLHF bash scripts/pipeline_real.sh   # with network
#
# Data on this machine (scripts/prepare_real_data.py writes it under output/real-data, split by prompt; never copied
# into the repo): PKU-SafeRLHF pairs with exactly one safe answer (CC BY-NC) for SFT (the safe answers), the cost model
# and the prompts; Anthropic HH-RLHF helpful-base chosen/rejected dialogues (MIT; "chosen" = more helpful) for the
# reward model. With network, DATA=PKU-Alignment/PKU-SafeRLHF uses the hub dataset (v1 schema) for the reward model,
# cost model and prompts. The full experiment (score models that work, PPO / PPO-Lagrangian / reward shaping, XSTest)
# is scripts/experiment_real.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-output/real}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
NPROC=${NPROC:-1}
SCALE=${SCALE:-smoke}
if [ "$NPROC" -gt 1 ]; then
  export OMP_NUM_THREADS=1
  RUN="python -m torch.distributed.run --nproc_per_node=$NPROC --rdzv_backend=c10d --rdzv_endpoint=localhost:0"
else
  RUN=python
fi
if [ ! -f "$MODEL/config.json" ] && [ "$MODEL" = models/SmolLM2-135M-Instruct ]; then
  python scripts/get_smollm2.py
fi
if [ -n "${DATA:-}" ]; then  # a hub dataset in the PKU-SafeRLHF schema (network)
  SFT_DATA=${SFT_DATA:-output/real-data/sft_train.jsonl}
  RM_DATA="$DATA:train"; RM_EVAL="$DATA:test"; CM_DATA="$DATA:train"; CM_EVAL="$DATA:test"
  PROMPTS="$DATA:train"; EVAL_PROMPTS="$DATA:test"
  python scripts/prepare_real_data.py
else
  python scripts/prepare_real_data.py
  SFT_DATA=output/real-data/sft_train.jsonl
  RM_DATA=output/real-data/reward_train.jsonl; RM_EVAL=output/real-data/reward_test.jsonl
  CM_DATA=output/real-data/cost_train.jsonl; CM_EVAL=output/real-data/cost_test.jsonl
  PROMPTS=output/real-data/prompts_train.jsonl; EVAL_PROMPTS=output/real-data/prompts_test.jsonl
fi
if [ "$SCALE" = smoke ]; then  # CPU: a few steps of short sequences
  SFT_FLAGS="--max_steps 6 --per_device_train_batch_size 4 --max_length 256 --learning_rate 2e-5"
  RM_FLAGS="--max_steps 10 --per_device_train_batch_size 4 --max_length 256 --learning_rate 2e-5"
  CM_FLAGS="--max_steps 80 --per_device_train_batch_size 4 --max_length 256 --learning_rate 2e-5 --eval_batch_size 8"
  PPO_FLAGS="--max_steps 4 --per_device_prompt_batch_size 4 --per_device_train_batch_size 4 --max_new_tokens 48
             --max_prompt_length 128 --eval_every 0 --eval_samples_per_prompt 1 --actor_lr 1e-6 --critic_lr 5e-6
             --kl_coeff 0.01 --threshold 0.0"
  ARENA_FLAGS="--samples_per_prompt 1 --max_new_tokens 64 --max_length 256 --batch_size 8"
  EVAL_LIMIT=16   # held-out prompts scored by PPO and the arena in the smoke setting
else  # one GPU: the paper's scale of steps for a small model
  SFT_FLAGS="--epochs 1 --per_device_train_batch_size 8 --max_length 512 --learning_rate 2e-5"
  RM_FLAGS="--epochs 2 --per_device_train_batch_size 16 --max_length 512 --learning_rate 2e-5"
  CM_FLAGS="--epochs 2 --per_device_train_batch_size 16 --max_length 512 --learning_rate 2e-5"
  PPO_FLAGS="--max_steps 300 --per_device_prompt_batch_size 32 --per_device_train_batch_size 8 --max_new_tokens 256
             --max_prompt_length 256 --eval_every 50 --actor_lr 1e-6 --critic_lr 5e-6 --kl_coeff 0.01 --threshold 0.0
             --lr_scheduler_type cosine --warmup_ratio 0.03"
  ARENA_FLAGS="--samples_per_prompt 1 --max_new_tokens 256 --max_length 768 --batch_size 16"
  EVAL_LIMIT=0
fi
if [ "$EVAL_LIMIT" -gt 0 ] && [ -z "${DATA:-}" ]; then  # smoke: 16 held-out prompts, 200 cost / 100 reward pairs
  head -n "$EVAL_LIMIT" "$EVAL_PROMPTS" > output/real-data/prompts_eval_small.jsonl
  EVAL_PROMPTS=output/real-data/prompts_eval_small.jsonl
  head -n 200 "$CM_EVAL" > output/real-data/cost_eval_small.jsonl
  CM_EVAL=output/real-data/cost_eval_small.jsonl
  head -n 100 "$RM_EVAL" > output/real-data/reward_eval_small.jsonl
  RM_EVAL=output/real-data/reward_eval_small.jsonl
fi
# bf16 compute with fp32 master weights, scores and log-probs (README "Performance": ~2x on this CPU; default on CUDA)
C="--chat_template --bf16 ${BF16:-true}"
set -x
$RUN sft.py --model_name_or_path $MODEL --train_data $SFT_DATA --eval_data "" $C --output_dir $OUT/sft --overwrite $SFT_FLAGS
$RUN train_preference.py --objective reward --model_name_or_path $OUT/sft --train_data $RM_DATA --eval_data "$RM_EVAL" \
  --skip_invalid_rows --truncate_long_prompts $C --output_dir $OUT/reward --overwrite $RM_FLAGS
$RUN train_preference.py --objective cost --model_name_or_path $OUT/sft --train_data $CM_DATA --eval_data "$CM_EVAL" \
  $C --output_dir $OUT/cost --overwrite $CM_FLAGS
$RUN ppo_lagrangian.py --algo ppo_lag --actor_model_name_or_path $OUT/sft --reward_model_name_or_path $OUT/reward \
  --cost_model_name_or_path $OUT/cost --prompt_data $PROMPTS --eval_prompt_data $EVAL_PROMPTS $C \
  --output_dir $OUT/ppo_lag --overwrite $PPO_FLAGS
$RUN evaluate.py --task arena --policies base=$MODEL,sft=$OUT/sft,ppo_lag=$OUT/ppo_lag \
  --reward_model_name_or_path $OUT/reward --cost_model_name_or_path $OUT/cost --prompt_data $EVAL_PROMPTS $C \
  --output_dir $OUT/eval $ARENA_FLAGS
set +x
echo
cat $OUT/eval/arena.md
