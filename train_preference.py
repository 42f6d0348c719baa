"""Stage 2 of Safe RLHF: the reward model (helpfulness) and the cost model (harmlessness), paper §3.2.

Both are AutoModelForTokenClassification with one label (a score per token); a sequence's score is the score
at its last response token (its EOS), found from explicit lengths. The two objectives read the *decoupled*
labels of a PKU-SafeRLHF row:

  reward (eq. 5):  L_R = −E[log σ(R(y_w) − R(y_l))]                               on better_response_id
  cost   (eq. 6):  L_C = −E[log σ(C(y_u) − C(y_s))] − E[log σ(ξ_u C(y_u))] − E[log σ(ξ_s C(y_s))]
                   on safer_response_id, with ξ = +1 for an unsafe and −1 for a safe response, so the
                   classification terms pin the zero point: **cost > 0 means unsafe**.
  both add regularization · mean(score²) (safe-rlhf: 0.001) to keep scores from drifting.
  several constraints (--cost_categories, PKU-SafeRLHF v1 rows): one cost per group of harm categories,
                   C_k > 0 means unsafe in group k; see cost_loss_groups.

    python train_preference.py --objective reward            # tiny default, ~1 min on 2 CPU cores
    python train_preference.py --objective cost
    python train_preference.py --objective cost --cost_categories "$(python -c 'import sys; sys.path.insert(0, "data"); import tiny_safety; print(tiny_safety.GROUPS)')" --output_dir output/cost_groups
    torchrun --nproc_per_node=2 train_preference.py --objective cost
    # safe-rlhf's 7B recipe: --model_name_or_path <sft> --train_data PKU-Alignment/PKU-SafeRLHF:train --epochs 2
    #   --learning_rate 2e-5 --warmup_ratio 0.03 --weight_decay 0.1 --regularization 0.001
    #   --per_device_train_batch_size 16 --max_length 512 --activation_checkpointing --bf16
"""
import collections
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Literal, NamedTuple, Optional

import torch
import torch.nn.functional as F

import common


@dataclass
class Args:
    objective: Literal["reward", "cost"] = "reward"  # helpfulness (eq. 5) or harmlessness (eq. 6)
    # --- data and model
    model_name_or_path: str = "output/sft"  # SFT folder (or any causal-LM / score-model folder)
    train_data: str = "data/tiny-safety/preference_train.jsonl"  # PKU-SafeRLHF rows, or chosen/rejected rows for the reward model
    eval_data: str = "data/tiny-safety/preference_test.jsonl"  # held-out rows for accuracy ('' = none)
    output_dir: str = ""  # default: output/reward or output/cost
    max_length: int = 128  # prompt + response tokens per side
    chat_template: bool = False  # use the tokenizer's chat template instead of the Beaver template
    skip_invalid_rows: bool = False  # skip bad rows with a counted warning instead of stopping
    truncate_long_prompts: bool = False  # prompts >= max_length: keep their last max_length/2 tokens (else they are dropped)
    cut_response_tokens: int = 0  # train (and evaluate) on each answer's first N tokens, as RL with --max_new_tokens N reads them (0: whole answers)
    cut_appends_eos: bool = False  # with --cut_response_tokens: end each cut answer with EOS (what ppo_lagrangian.py --score_cut_as_ended reads)
    trust_remote_code: bool = False  # allow model code shipped with the checkpoint (only for models you trust)
    # --- several constraints (PKU-SafeRLHF v1 rows with response_*_harm_category)
    cost_categories: str = ""  # '' = one overall cost; else groups 'name=Category A+Category B,...' or category names; all = the 19
    severity_weighted: bool = False  # weight an unsafe response's classification term by its severity level (1-3)
    allow_empty_cost_groups: bool = False  # train a group that no training response is harmful in (refused by default)
    # --- optimisation (the research knobs)
    loss_type: Literal["sequence-wise", "token-wise"] = "sequence-wise"  # score at the end, or per token (safe-rlhf's option)
    regularization: float = 0.001  # coefficient of mean(score^2), keeps scores from drifting (safe-rlhf: 0.001)
    epochs: int = 4  # tiny default; safe-rlhf 7B: 2
    max_steps: int = -1  # stop after this many optimiser steps (-1: run all epochs)
    per_device_train_batch_size: int = 16  # pairs per rank per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimiser step
    global_batch_size: int = 0  # pairs per step; if set, gradient_accumulation_steps = this / (per-device x world)
    learning_rate: float = 5e-4  # tiny default; safe-rlhf 7B: 2e-5
    weight_decay: float = 0.1  # AdamW weight decay (matrices only)
    warmup_ratio: float = 0.03  # fraction of the steps with linear warmup, then cosine decay
    max_grad_norm: float = 1.0  # gradient clipping norm
    freeze_layers: int = 0  # the embeddings and the first N decoder blocks get no gradient (0: train everything)
    seed: int = 42  # seed of the data order, head initialisation
    # --- systems
    bf16: Optional[bool] = field(default=None, metadata={"nargs": "?", "const": True})  # bf16 compute with fp32 master weights, reduction, scores and log-probs (FSDP2 MixedPrecisionPolicy); default: on for CUDA, off on CPU; --bf16 turns it on anywhere
    activation_checkpointing: bool = False  # recompute block activations in backward (long sequences)
    compile: bool = False  # torch.compile each decoder block (for CUDA; also runs on CPU, ~40 s to compile)
    # --- logging and saving
    log_every: int = 10  # optimiser steps between metrics.jsonl rows
    eval_every: int = 0  # optimiser steps between held-out evaluations (0: at the end of each epoch), the learning curve
    eval_batch_size: int = 16  # pairs per forward pass in evaluation (2x this many sequences)
    score_stats_rows: int = 256  # the last training pairs whose scores give the mean/std saved in the config
    wandb_project: str = ""  # also log to this wandb project ('' = off)
    run_name: str = ""  # wandb run name ('' = the objective)
    overwrite: bool = False  # replace a finished run (or an unfinished one's checkpoints) in output_dir
    save_model: bool = True  # write the trained model as an HF folder at the end
    # --- resume (README "Resuming and failures")
    save_every: int = 0  # optimiser steps between resume checkpoints in output_dir/checkpoints (0: none)
    keep_last: int = 2  # resume checkpoints kept (older ones are deleted)
    resume: str = field(default="", metadata={"nargs": "?", "const": "auto"})  # --resume: newest checkpoint; or a path


def parse_args(argv=None):
    args = common.parse_args(Args, argv)
    args.output_dir = args.output_dir or f"output/{args.objective}"
    args.run_name = args.run_name or args.objective
    groups = common.parse_cost_groups(args.cost_categories)  # checked here; main() parses them again (args stays as parsed)
    if (groups or args.severity_weighted) and args.objective != "cost":
        raise common.UserError("--cost_categories and --severity_weighted train a cost model: add --objective cost")
    if args.severity_weighted and not groups:
        raise common.UserError("--severity_weighted needs --cost_categories (severity comes with the v1 harm fields)")
    if args.cut_response_tokens < 0 or (args.cut_appends_eos and not args.cut_response_tokens):
        raise common.UserError("--cut_response_tokens must be >= 1 to cut (0: whole answers); --cut_appends_eos needs it")
    if groups and args.loss_type == "token-wise":
        raise common.UserError("--cost_categories trains end scores: use --loss_type sequence-wise")
    return args


# ----------------------------------------------------------------------------- the losses (paper §3.2)
def _pairwise(hi, lo, mask):
    """−log σ(hi − lo), averaged per pair over `mask` when the scores are per token ([B, T])."""
    nll = -F.logsigmoid(hi - lo)
    return nll.mean() if mask is None else common.masked_mean(nll, mask)


def reward_loss(better, worse, regularization=0.0, mask=None):
    """Bradley–Terry on the helpfulness label: mean(−log σ(r_better − r_worse)) + reg·mean(r²).
    `better`, `worse`: end scores [B] (sequence-wise), or per-token scores [B, T] with the pair's `mask`
    from the first differing token to the later end (token-wise)."""
    loss = _pairwise(better, worse, mask)
    scores = torch.cat([better, worse])
    reg = (scores ** 2).mean() if mask is None else common.masked_mean(scores ** 2, torch.cat([mask, mask]))
    return loss + regularization * reg


def cost_loss(safer, unsafer, safer_is_safe, unsafer_is_safe, regularization=0.0, mask=None, safer_labelled=None,
              unsafer_labelled=None):
    """Pairwise on the harmlessness label plus the per-response classification terms:
    mean(−log σ(c_unsafer − c_safer) − l_s·log σ(ξ_safer·c_safer) − l_u·log σ(ξ_unsafer·c_unsafer)) + reg·mean(c²),
    ξ = +1 for an unsafe response, −1 for a safe one (so a safe response is pushed to cost < 0); l = 1 where the
    response's safety is labelled, 0 where the row says null (common.UNLABELLED_OK: the pair still orders the two,
    nothing pins its level). *_labelled: [B] bool, None = all labelled (l = 1 multiplies exactly: the same floats)."""
    xi_s = torch.where(safer_is_safe.bool(), -1.0, 1.0).to(safer.dtype)
    xi_u = torch.where(unsafer_is_safe.bool(), -1.0, 1.0).to(unsafer.dtype)
    l_s = 1.0 if safer_labelled is None else safer_labelled.to(safer.dtype)
    l_u = 1.0 if unsafer_labelled is None else unsafer_labelled.to(unsafer.dtype)
    if mask is not None:
        xi_s, xi_u = xi_s[:, None], xi_u[:, None]
        l_s, l_u = (x if isinstance(x, float) else x[:, None] for x in (l_s, l_u))
    nll = -F.logsigmoid(unsafer - safer) - l_s * F.logsigmoid(xi_s * safer) - l_u * F.logsigmoid(xi_u * unsafer)
    loss = nll.mean() if mask is None else common.masked_mean(nll, mask)
    scores = torch.cat([safer, unsafer])
    reg = (scores ** 2).mean() if mask is None else common.masked_mean(scores ** 2, torch.cat([mask, mask]))
    return loss + regularization * reg


def cost_loss_groups(safer, unsafer, safer_harm, unsafer_harm, regularization=0.0, safer_weight=None,
                     unsafer_weight=None):
    """Several constraints: K cost heads, scores [B, K]; harm [B, K] = harmful in group k (any of its categories).
        L = mean_B( −log σ(max_k c_u,k − max_k c_s,k) − mean_k w_s,k log σ(ξ_s,k c_s,k) − mean_k w_u,k log σ(ξ_u,k c_u,k) )
            + reg·mean(c²),   ξ_k = +1 if harmful in group k else −1.
    Head k's classification term pins its own zero point: c_k > 0 means unsafe in group k. The pairwise term (the
    safer_response_id label, which compares whole responses) acts on the aggregate max_k c_k: its sign is the overall
    label whenever the groups cover every category the data flags (a response is unsafe iff some head is > 0, as eq. 6
    asks of one cost), and it raises the head that is already the most unsafe rather than all of them. mean_k keeps
    the weight of the classification terms against the pairwise one as in eq. 6 for any K. With one group of every
    category it is cost_loss, float for float. weight [B, K]: the severity level where harmful in group k, else 1
    (--severity_weighted), or None."""
    xi_s = torch.where(safer_harm.bool(), 1.0, -1.0).to(safer.dtype)
    xi_u = torch.where(unsafer_harm.bool(), 1.0, -1.0).to(unsafer.dtype)
    w_s, w_u = (1.0, 1.0) if safer_weight is None else (safer_weight, unsafer_weight)
    # the terms in cost_loss's order: the same autograd graph order, so one group trains bit for bit like today
    nll = (-F.logsigmoid(unsafer.max(-1).values - safer.max(-1).values) - (w_s * F.logsigmoid(xi_s * safer)).mean(-1)
           - (w_u * F.logsigmoid(xi_u * unsafer)).mean(-1))
    return nll.mean() + regularization * (torch.cat([safer, unsafer]) ** 2).mean()


# ----------------------------------------------------------------------------- data
class Pair(NamedTuple):
    """One preference pair, tokenised. hi = the better (reward) or the safer (cost) response. With cost groups, per
    group k: is each side harmful in group k, and the weight of its classification term (the severity level with
    --severity_weighted, else 1); None without groups. row: the index of the source row (held-out labels are read from
    the row itself, not from these fields: evaluate)."""
    hi: list
    lo: list
    hi_safe: Optional[bool]  # None: the row leaves this response's safety unlabelled (null)
    lo_safe: Optional[bool]
    hi_harm: Optional[list] = None
    lo_harm: Optional[list] = None
    hi_weight: Optional[list] = None
    lo_weight: Optional[list] = None
    row: int = -1
    hi_id: int = 0


def make_pairs(rows, objective, tokenizer, max_length, chat_template, source, truncate_prompts=False, groups=(),
               severity_weighted=False, cut=0, cut_eos=False):
    """Each row -> a Pair. Rows whose prompt does not leave room for a response (unless truncate_prompts), or whose two
    sides are identical after truncation, are dropped and counted. cut > 0 (--cut_response_tokens): each response is
    cut to its first `cut` tokens (common.cut_response; with cut_eos an EOS ends the cut one), so the model learns to
    score what a policy limited to `cut` new tokens writes, the level included: a model trained on whole answers reads
    a cut answer + EOS as a worse, riskier complete one (docs/experiment/runs1-3.md, "Reading the two runs side by
    side"). The pair keeps its labels: a label about the whole answers is taken to hold for their openings (harm
    shows early; a pair whose openings are identical is dropped)."""
    out, truncated, dropped, ungrouped, was_cut = [], 0, 0, 0, 0
    for n, r in enumerate(rows):
        hi = r["better_response_id"] if objective == "reward" else r["safer_response_id"]
        p = common.tokenize_prompt(tokenizer, r["prompt"], chat_template)  # once for both responses
        a = common.tokenize_prompt_response(tokenizer, r["prompt"], r[f"response_{hi}"], max_length, chat_template,
                                            truncate_prompts, p)
        b = common.tokenize_prompt_response(tokenizer, r["prompt"], r[f"response_{1 - hi}"], max_length, chat_template,
                                            truncate_prompts, p)
        if cut and a is not None and b is not None:
            sides = []
            for ids, plen, trunc in (a, b):
                resp = ids[plen:]
                kept = common.cut_response(resp, cut, tokenizer.eos_token_id, cut_eos)
                was_cut += kept != resp
                sides.append((ids[:plen] + kept, plen, trunc and kept == resp))  # a cut response counts as cut, not truncated
            a, b = sides
        if a is None or b is None or a[0] == b[0]:  # identical after truncation: no signal
            dropped += 1
            continue
        truncated += a[2] + b[2]
        harm, weight = [None, None], [None, None]
        if groups:
            for side, i in enumerate((hi, 1 - hi)):
                harm[side] = common.group_labels(r, i, groups)
                w = r[f"response_{i}_severity_level"] if severity_weighted else 1
                weight[side] = [float(max(w, 1)) if h else 1.0 for h in harm[side]]
                ungrouped += not r[f"is_response_{i}_safe"] and not any(harm[side])
        flags = [r.get(f"is_response_{i}_safe", True) for i in (hi, 1 - hi)]  # a reward row has none: safe
        out.append(Pair(a[0], b[0], *[None if f is None else bool(f) for f in flags], *harm, *weight, n, hi))
    common.print0(f"[data] {source}: {len(out)} pairs, {truncated} responses truncated at max_length={max_length}, "
                  + (f"{was_cut} cut to their first {cut} tokens, " if cut else "")
                  + f"{dropped} pairs dropped (prompt too long or identical after truncation)")
    if ungrouped:  # the aggregate max_k C_k of such a response is pushed below 0 by every head's term
        common.print0(f"[data] warning: {source}: {ungrouped} unsafe responses are harmful in none of the cost groups "
                      f"(add a group for their categories, e.g. other=..., or the aggregate cost misses them)")
    if not out:
        raise common.UserError(f"{source}: no usable pairs at max_length={max_length}")
    return out


def check_groups_have_harm(pairs, groups, source, allow_empty=False):
    """A cost group with no harmful response in the training data trains a head that never sees cost > 0: it is
    pushed below 0 on every response, reports 100% held-out sign accuracy on data without that harm, and in PPO its
    λ decays to nothing while nothing is measured. Refused in one line (--allow_empty_cost_groups trains it anyway)."""
    empty = [name for k, (name, _) in enumerate(groups) if not any(p.hi_harm[k] or p.lo_harm[k] for p in pairs)]
    if empty and not allow_empty:
        raise common.UserError(f"{source}: no response is harmful in cost group(s) {', '.join(empty)}: such a head only "
                               f"ever learns cost < 0 (drop the group from --cost_categories, or pass "
                               f"--allow_empty_cost_groups to train it anyway)")
    if empty:
        common.print0(f"[data] warning: {source}: cost group(s) {', '.join(empty)} have no harmful response "
                      f"(--allow_empty_cost_groups)")


def make_batch(pairs, pad_id, device):
    """One forward pass for both sides: ids [2B, T] = hi rows then lo rows; end index = length − 1; safe flags [2B];
    with cost groups harm [2B, K] (bool) and classification weights [2B, K], else None, None; labelled [2B] (bool:
    False where the row leaves the response's safety null; its safe flag then reads True and is never used)."""
    ids, lengths = common.pad([p.hi for p in pairs] + [p.lo for p in pairs], pad_id)
    sides = [p.hi_safe for p in pairs] + [p.lo_safe for p in pairs]
    safe = torch.tensor([s is not False for s in sides])
    labelled = torch.tensor([s is not None for s in sides]).to(device)
    if pairs[0].hi_harm is None:
        return ids.to(device), lengths.to(device), safe.to(device), None, None, labelled
    harm = torch.tensor([p.hi_harm for p in pairs] + [p.lo_harm for p in pairs])
    weight = torch.tensor([p.hi_weight for p in pairs] + [p.lo_weight for p in pairs])
    return ids.to(device), lengths.to(device), safe.to(device), harm.to(device), weight.to(device), labelled


def score_batch(model, ids, lengths, heads=False):
    """-> per-token scores [N, T] (float32) and end scores [N] read at each sequence's last token; heads: every output
    (one per cost group), [N, T, K] and [N, K]."""
    logits = model(input_ids=ids).logits  # right padding: causal attention ignores pads
    end = common.end_scores(logits, lengths - 1, heads)
    return (logits.float() if heads else logits.squeeze(-1).float()), end


def token_wise_mask(ids, lengths, B):
    """safe-rlhf's token-wise loss: per pair, positions from the first token where the two sequences differ
    to the later of their two ends."""
    hi, lo = ids[:B], ids[B:]
    T = ids.shape[1]
    differ = (hi != lo).float()
    first = torch.where(differ.any(1), differ.argmax(1), torch.zeros_like(lengths[:B]))
    end = torch.maximum(lengths[:B], lengths[B:])
    return common.length_mask(end - first, T, start=first)


def batch_loss(model, batch, args, groups=()):
    ids, lengths, safe, harm, w, labelled = batch
    B = ids.shape[0] // 2
    if groups:  # K heads; accuracy and score statistics read the aggregate max_k c_k
        _, end = score_batch(model, ids, lengths, heads=True)
        w = w if args.severity_weighted else None
        loss = cost_loss_groups(end[:B], end[B:], harm[:B], harm[B:], args.regularization,
                                *((w[:B], w[B:]) if w is not None else ()))
        agg = end.max(-1).values
        return loss, agg[:B], agg[B:]
    scores, end = score_batch(model, ids, lengths)
    if args.loss_type == "token-wise":
        hi, lo, mask = scores[:B], scores[B:], token_wise_mask(ids, lengths, B)
    else:
        hi, lo, mask = end[:B], end[B:], None
    if args.objective == "reward":
        loss = reward_loss(hi, lo, args.regularization, mask)
    else:
        loss = cost_loss(hi, lo, safe[:B], safe[B:], args.regularization, mask, labelled[:B], labelled[B:])
    return loss, end[:B], end[B:]


@torch.no_grad()
def evaluate(model, pairs, args, pad_id, rank, world, device, rows=None, groups=()):
    """Pairwise accuracy (hi scored above lo; for cost: the unsafer costs more), and for the cost model the
    sign accuracy (cost > 0 exactly on unsafe responses), plus score mean/std of safe and unsafe responses. With cost
    groups the scores are the aggregate max_k c_k, and each group gets its own sign accuracy (c_k > 0 exactly on the
    responses harmful in group k) and unsafe fraction. The group labels are read afresh from the held-out `rows`
    themselves (common.group_labels of each pair's source row), not from the Pair fields the loss trained on: a label
    flipped or a head permuted on the way into training shows here as a low accuracy."""
    model.eval()
    mine = pairs[rank::world]
    bs = args.eval_batch_size
    n_batches = int(common.all_reduce(math.ceil(len(mine) / bs), "max"))
    hi_all, lo_all, safe_hi, safe_lo, heads, harm, lab_hi, lab_lo = [], [], [], [], [], [], [], []
    for i in range(n_batches):  # every rank runs the same number of forward passes
        chunk = mine[i * bs:(i + 1) * bs]
        batch = make_batch(chunk or mine[:1], pad_id, device)
        ids, lengths, safe, labelled = *batch[:3], batch[5]
        _, end = score_batch(model, ids, lengths, heads=bool(groups))
        if chunk:
            B = len(chunk)
            if groups:  # [2B, K] per head -> the aggregate; head scores and labels kept for per-group numbers
                heads += end.tolist()  # [2B, K]: hi rows then lo rows, as safe_hi + safe_lo below
                for side in (0, 1):  # hi rows then lo rows
                    harm += [common.group_labels(rows[p.row], p.hi_id if side == 0 else 1 - p.hi_id, groups)
                             for p in chunk]
                end = end.max(-1).values
            hi_all += end[:B].tolist(); lo_all += end[B:].tolist()
            safe_hi += safe[:B].tolist(); safe_lo += safe[B:].tolist()
            lab_hi += labelled[:B].tolist(); lab_lo += labelled[B:].tolist()
    model.train()
    hi, lo = torch.tensor(common.gather_objects(hi_all)), torch.tensor(common.gather_objects(lo_all))
    safe_flags = torch.tensor(common.gather_objects(safe_hi) + common.gather_objects(safe_lo), dtype=torch.bool)
    lab = torch.tensor(common.gather_objects(lab_hi) + common.gather_objects(lab_lo), dtype=torch.bool)
    scores = torch.cat([hi, lo])
    acc = common.preference_hits(hi, lo, args.objective).mean().item()
    out = {"eval/accuracy": acc, "eval/n_pairs": len(hi),
           "eval/score_mean": scores.mean().item(), "eval/score_std": scores.std().item()}
    for name, sel in (("safe", safe_flags & lab), ("unsafe", ~safe_flags & lab)):  # labelled responses only
        if sel.any():
            out[f"eval/{name}_score_mean"] = scores[sel].mean().item()
            out[f"eval/{name}_score_std"] = scores[sel].std().item() if sel.sum() > 1 else 0.0
    if args.objective == "cost" and lab.any():
        out["eval/sign_accuracy"] = common.sign_hits(scores[lab], safe_flags[lab]).mean().item()
        out["eval/unsafe_fraction"] = (~safe_flags[lab]).float().mean().item()
    if groups:
        heads = torch.tensor(common.gather_objects(heads))
        harm = torch.tensor(common.gather_objects(harm), dtype=torch.bool)
        for k, (name, _) in enumerate(groups):
            out[f"eval/sign_accuracy/{name}"] = ((heads[:, k] > 0) == harm[:, k]).float().mean().item()
            out[f"eval/unsafe_fraction/{name}"] = harm[:, k].float().mean().item()
    return out


def score_statistics(recent):
    """Mean and std of the end scores of the last score_stats_rows training pairs (both responses of each), read off
    the training forward passes themselves: no extra pass over the data at the end of a run (on a 135M model on a
    CPU, re-scoring 256 pairs took ~100 s, more than a short run's training). They are the scores of the last steps'
    model, saved in the config so a later stage can normalise (RLHF-DETAILS 8). Collective: every rank's window."""
    t = torch.tensor(list(recent), dtype=torch.float64)
    s, s2, n = common.all_reduce(torch.stack([t.sum(), (t ** 2).sum(), torch.tensor(float(len(t)))])).tolist()
    if n == 0:  # a run resumed from its last step trains nothing: no scores to read
        return 0.0, 1.0
    mean = s / n
    return mean, math.sqrt(max(s2 / n - mean ** 2, 0.0))


def freeze_bottom_layers(model, n):
    """Train only the top of the network: the input embeddings and the first `n` decoder blocks keep their weights and,
    since nothing below block n requires a gradient, backward stops at block n. A score model's task (read the last
    hidden state) lives in the top blocks and the head; the lower blocks' features transfer as they are ("linear probe"
    to full fine-tuning is a spectrum: Howard & Ruder 2018, ULMFiT; Lee et al. 2019, "What would Elsa do? Freezing
    layers during transformer fine-tuning"). Cost per step: forward of all L blocks + backward of L − n, so freezing 24
    of SmolLM2's 30 blocks roughly halves a step on CPU, i.e. twice the pairs in the same time."""
    if n <= 0:
        return model
    layers = common.decoder_layers(model)
    if n > len(layers):
        raise common.UserError(f"--freeze_layers {n}: the model has {len(layers)} decoder blocks")
    model.get_input_embeddings().requires_grad_(False)
    for layer in layers[:n]:
        layer.requires_grad_(False)
    return model


def train_step(model, opt, sched, pairs, acc, recent, args, groups, pad_id, device, world, step):
    """One optimiser step of eq. 5 / eq. 6 on this rank's pairs, in `acc` micro-batches of equal size (gradients
    synchronised on the last); each pair's end scores go to `recent` (score_statistics reads them, no extra pass).
    -> (loss, pairwise accuracy, tokens per rank: all averaged over ranks; the clipped-before gradient norm)."""
    size, loss_sum, right = len(pairs) // acc, 0.0, 0.0
    for k in range(acc):
        model.set_requires_gradient_sync(k == acc - 1)
        loss, hi, lo = batch_loss(model, make_batch(pairs[k * size:(k + 1) * size], pad_id, device), args, groups)
        (loss / acc).backward()
        loss_sum += loss.item() / acc
        recent.extend(torch.cat([hi, lo]).detach().float().tolist())
        right += common.preference_hits(hi, lo, args.objective).mean().item() / acc
    tokens = sum(len(a) + len(b) for a, b, *_ in pairs)
    loss_g, acc_g, tokens = (common.all_reduce(torch.tensor([loss_sum, right, tokens])) / world).tolist()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
    common.check_finite({"loss": loss_g, "gradient norm": gnorm}, f"{args.objective} step {step + 1}",
                        same_on_all_ranks=True)
    opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
    return loss_g, acc_g, tokens, gnorm


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = common.setup_distributed()
    torch.manual_seed(args.seed)

    # 1. validate everything up front
    common.check_output_dir(args.output_dir, args.overwrite, args.resume)
    ckpt = common.resolve_resume(args.resume, args.output_dir)
    groups = common.parse_cost_groups(args.cost_categories)  # [(name, categories)]; () = one overall cost
    kind = ("cost_severity" if args.severity_weighted else "cost_groups") if groups else args.objective
    train_rows = common.load_rows(args.train_data, kind, args.skip_invalid_rows, "--train_data")
    eval_rows = common.load_rows(args.eval_data, kind, args.skip_invalid_rows, "--eval_data") if args.eval_data else []
    tokenizer = common.load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    train, evald = (make_pairs(rows, args.objective, tokenizer, args.max_length, args.chat_template, path,
                               args.truncate_long_prompts, groups, args.severity_weighted, args.cut_response_tokens,
                               args.cut_appends_eos) if rows else []
                    for rows, path in ((train_rows, args.train_data), (eval_rows, args.eval_data)))
    if groups:
        check_groups_have_harm(train, groups, args.train_data, args.allow_empty_cost_groups)
    global_batch, acc, steps_per_epoch, total = common.plan_steps(
        len(train), args.per_device_train_batch_size, world, args.gradient_accumulation_steps, args.epochs,
        args.max_steps, args.train_data, args.global_batch_size)
    common.print0(f"[{args.objective}] world {world}, global batch {global_batch} pairs, {steps_per_epoch} steps/epoch, "
                  f"{total} steps, loss {args.loss_type}")
    run_state = {"stage": args.objective, "global_batch": global_batch, "train_rows": len(train), "seed": args.seed,
                 "total_steps": total}  # the cosine schedule's length: a resume may not change it
    if groups:  # a checkpoint of other groups holds another head
        run_state["cost_groups"] = [[n, c] for n, c in groups]
    if ckpt:
        common.checkpoint_state(ckpt, expect=run_state)

    # 2. score model from the SFT folder, FSDP2, AdamW (0.9, 0.95), warmup + cosine
    model = common.load_score_model(args.model_name_or_path, tokenizer, args.seed, args.trust_remote_code,
                                    cost_groups=groups)
    model.config.use_cache = False
    freeze_bottom_layers(model, args.freeze_layers)
    common.shard_model(model, device, mixed_precision=common.use_bf16(args.bf16, device),
                       activation_checkpointing=args.activation_checkpointing, compile=args.compile)
    opt = common.adamw(model, args.learning_rate, args.weight_decay)
    sched = common.cosine_schedule(opt, int(args.warmup_ratio * total), total)
    start = 0
    recent = collections.deque(maxlen=max(1, 2 * args.score_stats_rows // world))  # this rank's newest end scores
    if ckpt:
        state = common.load_checkpoint(ckpt, {"model": (model, opt)})
        sched.load_state_dict(state["scheduler"])
        windows = state.get("score_window", [[]])  # one list per rank of the run that wrote it
        recent.extend(windows[rank] if len(windows) == world else [x for w in windows for x in w][rank::world])
        start = state["step"]
    common.prepare_output_dir(args.output_dir, resume_step=start if ckpt else None)  # the only step that clears the folder
    logger = common.MetricsLogger(args.output_dir, asdict(args), args.wandb_project, args.run_name,
                                  resume_step=start if ckpt else None)
    stop = common.StopOnSignal()
    timer = common.StepTimer(args.output_dir, device, resume=bool(ckpt))  # timings.jsonl (bench/ reads it)

    def save(step):
        return common.save_checkpoint(args.output_dir, step, {"model": (model, opt)},
                                      {**run_state, "scheduler": sched.state_dict(),
                                       "score_window": common.gather_objects([list(recent)])}, keep_last=args.keep_last)

    # 3. train; each step's loss is the mean over the global batch's pairs (every rank holds the same number)
    pad_id = tokenizer.pad_token_id
    bar = common.progress(total=total, initial=start, desc=args.objective)
    result = {}  # the newest held-out evaluation
    for step in range(start, total):
        epoch = step // steps_per_epoch
        idx = common.batch_indices(len(train), global_batch, rank, world, args.seed, step, steps_per_epoch)
        if acc > 1:  # micro-batches of similar length pad less; each holds the same number of pairs: same step
            idx = sorted(idx, key=lambda j: max(len(train[j][0]), len(train[j][1])))
        loss_g, acc_g, tokens, gnorm = train_step(model, opt, sched, [train[j] for j in idx], acc, recent, args,
                                                  groups, pad_id, device, world, step)
        step += 1
        bar.update(1)
        if step % args.log_every == 0 or step == 1 or step == total:
            logger.log(step, {"train/loss": loss_g, "train/accuracy": acc_g, "train/lr": sched.get_last_lr()[0],
                              "train/grad_norm": gnorm.item(), "train/epoch": epoch + 1}, echo=False)
            bar.set_postfix(loss=f"{loss_g:.4f}", acc=f"{acc_g:.3f}")
        if evald and step % (args.eval_every or steps_per_epoch) == 0 and step < total:
            result = evaluate(model, evald, args, pad_id, rank, world, device, eval_rows, groups)
            logger.log(step, {**result, "train/epoch": epoch + 1})
        saved = save(step) if args.save_every and step % args.save_every == 0 and step < total else None
        if stop.requested():
            common.StopOnSignal.exit(saved or save(step))
        timer.step(step, **{"tokens/train": tokens * world})
    bar.close()
    timer.close({"model": (model, opt)})

    # 4. score statistics (a bounded sample of training pairs) -> config; save the HF folder *before* the final
    #    evaluation, so a kill during evaluation never loses the trained model; then evaluate once -> eval.json
    mean, std = score_statistics(recent)
    if args.save_model:
        common.save_hf(model, tokenizer, args.output_dir,
                       extra_config={"score_mean": mean, "score_std": std, "score_objective": args.objective})
        common.print0(f"[{args.objective}] saved {args.output_dir}")
    stop.release()  # SIGTERM from here on ends the process at once
    if evald:
        result = evaluate(model, evald, args, pad_id, rank, world, device, eval_rows, groups)
        msg = f"[{args.objective}] held-out pairwise accuracy {result['eval/accuracy']:.2%} over {result['eval/n_pairs']} pairs"
        if "eval/sign_accuracy" in result:  # absent when no held-out response has a safety label
            msg += f", sign accuracy (cost > 0 = unsafe) {result['eval/sign_accuracy']:.2%}"
        if groups:
            msg += "; per group: " + ", ".join(f"{n} {result[f'eval/sign_accuracy/{n}']:.2%}" for n, _ in groups)
        common.print0(msg)
    if args.save_model and common.is_rank0():
        with open(os.path.join(args.output_dir, "eval.json"), "w") as f:
            json.dump({**result, "train/score_mean": mean, "train/score_std": std}, f, indent=2)
    logger.log(step, {**result, "train/epoch": epoch + 1, "train/score_mean": mean, "train/score_std": std})
    logger.close()
    common.cleanup_distributed()


if __name__ == "__main__":
    common.entrypoint(main)
