"""Stage 1 of Safe RLHF: supervised fine-tuning of a causal LM on prompt/response rows.

Loss: next-token cross-entropy on the response tokens only (the prompt is context; --include_prompt_loss to
train on it too), averaged over all response tokens of the global batch, so any world size and any gradient
accumulation give the same step.

    python sft.py                                              # tiny default: ~2 min on 2 CPU cores
    torchrun --nproc_per_node=2 sft.py                         # same run, FSDP2 over 2 ranks
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 sft.py \\
        --model_name_or_path huggyllama/llama-7b --train_data tatsu-lab/alpaca:train ...   # multi-node
    # safe-rlhf's 7B recipe (alpaca-7b-reproduced): see scripts/recipe_beaver_7b.sh
    #   --learning_rate 2e-5 --epochs 3 --max_length 512 --per_device_train_batch_size 4
    #   --gradient_accumulation_steps 8 --warmup_ratio 0.03 --activation_checkpointing --judge ''
"""
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

import common


@dataclass
class Args:
    # --- data and model
    model_name_or_path: str = "assets/tiny-llama"  # HF folder or hub name; a config-only folder is seeded
    train_data: str = "data/tiny-safety/sft_train.jsonl"  # rows {prompt, response}; comma-separated list ok
    eval_data: str = "data/tiny-safety/sft_test.jsonl"  # held-out rows for the eval loss ('' = none)
    output_dir: str = "output/sft"  # where the HF model folder, metrics.jsonl and checkpoints go
    max_length: int = 128  # prompt + response tokens; longer responses are truncated (and counted)
    chat_template: bool = False  # use the tokenizer's chat template instead of the Beaver template
    skip_invalid_rows: bool = False  # skip bad rows with a counted warning instead of stopping
    truncate_long_prompts: bool = False  # prompts >= max_length: keep their last max_length/2 tokens (else they are dropped)
    trust_remote_code: bool = False  # allow model code shipped with the checkpoint (only for models you trust)
    # --- optimisation (the research knobs)
    epochs: int = 6  # passes over the training rows
    max_steps: int = -1  # stop after this many optimiser steps (-1: run all epochs)
    per_device_train_batch_size: int = 16  # rows per rank per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimiser step
    global_batch_size: int = 0  # if set, gradient_accumulation_steps = this / (per-device batch x world size)
    learning_rate: float = 1e-3  # tiny default; safe-rlhf 7B: 2e-5
    weight_decay: float = 0.0  # AdamW weight decay (matrices only)
    warmup_ratio: float = 0.03  # fraction of the steps with linear warmup, then cosine decay
    max_grad_norm: float = 1.0  # gradient clipping norm
    include_prompt_loss: bool = False  # train on prompt tokens too
    seed: int = 42  # seed of the data order, initialisation and sampling
    # --- systems
    bf16: Optional[bool] = field(default=None, metadata={"nargs": "?", "const": True})  # bf16 compute with fp32 master weights, reduction, scores and log-probs (FSDP2 MixedPrecisionPolicy); default: on for CUDA, off on CPU; --bf16 turns it on anywhere
    activation_checkpointing: bool = False  # recompute block activations in backward (long sequences)
    compile: bool = False  # torch.compile each decoder block (for CUDA; also runs on CPU, ~40 s to compile)
    # --- logging, evaluation, saving
    log_every: int = 10  # optimiser steps between metrics.jsonl rows
    eval_every: int = 0  # steps between eval-loss passes (0: once per epoch)
    judge: str = "auto"  # exact judge (module in data/) for a final generation check; auto: on for the tiny task's data only; '' = off
    judge_prompts: str = "data/tiny-safety/prompts_test.jsonl"  # held-out prompts for the final judge check
    judge_max_new_tokens: int = 32  # answer length for the judge check
    judge_samples_per_prompt: int = 4  # sampled at temperature 1: the policy's distribution, not its mode
    wandb_project: str = ""  # also log to this wandb project ('' = off)
    run_name: str = "sft"  # wandb run name
    overwrite: bool = False  # replace a finished run (or an unfinished one's checkpoints) in output_dir
    save_model: bool = True  # write the trained model as an HF folder at the end
    # --- resume (README "Resuming and failures")
    save_every: int = 0  # optimiser steps between resume checkpoints in output_dir/checkpoints (0: none)
    keep_last: int = 2  # resume checkpoints kept (older ones are deleted)
    resume: str = field(default="", metadata={"nargs": "?", "const": "auto"})  # --resume: newest checkpoint; or a path


def parse_args(argv=None):
    return common.parse_args(Args, argv)


@torch.no_grad()
def evaluate_loss(model, data, args, pad_id, rank, world, device):
    model.eval()
    tot, n = 0.0, 0.0
    bs = args.per_device_train_batch_size
    mine = data[rank::world]
    steps = int(common.all_reduce(math.ceil(len(mine) / bs), "max"))
    for i in range(steps):  # same number of forward passes on every rank (FSDP collectives)
        chunk = mine[i * bs:(i + 1) * bs]
        ids, m = common.sft_batch(chunk or mine[:1], pad_id, args.include_prompt_loss, device)
        s, c = common.lm_nll(model, ids, m)
        if chunk:
            tot, n = tot + s.item(), n + c.item()
    model.train()
    tot, n = common.all_reduce(tot), common.all_reduce(n)
    return tot / max(n, 1)


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = common.setup_distributed()
    torch.manual_seed(args.seed)

    # 1. validate everything before building anything: data, model path, batch sizes, output folder
    common.check_output_dir(args.output_dir, args.overwrite, args.resume)
    ckpt = common.resolve_resume(args.resume, args.output_dir)
    train_rows = common.load_rows(args.train_data, "sft", args.skip_invalid_rows, "--train_data")
    eval_rows = common.load_rows(args.eval_data, "sft", args.skip_invalid_rows, "--eval_data") if args.eval_data else []
    judge = common.load_judge(args.judge, args.train_data)
    judge_prompts = [r["prompt"] for r in common.load_rows(args.judge_prompts, "prompt", flag="--judge_prompts")] if judge else []
    tokenizer = common.load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    train = common.tokenize_sft_rows(train_rows, tokenizer, args.max_length, args.chat_template, args.train_data,
                                     args.truncate_long_prompts)
    evald = common.tokenize_sft_rows(eval_rows, tokenizer, args.max_length, args.chat_template, args.eval_data,
                                     args.truncate_long_prompts) if eval_rows else []
    global_batch, accum, steps_per_epoch, total_steps = common.plan_steps(
        len(train), args.per_device_train_batch_size, world, args.gradient_accumulation_steps, args.epochs,
        args.max_steps, args.train_data, args.global_batch_size)
    common.print0(f"[sft] world {world}, global batch {global_batch} = {args.per_device_train_batch_size} x {world} "
                  f"ranks x {accum} accum, {steps_per_epoch} steps/epoch, {total_steps} steps")
    run_state = {"stage": "sft", "global_batch": global_batch, "train_rows": len(train), "seed": args.seed,
                 "total_steps": total_steps}  # the cosine schedule's length: a resume may not change it
    if ckpt:
        common.checkpoint_state(ckpt, expect=run_state)  # before any weights are read

    # 2. model, FSDP2, optimiser (AdamW betas (0.9, 0.95) as safe-rlhf), warmup + cosine schedule
    model = common.load_causal_lm(args.model_name_or_path, tokenizer, args.seed, args.trust_remote_code)
    model.config.use_cache = False
    common.shard_model(model, device, mixed_precision=common.use_bf16(args.bf16, device),
                       activation_checkpointing=args.activation_checkpointing, compile=args.compile)
    opt = common.adamw(model, args.learning_rate, args.weight_decay)
    sched = common.cosine_schedule(opt, int(args.warmup_ratio * total_steps), total_steps)
    start = 0
    if ckpt:  # weights, optimiser, schedule, RNG; the data position is a function of the step
        state = common.load_checkpoint(ckpt, {"model": (model, opt)})
        sched.load_state_dict(state["scheduler"])
        start = state["step"]
    common.prepare_output_dir(args.output_dir, resume_step=start if ckpt else None)  # the only step that clears the folder
    logger = common.MetricsLogger(args.output_dir, asdict(args), args.wandb_project, args.run_name,
                                  resume_step=start if ckpt else None)
    stop = common.StopOnSignal()
    timer = common.StepTimer(args.output_dir, device, resume=bool(ckpt))  # timings.jsonl (bench/ reads it)

    def save(step):  # a resume checkpoint: model, optimiser, schedule, RNG of every rank (README "Resuming")
        return common.save_checkpoint(args.output_dir, step, {"model": (model, opt)},
                                      {**run_state, "scheduler": sched.state_dict()}, keep_last=args.keep_last)

    # 3. train
    pad_id = tokenizer.pad_token_id
    bar = common.progress(total=total_steps, initial=start, desc="sft")
    for step in range(start, total_steps):
        epoch = step // steps_per_epoch
        idx = common.batch_indices(len(train), global_batch, rank, world, args.seed, step, steps_per_epoch)
        if accum > 1:  # micro-batches of similar length pad less; the step is the same (a global token mean)
            idx = sorted(idx, key=lambda j: len(train[j][0]))
        size = len(idx) // accum
        micro = [idx[i * size:(i + 1) * size] for i in range(accum)]
        built = [common.sft_batch([train[j] for j in m], pad_id, args.include_prompt_loss, device) for m in micro]
        # response tokens (the loss's normaliser) and all tokens (for tokens/s), over all ranks
        n_global, n_tokens = common.all_reduce(torch.tensor([sum(b[1].sum().item() for b in built),
                                                             sum(len(train[j][0]) for j in idx)])).tolist()
        loss_sum = 0.0
        for k, (ids, m) in enumerate(built):
            model.set_requires_gradient_sync(k == len(built) - 1)  # reduce-scatter once per step
            s, _ = common.lm_nll(model, ids, m)
            # FSDP averages gradients over ranks, so scale by world: the step is the global token mean
            (s * world / n_global).backward()
            loss_sum += s.item()
        loss = common.all_reduce(loss_sum) / n_global
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
        common.check_finite({"loss": loss, "gradient norm": gnorm}, f"sft step {step + 1}", same_on_all_ranks=True)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if step % args.log_every == 0 or step == 1 or step == total_steps:
            logger.log(step, {"train/loss": loss, "train/lr": sched.get_last_lr()[0], "train/grad_norm": gnorm.item(),
                              "train/epoch": epoch + 1}, echo=False)
            bar.set_postfix(loss=f"{loss:.4f}")
        end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
        if evald and (step % args.eval_every == 0 if args.eval_every else end_of_epoch):
            logger.log(step, {"eval/loss": evaluate_loss(model, evald, args, pad_id, rank, world, device),
                              "train/epoch": epoch + 1})
        # a resume checkpoint after everything of this step is logged (never at the end: the HF folder is saved)
        saved = None
        if args.save_every and step % args.save_every == 0 and step < total_steps:
            saved = save(step)
        if stop.requested():
            common.StopOnSignal.exit(saved or save(step))
        timer.step(step, **{"tokens/train": n_tokens})
    bar.close()
    timer.close({"model": (model, opt)})

    # 4. save the HF folder (rank 0 gathers the full state dict) before anything else, so a kill during the judge
    #    check never loses the trained model; from here on SIGTERM ends the process at once
    if args.save_model:
        common.save_hf(model, tokenizer, args.output_dir)
        common.print0(f"[sft] saved {args.output_dir}")
    stop.release()

    # 5. the exact judge on held-out prompts (sampled): does the model answer in the task's format, and how
    #    often does it answer harmful requests unsafely? (tiny task only)
    if judge:
        mine = (judge_prompts * args.judge_samples_per_prompt)[rank::world]
        answers = common.generate_texts(model, tokenizer, mine, device, args.judge_max_new_tokens, greedy=False,
                                        seed=args.seed + rank, chat_template=args.chat_template)
        prompts, answers = common.gather_objects(mine), common.gather_objects(answers)
        rep = judge.report(prompts, answers)
        logger.log(step, rep)
        common.print0(f"[judge] {len(prompts)} held-out prompts: format {rep['judge/format_rate']:.1%}, unsafe rate on "
                      f"{rep['judge/n_harmful']} harmful prompts {rep['judge/unsafe_rate_harmful']:.1%} (exact judge), "
                      f"helpfulness on benign {rep['judge/helpful_benign']:.2f}/4")
    logger.close()
    common.cleanup_distributed()


if __name__ == "__main__":
    common.entrypoint(main)
