"""fp32 vs --bf16 on this CPU, stage by stage, on a real chat model (SmolLM2-135M-Instruct, `scripts/get_smollm2.py`)
and real rows (PKU-SafeRLHF from ../shared/data/real, prepared by scripts/prepare_real_data.py under output/): an SFT
step, a cost-model step, and one PPO-Lagrangian rollout with gae (6 models) and grpo (4 models) split into generate /
score / update; peak RSS and the parameter + optimiser bytes the rank holds. Every number is the stage's own
timings.jsonl (median after the warm-up steps), 1 rank, 2 threads.

    python scripts/get_smollm2.py && python bench/bench_bf16.py        # ~15 min; writes bench/results/bf16.json
    python bench/bench_bf16.py --only ppo --steps 3
"""
import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _util  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    ap.add_argument("--only", default="sft,cost,ppo", help="comma-separated: sft, cost, ppo")
    ap.add_argument("--steps", type=int, default=4, help="steps (PPO: rollouts) per run; the first 2 are warm-up")
    ap.add_argument("--responses", type=int, default=8, help="PPO: responses per rollout (grpo: responses/4 prompts x 4)")
    ap.add_argument("--length", type=int, default=32, help="PPO: response tokens")
    a = ap.parse_args()
    if not os.path.exists(os.path.join(_util.ROOT, a.model, "config.json")):
        raise SystemExit(f"error: {a.model} does not exist: run python scripts/get_smollm2.py first")
    data = os.path.join("output", "real-data")
    if not os.path.exists(os.path.join(_util.ROOT, data, "cost_train.jsonl")):
        subprocess.run([sys.executable, "scripts/prepare_real_data.py"], cwd=_util.ROOT, check=True)
    out = os.path.join("bench", ".cache", "runs_bf16")
    only = a.only.split(",")
    results = {"machine": _util.machine(), "date": time.strftime("%Y-%m-%d"), "model": a.model, "runs": []}
    common_flags = ["--overwrite", "--save_model", "False", "--chat_template", "--log_every", 1]
    jobs = []
    if "sft" in only:
        jobs.append(("sft step (4 rows x <=256 tokens)", "sft.py", [
            "--model_name_or_path", a.model, "--train_data", f"{data}/sft_train.jsonl", "--eval_data", "", "--judge", "",
            "--max_length", 256, "--per_device_train_batch_size", 4, "--max_steps", a.steps + 2]))
    if "cost" in only:
        jobs.append(("cost-model step (4 pairs x <=256 tokens)", "train_preference.py", [
            "--objective", "cost", "--model_name_or_path", a.model, "--train_data", f"{data}/cost_train.jsonl",
            "--eval_data", "", "--max_length", 256, "--per_device_train_batch_size", 4, "--max_steps", a.steps + 2,
            "--score_stats_rows", 8]))
    if "ppo" in only:
        for est, g in (("gae", 1), ("grpo", 4)):
            jobs.append((f"PPO-Lagrangian rollout, {est} ({a.responses} x {a.length} tokens)", "ppo_lagrangian.py", [
                "--adv_estimator", est, "--samples_per_prompt", g, "--actor_model_name_or_path", a.model,
                "--reward_model_name_or_path", a.model, "--cost_model_name_or_path", a.model,
                "--prompt_data", f"{data}/prompts_train.jsonl", "--eval_prompt_data", "", "--judge", "",
                "--eval_every", 0, "--max_new_tokens", a.length, "--max_steps", a.steps,
                "--per_device_prompt_batch_size", a.responses // g, "--per_device_train_batch_size", a.responses // 2]))
    rows = []
    for name, script, flags in jobs:
        med = {}
        for dtype in ("fp32", "bf16"):
            tag = name.split(" (")[0].replace(" ", "_").replace(",", "")
            timings = _util.run_stage(script, [*flags, *common_flags, "--bf16", "true" if dtype == "bf16" else "false",
                                               "--output_dir", f"{out}/{tag}_{dtype}"], env={"OMP_NUM_THREADS": "2"})
            s = _util.summary(timings)
            med[dtype] = {k: _util.median_steps(timings, k) for k in ("time/step", "time/generate", "time/score",
                                                                       "time/update")}
            r = {"job": name, "dtype": dtype, **med[dtype], "peak_rss_mb": max(s["peak_rss_mb"]),
                 "param_optim_mb": max(s["param_optim_mb"])}
            results["runs"].append(r)
            rows.append([name, dtype, r["time/step"], r["time/generate"], r["time/score"], r["time/update"],
                         r["peak_rss_mb"], r["param_optim_mb"],
                         med["fp32"]["time/step"] / r["time/step"] if dtype == "bf16" else 1.0])
    print(f"\n{a.model}, 1 rank, 2 threads; median seconds over steps 3..")
    _util.table(["job", "dtype", "s/step", "generate", "score", "update", "peak RSS MB", "params+optim MB", "speed-up"],
                rows)
    _util.write("bf16", results)


if __name__ == "__main__":
    main()
