"""Side by side with TRL (the library most users would pick instead), in one run, on the identical tiny Llama (same
seeded weights), data, batch sizes and response length: our sft.py vs `SFTTrainer`, our reward model vs
`RewardTrainer`, our `--algo ppo` vs TRL's PPO (`trl.experimental.ppo.PPOTrainer`). Time per optimiser step
(PPO: per rollout batch) is the wall time between consecutive step ends, median after 2 warm-up steps, for both
sides; the ratio is TRL's time / ours (> 1: ours is faster). One process each (1 rank).

    python3 -m venv .venv-trl112 && .venv-trl112/bin/pip install -r requirements.txt trl==1.12.0 accelerate==1.15.0  # its PPO
    .venv-trl112/bin/python bench/bench_trl.py                    # writes bench/results/trl.json
    .venv-trl112/bin/python bench/bench_trl.py --only ppo --response_length 64 --repeats 3
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _util  # noqa: E402

sys.path.insert(0, _util.ROOT)


class StepTimes:
    """A TrainerCallback that records the wall time between consecutive step ends."""

    def __init__(self):
        from transformers import TrainerCallback

        class CB(TrainerCallback):
            def on_train_begin(cb, args, state, control, **kw):
                self.last = time.perf_counter()

            def on_step_end(cb, args, state, control, **kw):
                now = time.perf_counter()
                self.times.append(now - self.last)
                self.last = now
        self.times, self.last, self.callback = [], None, CB()


def common_trainer_args(out, steps, lr):
    import torch
    cuda = torch.cuda.is_available()
    return dict(output_dir=out, max_steps=steps, learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=1,
                logging_steps=10_000, save_strategy="no", report_to=[], seed=42, use_cpu=not cuda, bf16=cuda,
                dataloader_num_workers=0, adam_beta2=0.95, max_grad_norm=1.0, disable_tqdm=True)


def trl_sft(policy, steps, batch):
    import common
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    rows = common.load_rows(os.path.join(_util.ROOT, "data/tiny-safety/sft_train.jsonl"), "sft")
    ds = Dataset.from_list([{"prompt": common.format_prompt(r["prompt"]), "completion": " " + r["response"]} for r in rows])
    t = StepTimes()
    cfg = SFTConfig(**common_trainer_args(os.path.join(_util.CACHE, "trl_sft"), steps, 1e-3), per_device_train_batch_size=batch,
                    max_length=128, packing=False, padding_free=False, completion_only_loss=True)
    tok = AutoTokenizer.from_pretrained(policy)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(policy), args=cfg, train_dataset=ds,
                         processing_class=tok, callbacks=[t.callback])
    trainer.train()
    return t.times


def trl_reward(policy, steps, batch):
    import common
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer
    rows = common.load_rows(os.path.join(_util.ROOT, "data/tiny-safety/preference_train.jsonl"), "reward")
    ds = Dataset.from_list([{"prompt": common.format_prompt(r["prompt"]), "chosen": " " + r[f"response_{r['better_response_id']}"],
                             "rejected": " " + r[f"response_{1 - r['better_response_id']}"]} for r in rows])
    tok = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    t = StepTimes()
    cfg = RewardConfig(**common_trainer_args(os.path.join(_util.CACHE, "trl_rm"), steps, 5e-4), per_device_train_batch_size=batch,
                       max_length=128, weight_decay=0.1)
    RewardTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[t.callback]).train()
    return t.times


def trl_ppo(policy, score, steps, prompts_per_step, minibatch, length):
    import common
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    tok = AutoTokenizer.from_pretrained(policy, padding_side="left")
    rows = common.load_rows(os.path.join(_util.ROOT, "data/tiny-safety/prompts_train.jsonl"), "prompt")
    ds = Dataset.from_list([{"input_ids": common.tokenize_prompt(tok, r["prompt"])} for r in rows])

    def scorer():
        m = AutoModelForSequenceClassification.from_pretrained(score, num_labels=1)
        m.config.pad_token_id = tok.pad_token_id
        return m
    t = StepTimes()
    args = common_trainer_args(os.path.join(_util.CACHE, "trl_ppo"), steps, 1e-4)
    args.pop("max_steps")
    # TRL 1.12: rollout batch = per_device_train_batch_size x gradient_accumulation_steps, split into
    # num_mini_batches optimiser steps; here one rollout of `prompts_per_step`, one optimiser step, as ours below
    cfg = PPOConfig(**args, per_device_train_batch_size=minibatch, gradient_accumulation_steps=prompts_per_step // minibatch,
                    num_mini_batches=1, local_rollout_forward_batch_size=prompts_per_step,
                    num_ppo_epochs=1, response_length=length, total_episodes=prompts_per_step * steps, kl_coef=0.05,
                    temperature=1.0, stop_token="eos", num_sample_generations=0, cliprange=0.2, cliprange_value=5.0,
                    gamma=1.0, lam=0.95)
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=AutoModelForCausalLM.from_pretrained(policy),
                         ref_model=AutoModelForCausalLM.from_pretrained(policy), reward_model=scorer(),
                         value_model=scorer(), train_dataset=ds, callbacks=[t.callback])
    trainer.train()
    return t.times


def ours(script, flags, key="time/step"):
    rows = _util.run_stage(script, [*flags, "--overwrite", "--save_model", "False", "--log_every", 1])
    return [r[key] for r in rows if "step" in r and key in r]


def median(times, skip=2):
    return statistics.median(times[skip:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="sft,reward,ppo")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--ppo_steps", type=int, default=6)
    ap.add_argument("--response_length", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each side; the median is reported")
    args = ap.parse_args()
    import trl
    policy, score = _util.random_models()
    out = os.path.join(_util.CACHE, "ours")
    results = {"machine": _util.machine(), "trl": trl.__version__, "date": time.strftime("%Y-%m-%d"), "runs": {}}
    jobs = {
        "sft": (lambda: trl_sft(policy, args.steps, 16),
                lambda: ours("sft.py", ["--model_name_or_path", policy, "--judge", "", "--eval_data", "",
                                        "--max_steps", args.steps, "--per_device_train_batch_size", 16,
                                        "--output_dir", f"{out}/sft"])),
        "reward": (lambda: trl_reward(policy, args.steps, 16),
                   lambda: ours("train_preference.py", ["--model_name_or_path", policy, "--eval_data", "",
                                                        "--score_stats_rows", 16, "--max_steps", args.steps,
                                                        "--per_device_train_batch_size", 16, "--output_dir", f"{out}/rm"])),
        "ppo": (lambda: trl_ppo(policy, score, args.ppo_steps, 32, 32, args.response_length),
                lambda: ours("ppo_lagrangian.py", ["--algo", "ppo", "--actor_model_name_or_path", policy,
                                                   "--reward_model_name_or_path", score, "--eval_prompt_data", "",
                                                   "--judge", "", "--eval_every", 0, "--max_steps", args.ppo_steps,
                                                   "--max_new_tokens", args.response_length,
                                                   "--per_device_prompt_batch_size", 32,
                                                   "--per_device_train_batch_size", 32, "--output_dir", f"{out}/ppo"])),
    }
    rows = []
    for name in args.only.split(","):
        trl_fn, ours_fn = jobs[name]
        t_trl, t_ours = [], []
        for _ in range(args.repeats):  # alternate, so a noisy minute hurts both sides
            t_trl.append(median(trl_fn()))
            t_ours.append(median(ours_fn()))
        a, b = statistics.median(t_trl), statistics.median(t_ours)
        results["runs"][name] = {"trl_step_s": t_trl, "ours_step_s": t_ours, "trl_median_s": a, "ours_median_s": b,
                                 "speedup": a / b}
        rows.append([name, a, b, a / b])
        print(json.dumps({name: results["runs"][name]}), flush=True)
    print(f"\nTRL {trl.__version__} vs ours, median seconds per step ({results['machine']['device']}, 1 rank; "
          f"PPO response length {args.response_length})")
    _util.table(["stage", "TRL s/step", "ours s/step", "TRL / ours"], rows)
    _util.write("trl", results)


if __name__ == "__main__":
    main()
