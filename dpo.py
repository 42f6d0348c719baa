"""The offline baselines of Safe RLHF: DPO and SafeDPO, from the SFT policy and the same preference rows, with no reward
model, no cost model and no sampling (two models: the policy and its frozen reference).

  dpo      Rafailov et al. (2023), eq. 7, on pairs ordered by one label (--preference better: "DPO-HELPFUL",
           --preference safer: "DPO-HARMLESS", the two naive baselines of SafeDPO §5.1.1):
             L = −E log σ(β·[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])
           log π(y|x) = Σ over the response tokens (EOS included) of the token log-probs.
  safedpo  Kim et al. (ICLR 2026, arXiv 2505.20065 v2). With the helpfulness order y_w ≻ y_l and h = 1{unsafe}:
           the cost-augmented reward r_c = r if c ≤ 0 else −∞ (§3.1) makes the optimal policy of the hard-constrained
           problem (eq. 6) π* ∝ π_ref·exp(r_c/β) (eq. 9), which gives every unsafe response probability 0, so any
           safe response is preferred to any unsafe one. The safety-aware transformation T (§3.2) of each pair:
             (h_w, h_l) = (0, 0) or (0, 1): kept;   (1, 0): swapped (the safe one wins);   (1, 1): dropped,
           and DPO on T(D) (eq. 11) optimises the constrained objective exactly (Prop. 4.3). The safety margin Δ ≥ 0
           (eq. 12; its one hyperparameter, paper default 10) enters the logit, not multiplied by β:
             L = −E_{T(D)} log σ(β·[logratio(ỹ_w) − logratio(ỹ_l)] − (h̃_l − h̃_w)·Δ)
           After T, h̃_l − h̃_w is 1 for a safe-vs-unsafe pair and 0 for a safe-vs-safe one, so Δ asks for a larger
           margin exactly where the labels differ, and the optima are unchanged for any Δ (Prop. 4.4).
           Ambiguities, and what we chose: the paper drops both-unsafe pairs (reviewers noted it wastes data; we drop
           them and count them); ties cannot occur (binary labels).

The reference log-probs are computed once, before training (the reference is frozen), and reused every epoch; the
reference model stays only for the held-out KL. Metrics: loss, the implicit rewards β·logratio of the chosen and the
rejected response, their margin and the pairwise accuracy (train and held-out), and the KL(π ‖ π_ref) per response
token along the held-out responses (exact over the vocabulary at each position). The arena and XSTest take the
saved policy like any other.

    python dpo.py --loss safedpo                                   # tiny default, after sft.py (~1 min)
    python dpo.py --loss dpo --preference better                   # -> output/dpo_better
    torchrun --nproc_per_node=2 dpo.py --loss safedpo
    python evaluate.py --task arena --policies sft=output/sft,dpo=output/dpo_better,safedpo=output/safedpo
"""
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Literal, NamedTuple, Optional

import torch
import torch.nn.functional as F

import common


@dataclass
class Args:
    loss: Literal["dpo", "safedpo"] = "safedpo"  # DPO on one label's order, or SafeDPO (safety-aware order + margin)
    preference: Literal["better", "safer"] = "better"  # --loss dpo: the label that orders the pair (better = helpfulness)
    beta: float = 0.1  # β: the KL strength of the implicit reward (DPO and SafeDPO papers: 0.1)
    safety_margin: float = 10.0  # Δ of SafeDPO eq. 12: logit margin for a safe-vs-unsafe pair (paper: 10; 0 = eq. 11)
    nll_coeff: float = 0.0  # α: add α·(the chosen response's mean token NLL), RPO (Pang et al. 2024), against likelihood displacement (0: off)
    # --- data and model
    model_name_or_path: str = "output/sft"  # the SFT policy: the trained policy and (by default) its frozen reference
    ref_model_name_or_path: str = ""  # the reference ('' = model_name_or_path)
    train_data: str = "data/tiny-safety/preference_train.jsonl"  # PKU-SafeRLHF rows, or chosen/rejected rows for --loss dpo
    eval_data: str = "data/tiny-safety/preference_test.jsonl"  # held-out rows for loss, margin, accuracy, KL ('' = none)
    output_dir: str = ""  # default: output/safedpo, or output/dpo_<preference>
    max_length: int = 128  # prompt + response tokens per side
    chat_template: bool = False  # use the tokenizer's chat template instead of the Beaver template
    skip_invalid_rows: bool = False  # skip bad rows with a counted warning instead of stopping
    truncate_long_prompts: bool = False  # prompts >= max_length: keep their last max_length/2 tokens (else they are dropped)
    trust_remote_code: bool = False  # allow model code shipped with the checkpoint (only for models you trust)
    # --- optimisation
    epochs: int = 2  # passes over the training pairs
    max_steps: int = -1  # stop after this many optimiser steps (-1: run all epochs)
    per_device_train_batch_size: int = 16  # pairs per rank per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimiser step
    global_batch_size: int = 0  # pairs per step; if set, gradient_accumulation_steps = this / (per-device x world)
    learning_rate: float = 2e-5  # tiny default (2e-4 and 5e-5 broke the answers' format: README "DPO and SafeDPO"); SafeDPO 7B: 1e-6
    weight_decay: float = 0.0  # AdamW weight decay (matrices only; SafeDPO: 0.05)
    warmup_ratio: float = 0.03  # fraction of the steps with linear warmup, then cosine decay
    max_grad_norm: float = 1.0  # gradient clipping norm
    seed: int = 42  # seed of the data order and of the judge's sampling
    # --- systems
    bf16: Optional[bool] = field(default=None, metadata={"nargs": "?", "const": True})  # bf16 compute with fp32 master weights, reduction and log-probs (FSDP2 MixedPrecisionPolicy); default: on for CUDA, off on CPU; --bf16 turns it on anywhere
    activation_checkpointing: bool = False  # recompute block activations in backward (long sequences)
    compile: bool = False  # torch.compile each decoder block of the policy
    # --- logging, evaluation, saving
    log_every: int = 10  # optimiser steps between metrics.jsonl rows
    eval_batch_size: int = 16  # pairs per forward pass in evaluation and in the reference pass
    judge: str = "auto"  # exact judge (module in data/) for a final generation check; auto: on for the tiny task's data only; '' = off
    judge_prompts: str = "data/tiny-safety/prompts_test.jsonl"  # held-out prompts for the final judge check
    judge_max_new_tokens: int = 32  # answer length for the judge check
    judge_samples_per_prompt: int = 4  # sampled at temperature 1: the policy's distribution, not its mode
    wandb_project: str = ""  # also log to this wandb project ('' = off)
    run_name: str = ""  # wandb run name ('' = the output folder's name)
    overwrite: bool = False  # replace a finished run (or an unfinished one's checkpoints) in output_dir
    save_model: bool = True  # write the trained policy as an HF folder at the end
    # --- resume (README "Resuming and failures")
    save_every: int = 0  # optimiser steps between resume checkpoints in output_dir/checkpoints (0: none)
    keep_last: int = 2  # resume checkpoints kept (older ones are deleted)
    resume: str = field(default="", metadata={"nargs": "?", "const": "auto"})  # --resume: newest checkpoint; or a path


def parse_args(argv=None):
    return common.parse_args(Args, argv)


def resolved_output_dir(args):
    return args.output_dir or ("output/safedpo" if args.loss == "safedpo" else f"output/dpo_{args.preference}")


# ----------------------------------------------------------------------------- the losses
def dpo_loss(logp_w, logp_l, ref_w, ref_l, beta, margin=None):
    """DPO (Rafailov et al. 2023, eq. 7), and SafeDPO's eq. 12 with `margin` = (h̃_l − h̃_w)·Δ per pair [B]:
        L = mean(−log σ(β·[(logp_w − ref_w) − (logp_l − ref_l)] − margin))
    Sequence log-probs [B] (summed over response tokens). -> (loss, implicit reward of the chosen β·(logp_w − ref_w),
    of the rejected, both [B] and detached)."""
    chosen, rejected = beta * (logp_w - ref_w), beta * (logp_l - ref_l)
    logits = chosen - rejected
    if margin is not None:
        logits = logits - margin
    return -F.logsigmoid(logits).mean(), chosen.detach(), rejected.detach()


def chosen_nll(logp_w, n_tokens_w):
    """The chosen responses' mean token negative log-likelihood, mean over the pairs: mean_B(−log π(y_w|x) / |y_w|).
    Logged always: when it rises while the DPO loss falls, the chosen answers themselves are losing probability
    ("likelihood displacement": Razin et al. 2025; Pal et al. 2024, Smaug/DPOP)."""
    return (-logp_w / n_tokens_w.clamp(min=1)).mean()


def rpo_loss(loss, nll, alpha):
    """RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization", eq. 1; TRL's rpo_alpha): the DPO-family
    loss plus α·NLL of the chosen response (its mean over tokens), which keeps the chosen answers likely while the
    margin grows. α = 0 returns `loss` itself (the default run is bit for bit plain DPO / SafeDPO). With SafeDPO the
    chosen is the safe side of every kept or swapped pair, so the term imitates only safe answers."""
    return loss if alpha == 0 else loss + alpha * nll


def order_pair(row, loss, preference):
    """-> (winner id, loser id, h_w, h_l) of one PKU-SafeRLHF row, or None for a pair the loss drops.
    dpo: ordered by better_response_id (preference better) or safer_response_id (safer); the safety flags are read
    when the row has them (chosen/rejected rows have none: treated as safe, so no margin). safedpo: SafeDPO's
    transformation T (§3.2) of the helpfulness order: kept if the winner is safe, swapped if only the winner is
    unsafe, dropped if both are unsafe."""
    w = row["safer_response_id"] if loss == "dpo" and preference == "safer" else row["better_response_id"]
    h = [row.get(f"is_response_{i}_safe", True) is False for i in (0, 1)]  # h = 1{unsafe}; null (unlabelled): 0
    if loss == "safedpo":
        if h[w] and h[1 - w]:
            return None
        if h[w]:
            w = 1 - w
    return w, 1 - w, h[w], h[1 - w]


class Pair(NamedTuple):
    """A tokenised pair: chosen and rejected ids, their prompt lengths (response tokens start there), h̃_w and h̃_l."""
    w: list
    l: list
    w_plen: int
    l_plen: int
    h_w: bool
    h_l: bool


def make_pairs(rows, args, tokenizer, source):
    """Rows -> Pairs in the order of order_pair. Dropped and counted: pairs SafeDPO drops (both unsafe), a prompt that
    leaves no room for a response (unless --truncate_long_prompts), two sides identical after truncation."""
    out, dropped_unsafe, dropped_length, truncated = [], 0, 0, 0
    for r in rows:
        order = order_pair(r, args.loss, args.preference)
        if order is None:
            dropped_unsafe += 1
            continue
        w, l, h_w, h_l = order
        p = common.tokenize_prompt(tokenizer, r["prompt"], args.chat_template)
        a, b = (common.tokenize_prompt_response(tokenizer, r["prompt"], r[f"response_{i}"], args.max_length,
                                                args.chat_template, args.truncate_long_prompts, p) for i in (w, l))
        if a is None or b is None or a[0] == b[0]:
            dropped_length += 1
            continue
        truncated += a[2] + b[2]
        out.append(Pair(a[0], b[0], a[1], b[1], h_w, h_l))
    common.print0(f"[data] {source}: {len(out)} pairs ({sum(p.h_w != p.h_l for p in out)} safe-vs-unsafe), "
                  f"{truncated} responses truncated at max_length={args.max_length}, {dropped_length} pairs dropped "
                  f"(prompt too long or identical after truncation)" +
                  (f", {dropped_unsafe} both-unsafe pairs dropped (SafeDPO's T)" if args.loss == "safedpo" else ""))
    if not out:
        raise common.UserError(f"{source}: no usable pairs for --loss {args.loss}")
    return out


def make_batch(pairs, pad_id, device):
    """Both sides in one forward: ids [2B, T] (chosen rows, then rejected), a response-token mask [2B, T−1] over the
    next-token targets (a target j counts when it is a response token, EOS included), safety flags [B] x 2."""
    ids, tgt = common.sft_batch([(p.w, p.w_plen) for p in pairs] + [(p.l, p.l_plen) for p in pairs], pad_id, False,
                                device)  # the SFT loss's target mask: response tokens only
    h_w = torch.tensor([p.h_w for p in pairs], dtype=torch.float32)
    h_l = torch.tensor([p.h_l for p in pairs], dtype=torch.float32)
    return ids, tgt, h_w.to(device), h_l.to(device)


def sequence_logps(model, ids, tgt):
    """Σ over the response tokens of log π(token | prefix) -> [2B] float32; right padding, so causal attention never
    sees the pads. Logits upcast to fp32 before the log-softmax (under --bf16 the model computes in bf16)."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logp * tgt).sum(-1)


def margins(h_w, h_l, args):
    """SafeDPO eq. 12: (h̃_l − h̃_w)·Δ per pair (1·Δ for safe-vs-unsafe, 0 otherwise); None for plain DPO."""
    return (h_l - h_w) * args.safety_margin if args.loss == "safedpo" else None


@torch.no_grad()
def reference_logps(ref, pairs, args, pad_id, rank, world, device):
    """The frozen reference's sequence log-probs of every pair, once: [(chosen, rejected)] in pair order. Each rank
    scores its share with the same number of forward passes, then the shares are gathered (every rank holds all)."""
    ref.eval()
    mine = list(range(rank, len(pairs), world))
    bs = args.eval_batch_size
    n = int(common.all_reduce(math.ceil(len(mine) / bs), "max"))
    out = []
    for i in range(n):
        chunk = mine[i * bs:(i + 1) * bs]
        ids, tgt, _, _ = make_batch([pairs[j] for j in chunk or mine[:1]], pad_id, device)
        lp = sequence_logps(ref, ids, tgt)
        B = len(chunk)
        out += [(j, lp[k].item(), lp[len(lp) // 2 + k].item()) for k, j in enumerate(chunk[:B])]
    gathered = sorted(common.gather_objects(out))
    return [(c, r) for _, c, r in gathered]


@torch.no_grad()
def heldout_logps_and_kl(model, ref, ids, tgt):
    """One forward of each model: the policy's sequence log-probs [2B] (as sequence_logps) and KL(π ‖ π_ref) summed
    over the vocabulary at each response position, -> (logps, KL sum over response positions, their number)."""
    lp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    lq = torch.log_softmax(ref(input_ids=ids).logits[:, :-1].float(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    seq = (lp.gather(-1, ids[:, 1:, None]).squeeze(-1) * tgt).sum(-1)
    return seq, (kl * tgt).sum().item(), tgt.sum().item()


@torch.no_grad()
def evaluate(model, ref, pairs, ref_lp, args, pad_id, rank, world, device):
    """Held-out loss, implicit-reward margin and pairwise accuracy (chosen's implicit reward above the rejected's), and
    the per-token KL to the reference along the held-out responses. Same number of forward passes on every rank."""
    model.eval()
    mine = list(range(rank, len(pairs), world))
    bs = args.eval_batch_size
    n = int(common.all_reduce(math.ceil(len(mine) / bs), "max"))
    sums = torch.zeros(6, dtype=torch.float64)  # loss·B, margin·B, right, B, kl, kl tokens
    for i in range(n):
        chunk = mine[i * bs:(i + 1) * bs]
        ids, tgt, h_w, h_l = make_batch([pairs[j] for j in chunk or mine[:1]], pad_id, device)
        lp, kl, tok = heldout_logps_and_kl(model, ref, ids, tgt)
        B = len(lp) // 2
        rw = torch.tensor([ref_lp[j][0] for j in chunk or mine[:1]], device=device)
        rl = torch.tensor([ref_lp[j][1] for j in chunk or mine[:1]], device=device)
        loss, c, r = dpo_loss(lp[:B], lp[B:], rw, rl, args.beta, margins(h_w, h_l, args))
        if chunk:
            sums += torch.tensor([loss.item() * B, (c - r).sum().item(), (c > r).sum().item(), B, kl, tok],
                                 dtype=torch.float64)
    model.train()
    s = common.all_reduce(sums)
    return {"eval/loss": (s[0] / s[3]).item(), "eval/reward_margin": (s[1] / s[3]).item(),
            "eval/accuracy": (s[2] / s[3]).item(), "eval/kl_per_token": (s[4] / s[5].clamp(min=1)).item(),
            "eval/n_pairs": int(s[3].item())}


def train_step(model, opt, sched, pairs, refs, acc, args, pad_id, device, world, step):
    """One optimiser step of the DPO / SafeDPO loss (+ RPO's NLL term) on this rank's pairs and their frozen
    reference log-probabilities (refs: (chosen, rejected) per pair), in `acc` micro-batches of equal size (gradients
    synchronised on the last). -> (loss, reward margin, accuracy, chosen reward, chosen NLL: averaged over ranks;
    the gradient norm before clipping)."""
    size, sums = len(pairs) // acc, torch.zeros(5, dtype=torch.float64)  # loss, margin, accuracy, chosen reward, NLL
    for k in range(acc):
        model.set_requires_gradient_sync(k == acc - 1)
        part, ref = pairs[k * size:(k + 1) * size], refs[k * size:(k + 1) * size]
        ids, tgt, h_w, h_l = make_batch(part, pad_id, device)
        lp = sequence_logps(model, ids, tgt)
        B = len(part)
        rw = torch.tensor([x[0] for x in ref], device=device)
        rl = torch.tensor([x[1] for x in ref], device=device)
        loss, c, r = dpo_loss(lp[:B], lp[B:], rw, rl, args.beta, margins(h_w, h_l, args))
        nll = chosen_nll(lp[:B], tgt[:B].sum(-1))
        loss = rpo_loss(loss, nll, args.nll_coeff)
        (loss / acc).backward()
        sums += torch.tensor([loss.item(), (c - r).mean().item(), (c > r).float().mean().item(),
                              c.mean().item(), nll.item()], dtype=torch.float64) / acc
    loss_g, margin_g, acc_g, chosen_g, nll_g = (common.all_reduce(sums) / world).tolist()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
    common.check_finite({"loss": loss_g, "gradient norm": gnorm}, f"{args.loss} step {step + 1}",
                        same_on_all_ranks=True)
    opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
    return loss_g, margin_g, acc_g, chosen_g, nll_g, gnorm


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = common.setup_distributed()
    torch.manual_seed(args.seed)
    out_dir = resolved_output_dir(args)

    # 1. validate everything up front: data (every row), model paths, batch arithmetic, output folder
    common.check_output_dir(out_dir, args.overwrite, args.resume)
    ckpt = common.resolve_resume(args.resume, out_dir)
    # the labels the loss reads: dpo better = helpfulness order only (chosen/rejected rows work too), dpo safer = the
    # harmlessness order and flags, safedpo = the helpfulness order and both safety flags
    kind = {"better": "reward", "safer": "cost"}[args.preference] if args.loss == "dpo" else "preference"
    train_rows = common.load_rows(args.train_data, kind, args.skip_invalid_rows, "--train_data")
    eval_rows = common.load_rows(args.eval_data, kind, args.skip_invalid_rows, "--eval_data") if args.eval_data else []
    judge = common.load_judge(args.judge, args.train_data)
    judge_prompts = [r["prompt"] for r in common.load_rows(args.judge_prompts, "prompt", flag="--judge_prompts")] if judge else []
    ref_path = args.ref_model_name_or_path or args.model_name_or_path
    common._check_model_path(ref_path, "--ref_model_name_or_path")
    tokenizer = common.load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    train = make_pairs(train_rows, args, tokenizer, args.train_data)
    evald = make_pairs(eval_rows, args, tokenizer, args.eval_data) if eval_rows else []
    global_batch, acc, steps_per_epoch, total = common.plan_steps(
        len(train), args.per_device_train_batch_size, world, args.gradient_accumulation_steps, args.epochs,
        args.max_steps, args.train_data, args.global_batch_size)
    common.print0(f"[{args.loss}] world {world}, global batch {global_batch} pairs, {steps_per_epoch} steps/epoch, "
                  f"{total} steps, β={args.beta}" + (f", Δ={args.safety_margin}" if args.loss == "safedpo" else
                                                     f", pairs ordered by the {args.preference} label"))
    run_state = {"stage": f"dpo/{args.loss}/{args.preference}", "global_batch": global_batch, "train_rows": len(train),
                 "seed": args.seed, "total_steps": total}  # the cosine schedule's length: a resume may not change it
    if ckpt:
        common.checkpoint_state(ckpt, expect=run_state)

    # 2. the policy (trained) and its reference (frozen; stored in bf16 under --bf16), FSDP2; AdamW, warmup + cosine
    bf16 = common.use_bf16(args.bf16, device)
    model = common.disable_dropout(common.load_causal_lm(args.model_name_or_path, tokenizer, args.seed,
                                                         args.trust_remote_code))
    model.config.use_cache = False
    common.shard_model(model, device, mixed_precision=bf16, activation_checkpointing=args.activation_checkpointing,
                       compile=args.compile)
    ref = common.disable_dropout(common.load_causal_lm(ref_path, tokenizer, args.seed, args.trust_remote_code))
    ref.requires_grad_(False)
    common.shard_model(ref, device, mixed_precision=bf16, store_bf16=bf16)
    opt = common.adamw(model, args.learning_rate, args.weight_decay)
    sched = common.cosine_schedule(opt, int(args.warmup_ratio * total), total)

    # 3. the reference's log-probs of every pair, once (the reference never changes)
    pad_id = tokenizer.pad_token_id
    ref_train = reference_logps(ref, train, args, pad_id, rank, world, device)
    ref_eval = reference_logps(ref, evald, args, pad_id, rank, world, device) if evald else []
    start = 0
    if ckpt:
        state = common.load_checkpoint(ckpt, {"model": (model, opt)})
        sched.load_state_dict(state["scheduler"])
        start = state["step"]
    common.prepare_output_dir(out_dir, resume_step=start if ckpt else None)  # the only step that clears the folder
    logger = common.MetricsLogger(out_dir, asdict(args), args.wandb_project, args.run_name or os.path.basename(out_dir),
                                  resume_step=start if ckpt else None)
    stop = common.StopOnSignal()
    timer = common.StepTimer(out_dir, device, resume=bool(ckpt))

    def save(step):
        return common.save_checkpoint(out_dir, step, {"model": (model, opt)},
                                      {**run_state, "scheduler": sched.state_dict()}, keep_last=args.keep_last)

    # 4. train: each step's loss is the mean over the global batch's pairs (every rank holds the same number)
    bar = common.progress(total=total, initial=start, desc=args.loss)
    step, epoch = start, start // steps_per_epoch
    for step in range(start, total):
        epoch = step // steps_per_epoch
        idx = common.batch_indices(len(train), global_batch, rank, world, args.seed, step, steps_per_epoch)
        if acc > 1:  # micro-batches of similar length pad less; each holds the same number of pairs: same step
            idx = sorted(idx, key=lambda j: max(len(train[j].w), len(train[j].l)))
        loss_g, margin_g, acc_g, chosen_g, nll_g, gnorm = train_step(
            model, opt, sched, [train[j] for j in idx], [ref_train[j] for j in idx], acc, args, pad_id, device, world,
            step)
        step += 1
        bar.update(1)
        if step % args.log_every == 0 or step == 1 or step == total:
            logger.log(step, {"train/loss": loss_g, "train/reward_margin": margin_g, "train/accuracy": acc_g,
                              "train/chosen_reward": chosen_g, "train/chosen_nll": nll_g, "train/lr": sched.get_last_lr()[0],
                              "train/grad_norm": gnorm.item(), "train/epoch": epoch + 1}, echo=False)
            bar.set_postfix(loss=f"{loss_g:.4f}", acc=f"{acc_g:.3f}")
        if evald and step % steps_per_epoch == 0 and step < total:
            logger.log(step, {**evaluate(model, ref, evald, ref_eval, args, pad_id, rank, world, device),
                              "train/epoch": epoch + 1})
        saved = save(step) if args.save_every and step % args.save_every == 0 and step < total else None
        if stop.requested():
            common.StopOnSignal.exit(saved or save(step))
        timer.step(step)
    bar.close()
    timer.close({"model": (model, opt), "ref": (ref, None)})

    # 5. save the policy first (a kill during evaluation never loses it), then held-out metrics and the judge check
    if args.save_model:
        common.save_hf(model, tokenizer, out_dir)
        common.print0(f"[{args.loss}] saved {out_dir}")
    stop.release()
    final = evaluate(model, ref, evald, ref_eval, args, pad_id, rank, world, device) if evald else {}
    if final:
        common.print0(f"[{args.loss}] held-out: loss {final['eval/loss']:.4f}, implicit-reward accuracy "
                      f"{final['eval/accuracy']:.2%} over {final['eval/n_pairs']} pairs, KL {final['eval/kl_per_token']:.4f}/token")
    if judge:  # the exact judge on held-out prompts (sampled), as sft.py does: the tiny task's claim reads this
        mine = (judge_prompts * args.judge_samples_per_prompt)[rank::world]
        answers = common.generate_texts(model, tokenizer, mine, device, args.judge_max_new_tokens, greedy=False,
                                        seed=args.seed + rank, chat_template=args.chat_template)
        final.update(judge.report(common.gather_objects(mine), common.gather_objects(answers)))
        common.print0(f"[judge] unsafe rate on {final['judge/n_harmful']} harmful prompts "
                      f"{final['judge/unsafe_rate_harmful']:.1%} (exact judge), helpfulness on benign "
                      f"{final['judge/helpful_benign']:.2f}/4")
    logger.log(step, {**final, "train/epoch": epoch + 1})
    logger.close()
    common.cleanup_distributed()


if __name__ == "__main__":
    common.entrypoint(main)
