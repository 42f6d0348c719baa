#!/usr/bin/env bash
# Safe RLHF on a real chat model, end to end, on a 2-core CPU (README "Safe RLHF on SmolLM2: the experiment").
# The shipped SmolLM2-135M-Instruct is π_SFT (Alpaca's role in the paper). Stages, each cached in $OUT/<stage> and
# resumed from its newest checkpoint when the run is killed (run the same command again):
#   data       scripts/prepare_real_data.py: PKU-SafeRLHF (cost), HH-RLHF helpful-base (reward), the RL prompt mix
#   cost       cost model on 4,629 PKU pairs (eq. 6), held out by prompt: 506 pairs (COST_TRAIN=cost_mix_train: + 622
#              benign HH-helpful pairs, both answers safe, a tie: run 5)
#   reward     reward model on 2,116 HH-helpful pairs (eq. 5), held out by first turn: 236 pairs
#   scores     evaluate.py --task preference on both held-out sets (95% CIs) -> the threshold d (printed arithmetic),
#              the cost model on 72 held-out benign HH pairs (share of benign answers read as safe), and on XSTest
#              refusal-vs-compliance pairs (both models; answers by two other chat models)
#   safety_sft the baseline row: SFT on the PKU safe answers
#   ppo, ppo_lag, shaping   the same prompts and rollout budget: RLHF, Safe RLHF, fixed-ν reward shaping
#   xstest, arena_pku, arena_hh   the evaluation of the five policies; results.md at the end
#
#   bash scripts/experiment_real.sh              # run 4 (the README table): 8 samples per prompt, 24 rollouts;
#                                                # 2 h 0 min on 2 Intel cores
#   COST_TRAIN=cost_mix_train BENIGN_LEVEL=hh OUT=output/experiment5 bash scripts/experiment_real.sh
#                                                # run 5: benign HH answers in the cost data, d at their level
#   COST_TRAIN=cost_mix2_train BENIGN_LEVEL=hh OUT=output/experiment6 bash scripts/experiment_real.sh
#                                                # run 6: + harm in HH's register (harmless-base pairs, pairwise only;
#                                                # only its cost model was measured, at 300 steps: docs/experiment/run5-6.md)
#   BF16=true REWARD_TRAIN=reward_refmix_train REWARD_STEPS=300 RUNS="ppo ppo_lag" ROWS="ppo ppo_lag" OUT=output/experiment7 \
#     bash scripts/experiment_real.sh          # run 7: the reward model also learns that refusing an HH question is
#                                                # less helpful than answering it (+ 623 pairs; 300 steps keep the real
#                                                # HH pairs seen at run 4's ~1,000); the two RL rows only
#   BF16=true COST_TRAIN=cost_mix3_train BENIGN_LEVEL=hh REWARD_TRAIN=reward_refmix_train REWARD_STEPS=300 \
#     RUNS="ppo ppo_lag" ROWS="safety_sft ppo ppo_lag" OUT=output/experiment8 bash scripts/experiment_real.sh
#                                                # run 8: run 7's reward model; the cost model also ties each HH
#                                                # question's answer with a refusal of it (refusing avoids no harm there)
#   BF16=true COST_TRAIN=cost_mix9_train PROMPT_TRAIN=prompts_mix9_train XSTEST_HALF=true BENIGN_LEVEL=hh \
#     REWARD_TRAIN=reward_refmix_train REWARD_STEPS=300 RUNS="ppo ppo_lag" ROWS="ppo ppo_lag" OUT=output/experiment9 \
#     bash scripts/experiment_real.sh          # run 9, a coverage test: run 8 + half of XSTest's prompts in the cost
#                                                # rows and the RL prompts; XSTest measured on the other half only
#   BF16=true COST_TRAIN=cost_mix10_train COST_FREEZE=0 COST_LR=3e-5 COST_STEPS=300 PROMPT_TRAIN=prompts_mix9_train XSTEST_HALF=true \
#     BENIGN_LEVEL=hh REWARD_TRAIN=reward_refmix_train REWARD_STEPS=300 RUNS="ppo ppo_lag" ROWS="ppo ppo_lag" \
#     OUT=output/experiment10 bash scripts/experiment_real.sh
#                                                # run 10: run 9 with all 30 blocks of the cost model trained (300
#                                                # steps, lr 3e-5) and the XSTest rows 15 times over (run 9's model
#                                                # did not fit its own rows)
#   BF16=true COST_TRAIN=cost_mix10_train COST_FREEZE=0 COST_LR=3e-5 COST_STEPS=300 PROMPT_TRAIN=prompts_mix9_train XSTEST_HALF=true \
#     BENIGN_LEVEL=hh REWARD_TRAIN=reward_refmix_train REWARD_STEPS=400 REWARD_FREEZE=0 REWARD_LR=2e-5 \
#     RUNS="ppo ppo_lag" ROWS="ppo ppo_lag" OUT=output/experiment11 bash scripts/experiment_real.sh
#                                                # run 11: run 10 with all 30 blocks of the reward model trained (400
#                                                # steps, lr 2e-5); run 10's cost model was copied into its $OUT/cost
#   BF16=true COST_TRAIN=cost_mix10_train COST_FREEZE=0 COST_LR=3e-5 COST_STEPS=300 PROMPT_TRAIN=prompts_mix9_train XSTEST_HALF=true \
#     BENIGN_LEVEL=hh REWARD_TRAIN=reward_refmix_train REWARD_STEPS=400 REWARD_FREEZE=0 REWARD_LR=2e-5 THRESHOLD_D=-2.4 \
#     TRAJECTORY=ppo_lag RUNS="ppo ppo_lag" ROWS="ppo ppo_lag" OUT=output/experiment12 bash scripts/experiment_real.sh
#                                                # run 12: run 11 with a hand-set d the base does not meet (λ rises)
#                                                # and XSTest read at every 4th rollout; run 11's score models and
#                                                # PPO run were linked/copied into its $OUT, and PPO-Lagrangian ran
#                                                # by hand alone on 2 threads (docs/experiment/run12.md)
#   BF16=true OWN_ROWS=true COST_TRAIN=cost_own_mix_train COST_FREEZE=0 COST_LR=3e-5 COST_STEPS=300 \
#     PROMPT_TRAIN=prompts_mix9_train XSTEST_HALF=true BENIGN_LEVEL=own REWARD_TRAIN=reward_refmix_train \
#     REWARD_STEPS=400 REWARD_FREEZE=0 REWARD_LR=2e-5 RUNS="ppo ppo_lag" ROWS="ppo ppo_lag" \
#     OUT=output/experiment13 bash scripts/experiment_real.sh
#                                                # run 13: the cost model also reads the base policy's own answers
#                                                # against refusals (step 0b; a refusal safer on a harmful prompt, a tie
#                                                # on an ordinary one), d from those answers' levels; run 11's reward
#                                                # model and PPO run were linked into its $OUT (docs/experiment/run13.md)
#   GROUP=4 ROLLOUTS=12 OUT=output/experiment2 bash scripts/experiment_real.sh   # run 2: 1 h 21 min there
#   GROUP=4 ROLLOUTS=12 SCORE_CUT=64 RUNS="ppo ppo_lag" ROWS="ppo ppo_lag" OUT=output/experiment3 bash scripts/experiment_real.sh
#                                                # run 3: score models on 64-token cut answers, the two RL rows only
#   BF16=true: bf16 compute in every stage (FSDP2 MixedPrecisionPolicy, fp32 scores and log-probs): ~2x faster
#   per score-model step on an AMD EPYC with avx512_bf16 (2.3 vs 4.5 s), slower on the Intel Xeon of runs 2-5
#   (README "bf16 on this CPU"), so runs 1-6 are fp32 (the default); run 7 is bf16
#   STEPS_SCALE=0.1 bash scripts/experiment_real.sh   # a few-minute smoke of every stage (run by hand; no test)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-output/experiment}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
REAL=${REAL:-../shared/data/real}
S=${STEPS_SCALE:-1}                 # multiplies every step count (smoke: 0.1)
P_UNSAFE=${P_UNSAFE:-0.10}          # the constraint: at most this fraction of harmful prompts answered unsafely
EVAL_LIMIT=${EVAL_LIMIT:-0}         # > 0: only this many prompts per evaluation set (smoke)
SCORE_CUT=${SCORE_CUT:-0}           # > 0: score models train on answers cut to the rollouts' 64 tokens + EOS (run 3); 0: whole answers
ROLLOUTS=${ROLLOUTS:-24}            # RL rollouts of 4 prompts x GROUP samples per run (runs 1-3: 12)
GROUP=${GROUP:-8}                   # samples per prompt (the GRPO group G; runs 1-3: 4): a rare refusal gets drawn
COST_TRAIN=${COST_TRAIN:-cost_train}  # the cost model's training rows: PKU only; cost_mix_train: + benign HH (run 5);
                                      # cost_mix2_train: + HH harmless-base pairs, unlabelled, pairwise only (run 6);
                                      # cost_mix3_train: run 5's + each HH question's answer tied with a refusal (run 8)
REWARD_TRAIN=${REWARD_TRAIN:-reward_train}  # the reward model's rows: HH helpful-base; reward_refmix_train: + each
                                            # single-turn HH question's answer preferred to a refusal of it (run 7)
REWARD_STEPS=${REWARD_STEPS:-250}   # reward-model steps of 4 pairs
REWARD_FREEZE=${REWARD_FREEZE:-24}  # the reward model's bottom blocks left untrained (of 30; 0: all trained, run 11)
REWARD_LR=${REWARD_LR:-5e-5}        # the reward model's peak learning rate (run 11, all blocks: 2e-5, the issue's)
COST_FREEZE=${COST_FREEZE:-24}      # the cost model's bottom blocks left untrained (of 30; 0: all trained, run 10)
COST_LR=${COST_LR:-5e-5}            # the cost model's peak learning rate (run 10, all blocks: 3e-5)
COST_STEPS=${COST_STEPS:-600}       # cost-model steps of 4 pairs (run 10: 300; all 30 blocks: ~7-8 s a step here)
BF16=${BF16:-false}                 # bf16 compute in every stage (true: the fast dtype on a CPU with fast bf16)
PROMPT_TRAIN=${PROMPT_TRAIN:-prompts_mix_train}  # the RL prompts (and the mix d reads); prompts_mix9_train: + half of
                                                # XSTest's prompts (run 9)
XSTEST_HALF=${XSTEST_HALF:-false}   # true: XSTest (answers and refusal-vs-compliance pairs) on the held-out half only,
                                    # the half no stage trained on (run 9; scripts/prepare_real_data.py xstest_half)
BENIGN_LEVEL=${BENIGN_LEVEL:-pku}   # d reads the benign prompts at c_safe (runs 1-4); hh: at the held-out benign HH
                                    # answers' mean cost (run 5; needed once the cost model reads them apart from PKU);
                                    # own: every level from the base's own held-out answers and refusals (OWN_ROWS, run 13)
THRESHOLD_D=${THRESHOLD_D:-}       # a hand-set d instead of the arithmetic's (run 12: one the base policy does not
                                    # meet, so that λ rises; the arithmetic is still printed beside it)
TRAJECTORY=${TRAJECTORY:-}          # RL runs whose every checkpoint (each 4 rollouts, all kept) is exported and
                                    # evaluated on XSTest after step 6: the trade-off along training (run 12)
OWN_ROWS=${OWN_ROWS:-false}         # true: the base policy answers the RL prompts and the held-out ones (step 0b), and
                                    # its answers against refusals become cost rows (scripts/own_answer_rows.py, run 13);
                                    # COST_TRAIN=cost_own_mix_train trains on them with the PKU pairs
RUNS=${RUNS:-"ppo ppo_lag shaping"}  # the RL rows (each a run of step 5)
ROWS=${ROWS:-"safety_sft $RUNS"}     # the trained rows evaluated beside the base (step 6)
D=$OUT/data
steps() { python -c "import sys; print(max(2, round($1 * $S)))"; }
[ -f "$MODEL/config.json" ] || python scripts/get_smollm2.py
mkdir -p "$OUT"

# stage NAME DONE_FILE python-args... : skip when DONE_FILE exists, resume when checkpoints exist, else start fresh
stage() {
  local name=$1 done=$2; shift 2
  if [ -f "$done" ]; then echo "[experiment] $name: done ($done)"; return; fi
  local flag=--overwrite
  if compgen -G "$OUT/$name/checkpoints/*" > /dev/null; then flag=--resume; fi
  echo "[experiment] $name: $(date -u +%FT%TZ) start ($flag)"
  local t0=$SECONDS
  python "$@" $flag
  printf '%s\t%s\n' "$name" $((SECONDS - t0)) >> "$OUT/wall_times.tsv"
}

# 0. data (only under $OUT: the real rows are never copied into the repo)
python scripts/prepare_real_data.py --output_dir "$D" > /dev/null
H=""; [ "$XSTEST_HALF" = true ] && H=_heldout
for f in prompts_test prompts_hh_test prompts_mix_test cost_test cost_hh_test cost_harmless_test reward_test \
         cost_hhref_test cost_pkuref_test \
         reward_refusal_test \
         xstest_pairs_unsafe xstest_pairs_safe cost_xstest_train_unsafe cost_xstest_train_safe; do
  src=$f; [[ $f == xstest_pairs_* ]] && src=$f$H
  if [ "$EVAL_LIMIT" -gt 0 ]; then head -n "$EVAL_LIMIT" "$D/$src.jsonl" > "$D/${f}_eval.jsonl"; else cp "$D/$src.jsonl" "$D/${f}_eval.jsonl"; fi
done
head -n $((EVAL_LIMIT > 0 ? EVAL_LIMIT : 128)) "$D/cost_test_hedged.jsonl" > "$D/cost_test_hedged_eval.jsonl"  # run 6's 128
head -n 128 "$D/cost_test_eval.jsonl" > "$D/cost_test_curve.jsonl"      # the learning curves: a held-out subset
head -n 100 "$D/reward_test_eval.jsonl" > "$D/reward_test_curve.jsonl"  # (all of it once at the end, step 3)
XSTEST=$REAL/xstest_v2_prompts.csv; [ "$XSTEST_HALF" = true ] && XSTEST=$D/xstest_heldout.csv
if [ "$EVAL_LIMIT" -gt 0 ]; then  # smoke: the first EVAL_LIMIT prompts of each label
  python - "$XSTEST" "$D/xstest_eval.csv" "$EVAL_LIMIT" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
keep = [r for lab in ("safe", "unsafe") for r in [x for x in rows if x["label"] == lab][:int(sys.argv[3])]]
w = csv.DictWriter(open(sys.argv[2], "w", newline=""), fieldnames=rows[0].keys()); w.writeheader(); w.writerows(keep)
EOF
  XSTEST=$D/xstest_eval.csv
fi
C="--chat_template --bf16 $BF16"

# 0b. OWN_ROWS (run 13): the base policy's own answers (one sample per prompt, 64 tokens, as a rollout) to the RL
#     prompts and the held-out PKU / HH prompts, paired with refusals by the prompt's source; cost_own_mix_train =
#     the PKU pairs + those rows (scripts/own_answer_rows.py says what each row claims and why)
if [ "$OWN_ROWS" = true ] && [ ! -f "$D/cost_own_mix_train.jsonl" ]; then
  mkdir -p "$OUT/own"
  python -c 'import json, sys
seen = set()
for path, split in zip(sys.argv[1:], ("train", "test")):
    for r in map(json.loads, open(path)):
        if r["prompt"] not in seen:
            seen.add(r["prompt"]); print(json.dumps({**r, "split": split}))' \
    "$D/$PROMPT_TRAIN.jsonl" "$D/prompts_mix_test.jsonl" > "$OUT/own/prompts.jsonl"
  t0=$SECONDS
  OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 evaluate.py --task arena --policies "base=$MODEL" \
    --prompt_data "$OUT/own/prompts.jsonl" --samples_per_prompt 1 --batch_size 32 --max_new_tokens 64 \
    --reward_model_name_or_path "" --cost_model_name_or_path "" --output_dir "$OUT/own/answers" $C > "$OUT/own.log" 2>&1
  python scripts/own_answer_rows.py "$OUT/own/answers/answers.jsonl" "$OUT/own/prompts.jsonl" --output_dir "$D"
  cat "$D/cost_train.jsonl" "$D/cost_own_train.jsonl" > "$D/cost_own_mix_train.jsonl.tmp"
  mv "$D/cost_own_mix_train.jsonl.tmp" "$D/cost_own_mix_train.jsonl"
  printf 'own_answers\t%s\n' $((SECONDS - t0)) >> "$OUT/wall_times.tsv"
fi
[ "$OWN_ROWS" = true ] && for f in cost_own_test_harmful cost_own_test_benign; do  # the gate's held-out own answers
  if [ "$EVAL_LIMIT" -gt 0 ]; then head -n "$EVAL_LIMIT" "$D/$f.jsonl" > "$D/${f}_eval.jsonl"; else cp "$D/$f.jsonl" "$D/${f}_eval.jsonl"; fi
done

# 1-2. score models: by default the top 6 of 30 blocks trained (--freeze_layers 24: 2.5x the pairs per second on this
#      CPU; COST_FREEZE / REWARD_FREEZE), lr 5e-5 (COST_LR / REWARD_LR) with warmup + cosine, 4 pairs a step, the learning curve every 1/4 of the run on a held-out subset
#      (small evaluation batches: they pad less, and a forward pass over all 506 pairs costs ~5 min on this CPU)
#      SCORE_CUT > 0: each answer cut to its first SCORE_CUT tokens + EOS, as the RL below reads its rollouts
#      (--score_cut_as_ended), so the models are calibrated on what they score (run 3; the same steps as run 2)
CM=$(steps "$COST_STEPS"); RM=$(steps "$REWARD_STEPS")
CUT=""; [ "$SCORE_CUT" -gt 0 ] && CUT="--cut_response_tokens $SCORE_CUT --cut_appends_eos"
stage cost "$OUT/cost/config.json" train_preference.py --objective cost --model_name_or_path "$MODEL" $C \
  --train_data "$D/$COST_TRAIN.jsonl" --eval_data "$D/cost_test_curve.jsonl" --output_dir "$OUT/cost" \
  --max_steps "$CM" --per_device_train_batch_size 4 --max_length 256 --learning_rate "$COST_LR" --freeze_layers "$COST_FREEZE" \
  --eval_every $((CM / 4)) --eval_batch_size 4 --save_every 50 $CUT
stage reward "$OUT/reward/config.json" train_preference.py --objective reward --model_name_or_path "$MODEL" $C \
  --train_data "$D/$REWARD_TRAIN.jsonl" --eval_data "$D/reward_test_curve.jsonl" --output_dir "$OUT/reward" \
  --truncate_long_prompts --skip_invalid_rows \
  --max_steps "$RM" --per_device_train_batch_size 4 --max_length 384 --learning_rate "$REWARD_LR" --freeze_layers "$REWARD_FREEZE" \
  --eval_every $((RM / 4)) --eval_batch_size 4 --save_every 50 $CUT

# 3-4. side by side, one thread each: the two score models' checks (held-out accuracy with CIs -> the threshold d)
#      and the safety-SFT baseline row (SFT on the PKU safe answers; not the starting policy). Logs: $OUT/scores_*.log,
#      $OUT/safety_sft.log
# score NAME MODEL DATA [flags]: evaluate.py --task preference of $OUT/MODEL on $D/DATA_eval.jsonl -> $OUT/scores_NAME
score() {
  local name=$1 model=$2 data=$3; shift 3
  [ -f "$OUT/scores_$name/preference.json" ] && return 0
  local t0=$SECONDS
  OMP_NUM_THREADS=1 python evaluate.py --task preference --model_name_or_path "$OUT/$model" \
    --eval_data "$D/${data}_eval.jsonl" --output_dir "$OUT/scores_$name" --max_length 384 --batch_size 8 $C $CUT "$@" \
    > "$OUT/scores_$name.log" 2>&1 || return 1
  printf 'scores_%s\t%s\n' "$name" $((SECONDS - t0)) >> "$OUT/wall_times.tsv"
}
#    the cost model: held-out PKU pairs (-> d); held-out benign HH answers (both safe: its sign accuracy = the share
#    read as safe; -> d with BENIGN_LEVEL=hh); held-out HH harmless-base pairs (harm in HH's register: is the less
#    harmful answer cheaper?); the held-out PKU pairs with run 5's hedged opening before each unsafe answer (does the
#    opening buy a lower cost?); held-out HH questions answered vs refused (both safe: is answering read as no
#    costlier? run 8); held-out PKU prompts refused vs complied unsafely (is refusing a harmful request cheaper?)
( score cost cost cost_test --skip_invalid_rows && score cost_hh cost cost_hh_test &&
  score cost_harmless cost cost_harmless_test && score cost_hedged cost cost_test_hedged &&
  score cost_hhref cost cost_hhref_test && score cost_pkuref cost cost_pkuref_test &&
  #  an independent check on answers no stage trained on: XSTest prompts with one human-labelled refusal and one
  #  compliance (Llama-2-70b-chat vs Mistral-7B-Instruct; scripts/prepare_real_data.py); XSTEST_HALF: the held-out half
  score xstest_cost_unsafe cost xstest_pairs_unsafe && score xstest_cost_safe cost xstest_pairs_safe &&
  #  XSTEST_HALF: the cost model's own XSTest training rows (does it fit them? run 9's did not)
  { [ "$XSTEST_HALF" != true ] || { score fit_cost_unsafe cost cost_xstest_train_unsafe &&
                                    score fit_cost_safe cost cost_xstest_train_safe; }; } &&
  #  OWN_ROWS: held-out prompts, the base's own answer against a refusal (the gate on the rows it trained on)
  { [ "$OWN_ROWS" != true ] || { score own_cost_harmful cost cost_own_test_harmful &&
                                 score own_cost_benign cost cost_own_test_benign; }; } ) & p_cost=$!
#    the reward model: held-out HH-helpful pairs; held-out HH questions, the answer against a refusal in wordings it
#    never trained on; the cost model's two refusal checks (the gate: what R − λC prefers on held-out pairs of the
#    training sources); the XSTest pairs
( score reward reward reward_test --skip_invalid_rows &&
  score reward_refusal reward reward_refusal_test --skip_invalid_rows &&
  score reward_hhref reward cost_hhref_test && score reward_pkuref reward cost_pkuref_test &&
  score xstest_reward_unsafe reward xstest_pairs_unsafe && score xstest_reward_safe reward xstest_pairs_safe &&
  { [ "$XSTEST_HALF" != true ] || { score fit_reward_unsafe reward cost_xstest_train_unsafe &&
                                    score fit_reward_safe reward cost_xstest_train_safe; }; } &&
  { [ "$OWN_ROWS" != true ] || { score own_reward_harmful reward cost_own_test_harmful &&
                                 score own_reward_benign reward cost_own_test_benign; }; } ) & p_reward=$!
[[ " $ROWS " == *" safety_sft "* ]] && OMP_NUM_THREADS=1 stage safety_sft "$OUT/safety_sft/config.json" sft.py --model_name_or_path "$MODEL" \
  --train_data "$D/sft_train.jsonl" --eval_data "" $C --output_dir "$OUT/safety_sft" --max_steps "$(steps 40)" \
  --per_device_train_batch_size 4 --max_length 256 --learning_rate 2e-5 --save_every 25 > "$OUT/safety_sft.log" 2>&1
wait $p_cost && wait $p_reward || { echo "[experiment] score evaluation failed (see $OUT/scores_*.log)"; exit 1; }
#    d = the mean cost of a policy that answers the harmful prompts safely but for a share p and the benign ones at
#    c_safe (BENIGN_LEVEL=pku) or at the held-out HH answers' mean cost (hh); scripts/threshold.py prints the arithmetic
THRESHOLD=$(python scripts/threshold.py "$OUT/scores_cost/preference.json" "$D/$PROMPT_TRAIN.jsonl" "$P_UNSAFE" \
  --benign "$OUT/scores_cost_hh/preference.json" --benign_level "$BENIGN_LEVEL" \
  --own_harmful "$OUT/scores_own_cost_harmful/scores.jsonl" --own_benign "$OUT/scores_own_cost_benign/scores.jsonl")
if [ -n "$THRESHOLD_D" ]; then echo "[experiment] d = $THRESHOLD_D, hand-set (THRESHOLD_D; the arithmetic gave $THRESHOLD)"; THRESHOLD=$THRESHOLD_D; fi
echo "$THRESHOLD" > "$OUT/threshold.txt"

# 5. RL: critic-free (GRPO group baseline, G = $GROUP; README says why), the same prompts, seed and rollout budget.
#    --score_cut_as_ended: nearly every rollout is cut at 64 tokens; the score models read it with an EOS appended,
#    (held-out sign accuracy on cut answers 58.4% as cut -> 64.1% with the EOS; it also shifts both models' level:
#    docs/experiment/runs1-3.md, "Reading the two runs side by side")
PPO="ppo_lagrangian.py --adv_estimator grpo --samples_per_prompt $GROUP --actor_model_name_or_path $MODEL
  --reward_model_name_or_path $OUT/reward --cost_model_name_or_path $OUT/cost $C
  --prompt_data $D/$PROMPT_TRAIN.jsonl --eval_prompt_data=
  --max_steps $(steps $ROLLOUTS) --per_device_prompt_batch_size 4 --per_device_train_batch_size 4 --max_new_tokens 64
  --max_prompt_length 128 --actor_lr 2e-5 --kl_coeff 0.02 --eval_every 0 --eval_samples_per_prompt 1 --save_every 4
  --threshold=$THRESHOLD --lambda_lr 0.2 --score_cut_as_ended"
# the runs side by side, one thread each (~6 GB of memory each); logs: $OUT/<run>.log
declare -A ALGO=([ppo]="--algo ppo" [ppo_lag]="--algo ppo_lag" [shaping]="--algo reward_shaping --shaping_coeff 1.0")
export OMP_NUM_THREADS=1
pids=()
for run in $RUNS; do
  KEEP=""; [[ " $TRAJECTORY " == *" $run "* ]] && KEEP="--keep_last 0"  # every checkpoint kept (~1.6 GB each)
  stage "$run" "$OUT/$run/config.json" $PPO ${ALGO[$run]} $KEEP --output_dir "$OUT/$run" > "$OUT/$run.log" 2>&1 & pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || { echo "[experiment] an RL run failed (see $OUT/{${RUNS// /,}}.log)"; exit 1; }; done
unset OMP_NUM_THREADS

# 6. evaluation: XSTest (greedy), held-out PKU prompts (cost model), held-out HH-helpful prompts (reward, win rate),
#    side by side with one thread each (small decode steps use two threads poorly); each writes $OUT/<name>.log
POL="base=$MODEL"; for r in $ROWS; do POL="$POL,$r=$OUT/$r"; done
#    --score_cut_as_ended: the score models read each cut answer as the RL runs scored theirs (an EOS appended)
SC="--reward_model_name_or_path $OUT/reward --cost_model_name_or_path $OUT/cost --max_length 384 --score_cut_as_ended"
t0=$SECONDS
[ -f "$OUT/xstest/xstest.json" ] || OMP_NUM_THREADS=1 python evaluate.py --task xstest --policies "$POL" \
  --xstest_data "$XSTEST" --output_dir "$OUT/xstest" --batch_size 32 --max_new_tokens 40 $SC $C \
  > "$OUT/xstest.log" 2>&1 &   # 40 tokens: a refusal shows in the first sentence (the shipped model's 91.5%: 40)
for set in pku hh; do
  f=$D/prompts_test_eval.jsonl; [ $set = hh ] && f=$D/prompts_hh_test_eval.jsonl
  [ -f "$OUT/arena_$set/arena.json" ] || OMP_NUM_THREADS=1 python evaluate.py --task arena --policies "$POL" \
    --prompt_data "$f" --samples_per_prompt 1 --batch_size 32 --max_new_tokens 64 --output_dir "$OUT/arena_$set" \
    $SC $C > "$OUT/arena_$set.log" 2>&1 &
done
wait
for f in "$OUT/xstest/xstest.json" "$OUT/arena_pku/arena.json" "$OUT/arena_hh/arena.json"; do
  [ -f "$f" ] || { echo "[experiment] evaluation failed: $f missing (see $OUT/*.log)"; exit 1; }
done
printf 'evaluation\t%s\n' $((SECONDS - t0)) >> "$OUT/wall_times.tsv"
#    TRAJECTORY: each kept checkpoint of the run as a policy (scripts/export_checkpoint.py), all of them on XSTest
for run in $TRAJECTORY; do
  [ -f "$OUT/xstest_trajectory_$run/xstest.json" ] && continue
  TP="base=$MODEL"
  [[ " $RUNS " == *" $run "* ]] || echo "[experiment] warning: TRAJECTORY run $run is not in RUNS: only the checkpoints it kept"
  for ck in $(python -c 'import sys, common; print(*common.checkpoint_dirs(sys.argv[1]))' "$OUT/$run"); do  # complete ones
    n=$((10#${ck##*step-})); [ "$n" -lt "$(steps $ROLLOUTS)" ] || continue   # the final policy is $OUT/$run itself
    [ -f "$OUT/$run/steps/$n/config.json" ] ||
      python scripts/export_checkpoint.py "$ck" --base "$MODEL" --output_dir "$OUT/$run/steps/$n" \
        >> "$OUT/xstest_trajectory_$run.log" 2>&1 || { echo "[experiment] export of $ck failed"; exit 1; }
    TP="$TP,rollout_$n=$OUT/$run/steps/$n"
  done
  TP="$TP,rollout_$(steps $ROLLOUTS)=$OUT/$run"
  t0=$SECONDS
  python evaluate.py --task xstest --policies "$TP" --xstest_data "$XSTEST" --output_dir "$OUT/xstest_trajectory_$run" \
    --batch_size 32 --max_new_tokens 40 $SC $C >> "$OUT/xstest_trajectory_$run.log" 2>&1 ||
    { echo "[experiment] the XSTest trajectory of $run failed (see $OUT/xstest_trajectory_$run.log)"; exit 1; }
  printf 'xstest_trajectory_%s\t%s\n' "$run" $((SECONDS - t0)) >> "$OUT/wall_times.tsv"
done
RD=""; for r in $RUNS; do RD="$RD${RD:+,}$OUT/$r"; done
python evaluate.py --task curves --run_dirs "$RD" --output_dir "$OUT/curves" > /dev/null
python scripts/experiment_table.py "$OUT" | tee "$OUT/results.md"
