"""What dropping the critics buys: PPO-Lagrangian with --adv_estimator gae (6 models) against grpo and rloo (4 models)
at the same number of generated responses per rollout (gae: P prompts x 1 sample; grpo/rloo: P/G prompts x G
samples), on 1 and 2 ranks. Per run: median seconds per rollout and per phase, peak RSS and the parameter + optimiser
bytes each rank holds (timings.jsonl). The tiny Llama with random weights by default (responses run to the requested
length); --model points at a real model (e.g. models/SmolLM2-135M-Instruct) where compute, not Python, dominates.

    python bench/bench_critic_free.py                                   # tiny, 1 and 2 ranks (~2 min)
    python bench/bench_critic_free.py --model models/SmolLM2-135M-Instruct --ranks 1 --responses 8 --length 32 --steps 4
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _util  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="", help="policy folder, also used as reward/cost model ('' = random tiny Llama)")
    ap.add_argument("--responses", type=int, default=32, help="generated responses per rank per rollout")
    ap.add_argument("--group", type=int, default=4, help="samples per prompt for grpo/rloo")
    ap.add_argument("--length", type=int, default=64, help="response tokens")
    ap.add_argument("--steps", type=int, default=8, help="rollouts per run (the first 2 are warm-up)")
    ap.add_argument("--ranks", default="1,2", help="world sizes to run")
    a = ap.parse_args()
    policy, score = (a.model, a.model) if a.model else _util.random_models()
    out = os.path.join("bench", ".cache", "runs_critic_free")
    results = {"machine": _util.machine(), "date": time.strftime("%Y-%m-%d"), "model": a.model or "tiny-llama (random)",
               "responses_per_rank": a.responses, "group": a.group, "length": a.length, "runs": []}
    rows = []
    for nproc in [int(x) for x in a.ranks.split(",")]:
        for est in ("gae", "grpo", "rloo"):
            g = 1 if est == "gae" else a.group
            timings = _util.run_stage("ppo_lagrangian.py", [
                "--algo", "ppo_lag", "--adv_estimator", est, "--samples_per_prompt", g,
                "--actor_model_name_or_path", policy, "--reward_model_name_or_path", score,
                "--cost_model_name_or_path", score, "--eval_prompt_data", "", "--judge", "", "--eval_every", 0,
                "--max_new_tokens", a.length, "--max_steps", a.steps, "--per_device_prompt_batch_size", a.responses // g,
                "--per_device_train_batch_size", a.responses // 2, "--save_model", "False", "--overwrite",
                *(["--chat_template"] if a.model else []), "--output_dir", f"{out}/{est}{nproc}"], nproc)
            s = _util.summary(timings)
            med = {k: _util.median_steps(timings, k) for k in ("time/step", "time/generate", "time/score", "time/update")}
            r = {"estimator": est, "ranks": nproc, **med, "peak_rss_mb_per_rank": s.get("peak_rss_mb"),
                 "param_optim_mb_per_rank": s.get("param_optim_mb")}
            results["runs"].append(r)
            rows.append([est, nproc, med["time/step"], med["time/generate"], med["time/score"], med["time/update"],
                         max(s["peak_rss_mb"]), max(s["param_optim_mb"])])
    print(f"\nPPO-Lagrangian, {a.responses} responses x {a.length} tokens per rank per rollout "
          f"({results['model']}; median over rollouts 3..{a.steps})")
    _util.table(["estimator", "ranks", "s/rollout", "generate", "score", "update", "peak RSS MB/rank",
                 "params+optim MB/rank"], rows)
    _util.write("critic_free" + ("_" + os.path.basename(a.model.rstrip("/")) if a.model else ""), results)


if __name__ == "__main__":
    main()
