"""Our stages, step by step, on the tiny Llama: tokens/s of an SFT step and of a preference-model step; a PPO step
split into its phases (generate, score, advantages, λ, update) with generation tokens/s, for --algo ppo and
--algo ppo_lag; peak memory and the parameter + optimiser bytes each rank holds; 1 and 2 ranks; PPO response
lengths 16/64/256. Every number comes from the stages' own timings.jsonl (steady state: median after 2 warm-up
steps), so this measures the code a user runs.

    python bench/bench_steps.py                 # writes bench/results/steps.json (~10 min on 2 CPU cores)
    python bench/bench_steps.py --lengths 64 --ranks 1 --steps 6
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _util  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="16,64,256")
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts_per_rank", type=int, default=16)
    args = ap.parse_args()
    policy, score = _util.random_models()
    out = os.path.join(_util.CACHE, "steps")
    results = {"machine": _util.machine(), "date": time.strftime("%Y-%m-%d"), "supervised": [], "ppo": []}
    common_flags = ["--overwrite", "--save_model", "False", "--log_every", 1]
    sup_rows, ppo_rows = [], []
    for nproc in [int(x) for x in args.ranks.split(",")]:
        for stage, script, flags in (
                ("sft", "sft.py", ["--model_name_or_path", policy, "--judge", "", "--eval_data", ""]),
                ("reward model", "train_preference.py", ["--model_name_or_path", policy, "--eval_data", "",
                                                         "--score_stats_rows", 16])):
            rows = _util.run_stage(script, [*flags, *common_flags, "--max_steps", args.steps,
                                            "--per_device_train_batch_size", 16, "--output_dir", f"{out}/{stage}{nproc}"], nproc)
            s = _util.summary(rows)
            step = _util.median_steps(rows, "time/step")
            tokens = _util.median_steps(rows, "tokens/train")
            r = {"stage": stage, "ranks": nproc, "step_s": step, "tokens_per_s": tokens / step,
                 "peak_rss_mb_per_rank": s.get("peak_rss_mb"), "param_optim_mb_per_rank": s.get("param_optim_mb")}
            results["supervised"].append(r)
            sup_rows.append([stage, nproc, step, r["tokens_per_s"], max(s["peak_rss_mb"]), max(s["param_optim_mb"])])
        for length in [int(x) for x in args.lengths.split(",")]:
            for algo in ("ppo", "ppo_lag"):
                rows = _util.run_stage("ppo_lagrangian.py", [
                    "--algo", algo, "--actor_model_name_or_path", policy, "--reward_model_name_or_path", score,
                    "--cost_model_name_or_path", score, "--eval_prompt_data", "", "--judge", "", "--eval_every", 0,
                    "--max_new_tokens", length, "--max_steps", args.steps, *common_flags,
                    "--per_device_prompt_batch_size", args.prompts_per_rank,
                    "--per_device_train_batch_size", args.prompts_per_rank // 2,
                    "--output_dir", f"{out}/{algo}{nproc}_{length}"], nproc)
                s = _util.summary(rows)
                med = {k: _util.median_steps(rows, k) for k in
                       ("time/step", "time/generate", "time/score", "time/signals", "time/lambda", "time/advantages", "time/update",
                        "tokens/generated")}
                r = {"algo": algo, "ranks": nproc, "response_length": length, **med,
                     "generation_tokens_per_s": med["tokens/generated"] / med["time/generate"],
                     "peak_rss_mb_per_rank": s.get("peak_rss_mb"), "param_optim_mb_per_rank": s.get("param_optim_mb")}
                results["ppo"].append(r)
                ppo_rows.append([algo, nproc, length, med["time/step"], med["time/generate"], med["time/score"],
                                 med["time/signals"] + med["time/lambda"] + med["time/advantages"], med["time/update"],
                                 r["generation_tokens_per_s"], max(s["peak_rss_mb"]), max(s["param_optim_mb"])])
    print("\nSupervised steps (median wall time per optimiser step)")
    _util.table(["stage", "ranks", "step s", "tokens/s", "peak RSS MB/rank", "params+optim MB/rank"], sup_rows)
    print("\nPPO steps (one rollout batch; median seconds per phase)")
    _util.table(["algo", "ranks", "resp len", "step s", "generate", "score", "signals+λ+adv", "update", "gen tok/s",
                 "peak RSS MB/rank", "params+optim MB/rank"], ppo_rows)
    ratios = []
    for r in results["ppo"]:
        if r["algo"] == "ppo_lag":
            base = next(b for b in results["ppo"] if b["algo"] == "ppo" and b["ranks"] == r["ranks"]
                        and b["response_length"] == r["response_length"])
            ratios.append([r["ranks"], r["response_length"], r["time/step"] / base["time/step"]])
    print("\n--algo ppo_lag / --algo ppo step time (target <= 1.35)")
    _util.table(["ranks", "resp len", "ratio"], ratios)
    results["ppo_lag_over_ppo"] = ratios
    mem = {}
    for kind in results["supervised"] + results["ppo"]:
        key = kind.get("stage") or f"{kind['algo']}@{kind['response_length']}"
        mem.setdefault(key, {})[kind["ranks"]] = max(kind["param_optim_mb_per_rank"])
    shard = [[k, v[1], v[2], v[2] / v[1]] for k, v in mem.items() if 1 in v and 2 in v]
    if shard:
        print("\nParameter + optimiser memory per rank, 2 ranks / 1 rank (target <= 0.6)")
        _util.table(["run", "1 rank MB", "2 ranks MB/rank", "ratio"], shard)
    results["memory_2_over_1"] = shard
    _util.write("steps", results)


if __name__ == "__main__":
    main()
