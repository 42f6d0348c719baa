"""Critic-free rollouts side by side with TRL 1.16 (`GRPOTrainer`, `RLOOTrainer`; TRL's PPO is gone since 1.13), on a
real chat model: the same model (SmolLM2-135M-Instruct), prompts (PKU-SafeRLHF, chat template), group size G,
response length, batch (responses per optimiser step, one step per rollout), KL coefficient and reward model (the
model with a seeded score head, end score of prompt + response). Ours runs PPO-Lagrangian (`--adv_estimator grpo|rloo`),
which also scores a cost model and updates λ; TRL optimises the reward alone. Per run: median seconds per generated
sample (step time / responses, after 2 warm-up steps), mean response length, peak RSS. Each side runs in its own
process, one after the other, 2 threads, fp32 and --bf16 (TRL: `bf16=True`).

    python3 -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0 && .venv-bench/bin/pip install -r requirements.txt -r bench/requirements.txt
    .venv-bench/bin/python bench/bench_trl_grpo.py                # ~15 min; writes bench/results/trl_grpo.json
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _util  # noqa: E402

sys.path.insert(0, _util.ROOT)


def prompts(n):
    rows = [json.loads(l) for l in open(os.path.join(_util.ROOT, "output", "real-data", "prompts_train.jsonl"))]
    return [r["prompt"] for r in rows[:n]]


def trl_side(a):
    """One TRL run in this process -> {step times, mean completion length, peak RSS}."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForTokenClassification, AutoTokenizer, TrainerCallback
    import trl
    torch.manual_seed(42)
    tok = AutoTokenizer.from_pretrained(a.model)
    tok.padding_side = "left"
    scorer = AutoModelForTokenClassification.from_pretrained(a.model, num_labels=1,
                                                             dtype=torch.bfloat16 if a.bf16 else torch.float32).eval()
    times, lengths, last = [], [], [None]

    def reward(prompts, completions, **kw):  # the end score of prompt + completion, as our reward model reads it
        texts = [tok.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
        enc = tok(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
        with torch.no_grad():
            s = scorer(**enc).logits[..., 0].float()
        return s[torch.arange(len(texts)), enc["attention_mask"].sum(1) - 1].tolist()

    class Times(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            last[0] = last[0] or time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    Config, Trainer = (trl.GRPOConfig, trl.GRPOTrainer) if a.estimator == "grpo" else (trl.RLOOConfig, trl.RLOOTrainer)
    cfg = Config(output_dir=os.path.join(_util.CACHE, f"trl_{a.estimator}"), use_cpu=True, bf16=a.bf16,
                 per_device_train_batch_size=a.responses, num_generations=a.group, max_completion_length=a.length,
                 gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, beta=a.kl_coeff,
                 learning_rate=1e-5, max_steps=a.steps, logging_steps=1, report_to=[], save_strategy="no", seed=42,
                 temperature=1.0, top_p=1.0, top_k=0, disable_dropout=True, log_completions=False)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts(a.responses * a.steps)])
    trainer = Trainer(model=a.model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok,
                      callbacks=[Times()])
    trainer.train()
    return {"step_times": times, "mean_length": statistics.mean(lengths) if lengths else None,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def ours(a, dtype, estimator):
    out = os.path.join("bench", ".cache", "runs_trl_grpo", f"{estimator}_{dtype}")
    g = a.group
    timings = _util.run_stage("ppo_lagrangian.py", [
        "--adv_estimator", estimator, "--samples_per_prompt", g, "--actor_model_name_or_path", a.model,
        "--reward_model_name_or_path", a.model, "--cost_model_name_or_path", a.model, "--chat_template",
        "--prompt_data", os.path.join("output", "real-data", "prompts_train.jsonl"), "--eval_prompt_data", "",
        "--judge", "", "--eval_every", 0, "--max_new_tokens", a.length, "--max_steps", a.steps,
        "--per_device_prompt_batch_size", a.responses // g, "--per_device_train_batch_size", a.responses,
        "--kl_coeff", a.kl_coeff, "--actor_lr", 1e-5, "--save_model", "False", "--overwrite",
        "--bf16", "true" if dtype == "bf16" else "false", "--output_dir", out], env={"OMP_NUM_THREADS": "2"})
    steps = [r for r in timings if "step" in r]
    gen = [r["tokens/generated"] / a.responses for r in steps[2:]]
    return {"s_per_sample": _util.median_steps(timings, "time/step") / a.responses,
            "mean_length": statistics.mean(gen) if gen else None, "peak_rss_mb": max(_util.summary(timings)["peak_rss_mb"])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    ap.add_argument("--responses", type=int, default=8, help="responses per rollout = per optimiser step")
    ap.add_argument("--group", type=int, default=4, help="G: samples per prompt")
    ap.add_argument("--length", type=int, default=32, help="max response tokens")
    ap.add_argument("--steps", type=int, default=6, help="rollouts per run (the first 2 are warm-up)")
    ap.add_argument("--kl_coeff", type=float, default=0.05)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--estimator", default="grpo", help=argparse.SUPPRESS)
    ap.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--side", default="", help=argparse.SUPPRESS)  # internal: run TRL's side in this process
    a = ap.parse_args()
    os.chdir(_util.ROOT)
    if a.side == "trl":
        print("RESULT " + json.dumps(trl_side(a)))
        return
    if not os.path.exists(os.path.join("output", "real-data", "prompts_train.jsonl")):
        subprocess.run([sys.executable, "scripts/prepare_real_data.py"], check=True)
    results = {"machine": _util.machine(), "date": time.strftime("%Y-%m-%d"), "model": a.model, "settings": vars(a),
               "runs": []}
    rows = []
    for dtype in a.dtypes.split(","):
        for est in ("grpo", "rloo"):
            cmd = [sys.executable, __file__, "--side", "trl", "--estimator", est, "--model", a.model,
                   "--responses", str(a.responses), "--group", str(a.group), "--length", str(a.length),
                   "--steps", str(a.steps), "--kl_coeff", str(a.kl_coeff)] + (["--bf16"] if dtype == "bf16" else [])
            p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2",
                                                                         "WANDB_MODE": "disabled"})
            line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
            if p.returncode or not line:
                raise SystemExit(f"TRL {est} failed:\n{p.stderr[-3000:]}")
            t = json.loads(line[0][7:])
            theirs = {"s_per_sample": statistics.median(t["step_times"][2:]) / a.responses,
                      "mean_length": t["mean_length"], "peak_rss_mb": t["peak_rss_mb"]}
            mine = ours(a, dtype, est)
            results["runs"].append({"dtype": dtype, "estimator": est, "ours": mine, "trl": theirs})
            rows.append([dtype, est, mine["s_per_sample"], theirs["s_per_sample"],
                         theirs["s_per_sample"] / mine["s_per_sample"], mine["mean_length"], theirs["mean_length"],
                         mine["peak_rss_mb"], theirs["peak_rss_mb"]])
    print(f"\n{a.model}: {a.responses} responses ({a.responses // a.group} prompts x G={a.group}) x <= {a.length} tokens "
          f"per step, 1 rank, 2 threads; ours = PPO-Lagrangian (reward + cost + λ), TRL = reward only")
    _util.table(["dtype", "estimator", "ours s/sample", "TRL s/sample", "TRL/ours", "ours len", "TRL len",
                 "ours RSS MB", "TRL RSS MB"], rows)
    _util.write("trl_grpo", results)


if __name__ == "__main__":
    main()
