#!/usr/bin/env bash
# Run 6 (docs/experiment/run5-6.md, "Run 6, the cost model only"): the cost model's training data as the only difference, side by side
# with one thread each -- run 5's rows (cost_mix_train: PKU + benign HH-helpful ties) against run 6's (cost_mix2_train:
# + HH harmless-base pairs, safety null, pairwise only) -- at STEPS (300, half of experiment_real.sh's 600), then the
# held-out checks of experiment_real.sh's step 3 for each: PKU pairs, benign HH answers, harmless pairs, the hedge
# probe (first 128 PKU pairs), XSTest refusal-vs-compliance pairs. ~1 h 50 min on a 2-core AMD EPYC without AVX-512.
#   bash scripts/cost_data_ab.sh && python scripts/experiment_table.py output/ab/mix_table   # (and mix2_table)
set -euo pipefail
cd "$(dirname "$0")/.."
O=${OUT:-output/ab}; D=$O/data; STEPS=${STEPS:-300}
EVAL_LIMIT=${EVAL_LIMIT:-0}   # > 0: only this many pairs per held-out set (a smoke: STEPS=2 EVAL_LIMIT=4)
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
[ -f "$MODEL/config.json" ] || python scripts/get_smollm2.py
mkdir -p "$O"
python scripts/prepare_real_data.py --output_dir "$D" > "$O/data.log"
head -n 128 "$D/cost_test.jsonl" > "$D/cost_test_curve.jsonl"
head -n 128 "$D/cost_test_hedged.jsonl" > "$D/cost_test_hedged_128.jsonl"
for f in xstest_pairs_safe cost_hh_test cost_harmless_test cost_test_hedged_128 cost_test xstest_pairs_unsafe; do
  if [ "$EVAL_LIMIT" -gt 0 ]; then head -n "$EVAL_LIMIT" "$D/$f.jsonl" > "$D/${f}_eval.jsonl"; else cp "$D/$f.jsonl" "$D/${f}_eval.jsonl"; fi
done
one() {
  local name=$1 train=$2 t0=$SECONDS
  [ -f "$O/$name/config.json" ] || OMP_NUM_THREADS=1 python train_preference.py --objective cost \
    --model_name_or_path "$MODEL" --chat_template --train_data "$D/$train.jsonl" --eval_data "$D/cost_test_curve.jsonl" \
    --output_dir "$O/$name" --max_steps "$STEPS" --per_device_train_batch_size 4 --max_length 256 --learning_rate 5e-5 \
    --freeze_layers 24 --eval_every $((STEPS / 2)) --eval_batch_size 4 --save_every 50 \
    $(compgen -G "$O/$name/checkpoints/*" > /dev/null && echo --resume || echo --overwrite) > "$O/$name.log" 2>&1
  printf '%s\t%s\n' "$name" $((SECONDS - t0)) >> "$O/wall_times.tsv"
  mkdir -p "$O/${name}_table"; ln -sfn "../$name" "$O/${name}_table/cost"
  for e in xstest_cost_safe:xstest_pairs_safe cost_hh:cost_hh_test cost_harmless:cost_harmless_test \
           cost_hedged:cost_test_hedged_128 cost:cost_test xstest_cost_unsafe:xstest_pairs_unsafe; do
    local k=${e%%:*} dir=$O/${name}_table/scores_${e%%:*}
    t0=$SECONDS
    [ -f "$dir/preference.json" ] || OMP_NUM_THREADS=1 python evaluate.py --task preference --model_name_or_path "$O/$name" \
      --eval_data "$D/${e#*:}_eval.jsonl" --output_dir "$dir" --max_length 384 --batch_size 8 --chat_template > "$dir.log" 2>&1
    printf '%s_scores_%s\t%s\n' "$name" "$k" $((SECONDS - t0)) >> "$O/wall_times.tsv"
  done
}
one mix cost_mix_train & a=$!
one mix2 cost_mix2_train & b=$!
wait $a && wait $b
