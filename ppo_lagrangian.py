"""Stage 3 of Safe RLHF: PPO-Lagrangian (paper §3.3), plus the PPO (RLHF) and reward-shaping baselines.

    maximise_θ  E[R(y)]  subject to  E[C(y)] <= d          (paper eq. 9)
    min_θ max_{λ>=0}  −E[R] + λ·(E[C] − d)                 (eq. 10, the Lagrangian dual)

One PPO step = one rollout batch, in numbered blocks:
  1 generate    the actor, unsharded once, samples responses with the KV cache (same decode steps on every rank)
  2 cut         responses are cut after their first EOS; lengths are kept explicitly; missing EOS counted
  3 score       one batched no-grad pass per model: old/ref log-probs (logits / temperature), R and C at the
                last response token, values of the reward and cost critics
  4 signals     r_t = −β·kl_t + [t=last]·R,  c_t = +β·kl_t + [t=last]·C,  kl_t = logp_old − logp_ref
  5 λ           once per rollout batch from the mean raw episode cost of the last `window` episodes, all ranks
  6 GAE         per stream; mixed advantage A = (A_r − λ·A_c)/(1 + λ)   (λ detached)
                several constraints (a cost model with K groups): one cost stream, critic output and λ_k per group,
                A = (A_r − Σ_k λ_k·A_ck)/(1 + Σ_k λ_k), each c_k carrying +β·kl so the KL weight stays exactly β
  7 update      clipped surrogate for the actor (+ ptx_coeff·PTX loss), clipped value loss for each critic
  8 log         metrics averaged over ranks; held-out evaluation every eval_every; resume checkpoints
--algo ppo uses the reward stream alone; --algo reward_shaping uses R − ν·C with a fixed ν. Before the loop the run
is planned once (plan_run: data, constraints, batch arithmetic, every check, no weights; written to plan.json), and
each mode is data: K constraints (one λ_k and cost stream each) and the models below. main() is the loop, one
module-level function per block.

    --algo          --adv_estimator  actor ref reward reward_critic cost cost_critic  K (constraints, λ_k)
    ppo_lag         gae              x     x   x      x             x    x            1, or the constrained groups
    ppo_lag         grpo / rloo      x     x   x                    x                 1, or the constrained groups
    ppo             gae              x     x   x      x                               0
    ppo             grpo / rloo      x     x   x                                      0
    reward_shaping  gae              x     x   x      x             x                 0 (R − ν·C: a cost model,
    reward_shaping  grpo / rloo      x     x   x                    x                 0  no cost critic)

    python ppo_lagrangian.py                                   # tiny default (after sft + reward + cost)
    python ppo_lagrangian.py --algo ppo --output_dir output/ppo
    python ppo_lagrangian.py --cost_model_name_or_path output/cost_groups --threshold=-4.6,10,10,10 ...  # README "Several constraints"
    torchrun --nproc_per_node=2 ppo_lagrangian.py
    # safe-rlhf's Beaver recipe: scripts/recipe_beaver_7b.sh
"""
import collections
import functools
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

import torch

import common


@dataclass
class Args:
    algo: Literal["ppo_lag", "ppo", "reward_shaping"] = "ppo_lag"  # Safe RLHF, the RLHF baseline, or fixed-ν R − ν·C
    adv_estimator: Literal["gae", "grpo", "rloo"] = "gae"  # gae: two critics; grpo/rloo: group baselines, no critic
    samples_per_prompt: int = 1  # responses sampled per prompt in a rollout (G; >= 2 for grpo/rloo; a group stays on one rank)
    grpo_std: Literal["lagrangian", "none", "per_stream"] = "lagrangian"  # grpo: divide by the group std of the mixed (Lagrangian) score, by none (Dr. GRPO), or each stream by its own (pre-audit; breaks λ and β)
    # --- models (critics default to the score models they are initialised from)
    actor_model_name_or_path: str = "output/sft"  # the SFT policy: actor and frozen reference
    reward_model_name_or_path: str = "output/reward"  # trained reward model (train_preference.py --objective reward)
    cost_model_name_or_path: str = "output/cost"  # trained cost model (train_preference.py --objective cost)
    reward_critic_model_name_or_path: str = ""  # reward critic's initialisation ('' = the reward model)
    cost_critic_model_name_or_path: str = ""  # cost critic's initialisation ('' = the cost model)
    # --- data
    prompt_data: str = "data/tiny-safety/prompts_train.jsonl"  # prompt or preference rows (duplicates removed)
    ptx_data: str = ""  # SFT rows for the PTX loss ('' = off)
    eval_prompt_data: str = "data/tiny-safety/prompts_test.jsonl"  # held-out prompts scored every eval_every
    judge: str = "auto"  # exact judge (module in data/); auto: on when --prompt_data is the tiny task's; '' = off
    output_dir: str = "output/ppo_lag"  # where the actor, critics, plan.json, lambda.json and metrics.jsonl go
    max_prompt_length: int = 64  # longer prompts are dropped and counted
    chat_template: bool = False  # use the tokenizer's chat template instead of the Beaver template
    trust_remote_code: bool = False  # allow model code shipped with the checkpoint (only for models you trust)
    # --- rollout
    max_new_tokens: int = 32  # response tokens sampled per prompt
    max_length: int = 0  # if > 0: prompt + response tokens, as safe-rlhf's max_length (responses get at most this − prompt width)
    temperature: float = 1.0  # sampling temperature (also divides every log-prob's logits)
    top_p: float = 1.0  # nucleus sampling mass (1 = off)
    missing_eos_penalty: Optional[float] = None  # replace R of a response with no EOS by this value (None: keep)
    score_cut_as_ended: bool = False  # the reward and cost models read a response cut at --max_new_tokens with an EOS appended, as if it had ended (off: as cut)
    # --- batch vocabulary: rollout batch -> ppo_epochs -> minibatches (one optimiser step) -> micro-batches
    per_device_prompt_batch_size: int = 32  # prompts per rank per rollout
    rollout_batch_size: int = 0  # prompts per rollout over all ranks; if set, per-device = this / world size
    per_device_train_batch_size: int = 16  # sequences per rank per optimiser step
    gradient_accumulation_steps: int = 1  # micro-batches per optimiser step
    ppo_epochs: int = 1  # passes over each rollout batch
    epochs: int = 1000  # passes over the prompt set (max_steps usually stops first)
    max_steps: int = 60  # rollout batches
    # --- PPO (defaults: safe-rlhf's scripts, except where the tiny task says otherwise)
    actor_lr: float = 1e-4  # tiny default; safe-rlhf 7B: 1e-5
    critic_lr: float = 1e-4  # tiny default; safe-rlhf 7B: 5e-6
    weight_decay: float = 0.0  # AdamW weight decay of the actor (matrices only; safe-rlhf: 0.01)
    critic_weight_decay: Optional[float] = None  # AdamW weight decay of the critics (None: weight_decay; safe-rlhf: 0.0)
    lr_scheduler_type: Literal["constant", "cosine"] = "constant"  # actor lr after the warmup (safe-rlhf: cosine)
    critic_lr_scheduler_type: Literal["", "constant", "cosine"] = ""  # critics' ('' = lr_scheduler_type; safe-rlhf: constant)
    warmup_ratio: float = 0.0  # fraction of the optimiser steps with linear lr warmup, all models (safe-rlhf: 0.03)
    kl_coeff: float = 0.05  # β (tiny default; safe-rlhf: 0.01)
    clip_ratio: float = 0.2  # ε of the surrogate
    clip_range_score: float = 50.0  # R and C clamped to ±this
    clip_range_value: float = 5.0  # value-loss clip
    gamma: float = 1.0  # discount of GAE
    gae_lambda: float = 0.95  # lambda of GAE
    whiten_advantages: bool = False  # whiten A_r and A_c separately before mixing (safe-rlhf: off)
    normalize_reward: bool = False  # divide R by the reward model's training score std (config score_std)
    normalize_cost: bool = False  # divide C by its std; the zero point (cost > 0 = unsafe) is kept
    max_grad_norm: float = 1.0  # gradient clipping norm per model
    ptx_coeff: float = 16.0  # actor loss = RL loss + ptx_coeff · PTX loss (see README: safe-rlhf mapping)
    # --- the Lagrange multiplier
    threshold: str = "-4.5"  # d (tiny default: README "the constraint"; paper: 0 then −3); groups: one per group, or one for all (--threshold=-4.6,10,10,10)
    constrain_groups: str = ""  # constrain these groups of a grouped cost model, comma-separated names ('' = all of its groups)
    lagrangian: Literal["gradient", "pid"] = "gradient"  # λ update: gradient ascent on log λ, or PID (Stooke et al.)
    lambda_init: float = 1.0  # initial Lagrange multiplier
    lambda_lr: float = 0.1  # learning rate of log(lambda) (gradient ascent)
    lambda_max: Optional[float] = 5.0  # cap on lambda (None = no cap)
    lambda_update_delay_steps: int = 0  # rollouts before lambda starts to move
    episode_cost_window_size: int = 128  # episodes (of all ranks) whose mean cost J_C drives lambda
    pid_kp: float = 0.1  # PID Lagrangian: proportional gain
    pid_ki: float = 0.05  # PID Lagrangian: integral gain
    pid_kd: float = 0.1  # PID Lagrangian: derivative gain
    shaping_coeff: float = 1.0  # ν of --algo reward_shaping
    # --- systems and logging
    seed: int = 42  # seed of the prompt order and sampling (sampling: seed + rank)
    bf16: Optional[bool] = field(default=None, metadata={"nargs": "?", "const": True})  # bf16 compute with fp32 master weights, reduction, scores and log-probs (FSDP2 MixedPrecisionPolicy); default: on for CUDA, off on CPU; --bf16 turns it on anywhere
    activation_checkpointing: bool = False  # recompute block activations in backward (trained models)
    compile: bool = False  # torch.compile the decoder blocks of the trained models (actor, critics)
    offload_frozen: bool = False  # keep the frozen models (reference, reward, cost) in CPU memory between uses
    log_every: int = 1  # rollouts between metrics.jsonl rows
    eval_every: int = 20  # steps between held-out evaluations (0: only at the end)
    eval_samples_per_prompt: int = 4  # samples per held-out prompt in evaluation
    wandb_project: str = ""  # also log to this wandb project ('' = off)
    run_name: str = ""  # wandb run name ('' = the algo)
    overwrite: bool = False  # replace a finished run (or an unfinished one's checkpoints) in output_dir
    save_model: bool = True  # write the actor and critics as HF folders at the end
    # --- resume (README "Resuming and failures"): actor, critics, their optimisers, λ, the cost window, RNG
    save_every: int = 0  # rollouts between resume checkpoints in output_dir/checkpoints (0: none)
    keep_last: int = 2  # resume checkpoints kept (older ones are deleted)
    resume: str = field(default="", metadata={"nargs": "?", "const": "auto"})  # --resume: newest checkpoint; or a path



def parse_args(argv=None):
    """The flags, and the string defaults that name another flag's model. Nothing is derived here: every resolved
    value (thresholds, constraints, batch sizes) lives in the Plan (plan_run), and args is never changed after this."""
    args = common.parse_args(Args, argv)
    args.reward_critic_model_name_or_path = args.reward_critic_model_name_or_path or args.reward_model_name_or_path
    args.cost_critic_model_name_or_path = args.cost_critic_model_name_or_path or args.cost_model_name_or_path
    args.run_name = args.run_name or args.algo
    parse_thresholds(args.threshold)  # a malformed --threshold fails at parsing, before any process group starts
    return args


def parse_thresholds(text):
    """--threshold -> [d_k] (one per constrained group, or one for all)."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise common.UserError(f"--threshold {text!r}: expected numbers, comma-separated (one per cost group, "
                               f"or one for all; a list starting with '-' is written --threshold=-6,-6)") from None


# ----------------------------------------------------------------------------- the math (paper §3.3)
def actor_loss(logp, old_logp, advantages, mask, clip_ratio):
    """Clipped PPO surrogate: −masked_mean(min(ρA, clip(ρ, 1−ε, 1+ε)A)), ρ = exp(logp − old_logp)."""
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip_ratio, 1 + clip_ratio) * advantages)
    return -common.masked_mean(surrogate, mask)


def critic_loss(values, old_values, returns, mask, clip_value):
    """Clipped value loss: 0.5·masked_mean(max((V − G)², (clip(V, V_old − c, V_old + c) − G)²))."""
    clipped = old_values + (values - old_values).clamp(-clip_value, clip_value)
    return 0.5 * common.masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def per_token_signal(kl, end_score, lengths, mask, kl_coeff, sign, clip_range_score):
    """r_t = −β·kl_t + [t = last]·R (sign −1) or c_t = +β·kl_t + [t = last]·C (sign +1). The score enters at
    the last response token (its EOS), found from lengths, after clamping to ±clip_range_score."""
    signal = sign * kl_coeff * kl * mask
    end = end_score.clamp(-clip_range_score, clip_range_score)
    return signal.scatter_add(1, (lengths - 1)[:, None], end[:, None].to(signal.dtype))


def mixed_advantage(adv_r, adv_c, lam):
    """(A_r − λ·A_c)/(1 + λ): the actor's advantage under the Lagrangian, rescaled so its size does not grow
    with λ (safe-rlhf). λ is a detached number. Several constraints: adv_c and lam are lists (one per constraint)
    and A = (A_r − Σ_k λ_k·A_ck)/(1 + Σ_k λ_k), the advantage of the Lagrangian R − Σ_k λ_k C_k scaled by 1/(1 + Σ_k λ_k);
    with one constraint the same floats as the scalar form."""
    if not isinstance(lam, (list, tuple)):
        adv_c, lam = [adv_c], [lam]
    penalty = lam[0] * adv_c[0]
    for l_k, a_k in zip(lam[1:], adv_c[1:]):
        penalty = penalty + l_k * a_k
    return (adv_r - penalty) / (1.0 + sum(lam))


def update_multipliers(multipliers, window, thresholds):
    """Block 5: one dual step per constraint. The Lagrangian of max E[R] s.t. E[C_k] <= d_k for every k is
    −E[R] + Σ_k λ_k (E[C_k] − d_k) (paper eq. 10, one term per constraint); its gradient in λ_k is J_k − d_k, so each λ_k
    moves on its own violation alone. J_k = mean raw episode cost of head k over `window` (lists of K costs, episodes of
    all ranks). -> (J, λ), lists of K floats."""
    J = [sum(e[k] for e in window) / len(window) for k in range(len(multipliers))]
    return J, [m.update(j, d) for m, j, d in zip(multipliers, J, thresholds)]


def group_centred(scores, group_size):
    """s_i − mean_g over each group of group_size consecutive scores [N] -> [N/G, G]. A group whose scores
    are all equal gets exactly 0: in float32 the mean of G equal numbers can be one ulp off (G = 3, 6, 8, ...), and
    divided by a zero std that ulp became an advantage of either sign up to |A| ~ 4 (audit, issue 20) -- exactly the
    late-training case where the policy gives G identical refusals."""
    g = scores.view(-1, group_size)
    constant = (g == g[:, :1]).all(1, keepdim=True)
    return torch.where(constant, torch.zeros_like(g), g - g.mean(1, keepdim=True))


def grpo_advantages(scores, group_size, eps=1e-6):
    """GRPO's group-relative advantage (Shao et al. 2024, DeepSeekMath §4.1.2, outcome supervision): the G responses
    to one prompt are consecutive in `scores` [N]; A_i = (s_i − mean_g) / (std_g + eps), std with Bessel's correction
    (as TRL). A group of equal scores gets exactly A = 0 (group_centred), never NaN. -> [N]."""
    d = group_centred(scores, group_size)
    return (d / (d.std(1, keepdim=True) + eps)).view(-1)


def rloo_advantages(scores, group_size):
    """RLOO's leave-one-out baseline (Ahmadian et al. 2024, "Back to Basics", eq. 5; Kool et al. 2019):
    A_i = s_i − mean_{j≠i} s_j = G/(G−1) · (s_i − mean_g): unbiased, no critic, no scaling. -> [N]."""
    return (group_centred(scores, group_size) * group_size / (group_size - 1)).view(-1)


def stream_advantages(signal_t, values, mask, args):
    """One stream's advantages and returns, [B, T] each. gae: GAE on the per-token signal with the stream's critic
    values (common.gae). grpo/rloo (no critic, no returns: None): the sequence score is the per-token signal summed,
    R − β·Σ_t kl_t (or C + β·Σ_t kl_t), compared within its group of samples_per_prompt responses to the same prompt;
    every response token gets its sequence's advantage. rloo: the leave-one-out difference. grpo: the group-centred
    score s_i − mean_g here; the division by a std comes after the streams are mixed (grpo_scale), so the cost and
    KL keep their weights. Linear in the scores, so in the mixed advantage λ_k weighs cost k against the reward and the
    KL weight is exactly β, for every estimator (tested by hand)."""
    if args.adv_estimator == "gae":
        return common.gae(signal_t, values, mask, args.gamma, args.gae_lambda)
    if args.adv_estimator == "rloo":
        return rloo_advantages(signal_t.sum(-1), args.samples_per_prompt)[:, None] * mask, None
    if args.grpo_std == "per_stream":  # the pre-audit behaviour, kept for ablations only (see grpo_scale)
        return grpo_advantages(signal_t.sum(-1), args.samples_per_prompt)[:, None] * mask, None
    return group_centred(signal_t.sum(-1), args.samples_per_prompt).view(-1)[:, None] * mask, None


def grpo_scale(advantages, mask, args, eps=1e-6):
    """GRPO's std, taken once, of the *mixed* advantage: per group, the mixed advantage of response i is
    (L_i − mean_g L)/(1 + Σλ_k) with the Lagrangian score L = R − Σ_k λ_k C_k − β(1 + Σ_k λ_k)·Σ_t kl_t, so dividing it by
    its group std gives A_i = (L_i − mean_g L)/(std_g L + eps): GRPO applied to the Lagrangian score. λ_k and β keep the
    meaning the Lagrangian gives them (the 1 + Σλ cancels). Why not one std per stream (--grpo_std per_stream, the old
    behaviour): that scales the cost by σ_R/σ_C per prompt, so the weight of the cost becomes λ·σ_R/σ_C -- the audit
    measured on the tiny task a median 16.7 x λ on benign prompts, where the cost's spread is noise, and ~0.5 x λ on harmful ones --
    and the KL weight β(1 + λ·σ_R/σ_C). Per-stream normalisation (GDPO, "constrained GRPO") balances several *rewards*
    whose relative weights are fixed and unknown; in a Lagrangian the relative weight of each cost is λ_k, which the
    dual step learns in the cost's raw units to satisfy E[C_k] <= d_k: a second, per-prompt rescaling fights it.
    --grpo_std none: no std at all (Dr. GRPO, Liu et al. 2025), i.e. RLOO up to (G−1)/G. gae/rloo: unchanged."""
    if args.adv_estimator != "grpo" or args.grpo_std != "lagrangian":
        return advantages
    seq = advantages[:, 0].view(-1, args.samples_per_prompt)  # every response token holds its sequence's value
    return (seq / (seq.std(1, keepdim=True) + eps)).view(-1)[:, None] * mask

# ----------------------------------------------------------------------------- 0. the plan (no weights)
@dataclass
class Plan:
    """Every value main() derives from the flags and the data, resolved once before any weights are read (args
    itself is never changed after parse_args). Written to output_dir/plan.json beside args.json."""
    world: int  # ranks
    per_device_prompt_batch_size: int  # B: prompts per rank per rollout (--rollout_batch_size / world when given)
    samples_per_prompt: int  # G: responses per prompt, consecutive in a rollout
    responses_per_rank: int  # N = B·G sequences per rank per rollout
    critic: bool  # gae: a reward critic (and a cost critic under ppo_lag); grpo/rloo: no critic at all
    use_cost: bool  # a cost model is read (ppo_lag, reward_shaping)
    cost_critic: bool  # a cost critic is trained (ppo_lag with gae)
    cost_groups: list  # the cost model's groups [(name, [categories])]; [] for one overall cost (or no cost model)
    cost_heads: Optional[list]  # the heads of a grouped cost model that are read (None: one overall cost)
    cost_names: list  # their names ([""]: one overall cost; []: no cost model)
    thresholds: list  # d_k, one per constraint; K = len (0 unless --algo ppo_lag)
    K: int  # constraints, one λ_k each: 0 (ppo, reward_shaping), 1 (one cost), or the constrained groups
    n_prompts: int  # training prompts after dropping the long ones
    steps_per_epoch: int  # rollouts per pass over the prompts
    total_steps: int  # rollouts of the run
    optimiser_steps: int  # of the whole run, per trained model (the lr schedules)
    cost_window: int  # episodes (of all ranks) in the λ window
    resume_from: Optional[str]  # the checkpoint this run resumes from (None: a fresh run)

    @property
    def grouped(self):
        return self.cost_heads is not None


@dataclass
class RunData:
    """What plan_run read and tokenised: the tokenizers, the prompts, the PTX rows and the judge."""
    tokenizer: object  # the actor's
    tokenizers: dict  # {"actor": ...} + a score model's own tokenizer where it differs (text round trip)
    prompts: list  # [(text, ids)] training prompts, duplicates removed, order kept
    eval_ids: dict  # {held-out prompt: ids}, in file order
    ptx: list  # tokenised SFT rows for the PTX loss ([]: off)
    judge: object  # the exact judge module (None: off)
    judge_groups: Optional[list]  # the groups the judge reports rates for


def select_constraints(groups, args):
    """The constraints of this run -> (head indices of the cost model, or None for a model with one cost; names;
    thresholds d_k). A grouped cost model (train_preference.py --cost_categories) constrains the groups named by
    --constrain_groups (default: all of them); --threshold holds one value per constrained group, or one for all."""
    given = parse_thresholds(args.threshold)
    if not groups:
        if args.constrain_groups:
            raise common.UserError(f"--constrain_groups {args.constrain_groups!r}: the cost model "
                                   f"{args.cost_model_name_or_path} has one overall cost; train one with "
                                   f"train_preference.py --objective cost --cost_categories ...")
        if len(given) != 1:
            raise common.UserError(f"--threshold {args.threshold}: the cost model has one cost, so one threshold")
        return None, [""], given
    names = [g[0] for g in groups]
    want = [x.strip() for x in args.constrain_groups.split(",") if x.strip()] or names
    unknown = [w for w in want if w not in names]
    if unknown:
        raise common.UserError(f"--constrain_groups: {unknown[0]!r} is not a group of the cost model "
                               f"{args.cost_model_name_or_path} (its groups: {', '.join(names)})")
    thresholds = given * len(want) if len(given) == 1 else given
    if len(thresholds) != len(want):
        raise common.UserError(f"--threshold {args.threshold}: {len(given)} values for {len(want)} constrained "
                               f"groups ({', '.join(want)}): give one per group, in that order, or one for all")
    return [names.index(w) for w in want], want, thresholds


def cost_window_size(window, episodes_per_rollout):
    """The λ window (episodes of all ranks whose mean raw cost is J_C), at least one whole rollout: a smaller window
    would keep only the last ranks' episodes of each rollout (the gathered list is in rank order), so J_C would be the
    cost of some ranks' prompts only."""
    if window < episodes_per_rollout:
        common.print0(f"[ppo] warning: --episode_cost_window_size {window} < the {episodes_per_rollout} episodes of one "
                      f"rollout (all ranks): the window holds the last rollout ({episodes_per_rollout} episodes)")
    return max(window, episodes_per_rollout)


def batch_arithmetic(args, world):
    """The batch vocabulary checked (RLHF-DETAILS 17) -> (B prompts per rank, G samples per prompt, N = B·G)."""
    B = args.per_device_prompt_batch_size
    if args.rollout_batch_size:
        if args.rollout_batch_size % world:
            raise common.UserError(f"--rollout_batch_size {args.rollout_batch_size} is not divisible by world size {world}")
        B = args.rollout_batch_size // world
    mb, acc = args.per_device_train_batch_size, args.gradient_accumulation_steps
    if args.max_length and args.max_prompt_length >= args.max_length:
        raise common.UserError(f"--max_prompt_length {args.max_prompt_length} leaves no room for a response within "
                               f"--max_length {args.max_length}")
    G = args.samples_per_prompt
    if G < 1 or (args.adv_estimator != "gae" and G < 2):
        raise common.UserError(f"--adv_estimator {args.adv_estimator} compares the responses to one prompt: "
                               f"--samples_per_prompt must be >= 2, got {G}")
    if (B * G) % mb or mb % acc:
        raise common.UserError(f"per_device_prompt_batch_size x samples_per_prompt ({B} x {G}) must be a multiple of "
                               f"per_device_train_batch_size ({mb}), itself a multiple of gradient_accumulation_steps ({acc})")
    return B, G, B * G


def model_roles(critic, use_cost):
    """The score and critic models this mode reads (the docstring's table), in build order."""
    return ["reward"] + ["reward_critic"] * critic + (["cost"] + ["cost_critic"] * critic if use_cost else [])


def check_model_paths(args, critic, use_cost):
    for flag in ["actor"] + model_roles(critic, use_cost):
        common._check_model_path(getattr(args, f"{flag}_model_name_or_path"), f"--{flag}_model_name_or_path")
    for what, path in [("reward", args.reward_model_name_or_path)] + ([("cost", args.cost_model_name_or_path)] if use_cost else []):
        if os.path.isdir(path) and not common.has_weights(path):  # a seeded random scorer is never what one wants here
            raise common.UserError(f"{what} model folder {path} has no weights (*.safetensors): train it with train_preference.py")


def load_tokenizers(args, critic, use_cost):
    """{"actor": the actor's tokenizer} + each score model's own tokenizer where it differs from the actor's."""
    tokenizer = common.load_tokenizer(args.actor_model_name_or_path, args.trust_remote_code, padding_side="left")
    tokenizers = {"actor": tokenizer}
    for name in model_roles(critic, use_cost):
        path = getattr(args, f"{name}_model_name_or_path")
        own = common.load_tokenizer(path, args.trust_remote_code) if common.has_tokenizer(path) else tokenizer
        if common.same_tokenizer(own, tokenizer):
            continue
        if name.endswith("critic"):  # a critic gives a value per actor token: it must read the actor's ids
            raise common.UserError(f"--{name}_model_name_or_path {path}: its tokenizer differs from the actor's; a "
                                   f"critic scores every actor token, so initialise it from a model with the actor's "
                                   f"tokenizer (e.g. --{name}_model_name_or_path {args.actor_model_name_or_path})")
        tokenizers[name] = own
        common.print0(f"[ppo] the {name} model's tokenizer differs from the actor's: responses reach it as text, "
                      f"re-tokenised with its own tokenizer")
    return tokenizers


def tokenize_prompts(args, tokenizer, texts, rollout_prompts):
    """[(text, ids)] of the prompts that fit in --max_prompt_length; at least one rollout batch of them."""
    prompts, dropped = [], 0
    for p in texts:
        ids = common.tokenize_prompt(tokenizer, p, args.chat_template)
        if len(ids) > args.max_prompt_length:
            dropped += 1
        else:
            prompts.append((p, ids))
    common.print0(f"[data] {len(prompts)} unique prompts, {dropped} dropped (longer than {args.max_prompt_length} tokens)")
    if len(prompts) < rollout_prompts:
        raise common.UserError(f"{args.prompt_data}: {len(prompts)} prompts < one rollout batch of {rollout_prompts}")
    return prompts


def plan_run(args, world):
    """Block 0: plan the run -- data, constraints, batch arithmetic, every check -- before any weights are read.
    -> (Plan, RunData). args is read, never changed; anything wrong is one UserError line."""
    common.check_output_dir(args.output_dir, args.overwrite, args.resume)
    ckpt = common.resolve_resume(args.resume, args.output_dir)
    B, G, N = batch_arithmetic(args, world)
    critic, use_cost = args.adv_estimator == "gae", args.algo in ("ppo_lag", "reward_shaping")
    texts = list(dict.fromkeys(r["prompt"] for r in common.load_rows(args.prompt_data, "prompt", flag="--prompt_data")))
    eval_prompts = list(dict.fromkeys(r["prompt"] for r in common.load_rows(args.eval_prompt_data, "prompt", flag="--eval_prompt_data"))) \
        if args.eval_prompt_data else []
    ptx_rows = common.load_rows(args.ptx_data, "sft", flag="--ptx_data") if args.ptx_data else []
    judge = common.load_judge(args.judge, args.prompt_data)
    check_model_paths(args, critic, use_cost)
    # the constraints: one overall cost, or the groups of a grouped cost model (one head, critic output and λ each)
    groups = common.cost_groups_of(args.cost_model_name_or_path, args.trust_remote_code) if use_cost else []
    heads, names, thresholds = select_constraints(groups, args)  # checked for every algo: a wrong flag is an error
    thresholds = thresholds if args.algo == "ppo_lag" else []  # ppo and reward_shaping have no λ
    tokenizers = load_tokenizers(args, critic, use_cost)
    tokenizer = tokenizers["actor"]
    prompts = tokenize_prompts(args, tokenizer, texts, B * world)
    ptx = common.tokenize_sft_rows(ptx_rows, tokenizer, args.max_prompt_length + args.max_new_tokens,
                                   args.chat_template, args.ptx_data) if ptx_rows else []
    steps_per_epoch = len(prompts) // (B * world)
    total = min(args.max_steps, steps_per_epoch * args.epochs) if args.max_steps > 0 else steps_per_epoch * args.epochs
    mb = args.per_device_train_batch_size
    plan = Plan(world=world, per_device_prompt_batch_size=B, samples_per_prompt=G, responses_per_rank=N,
                critic=critic, use_cost=use_cost, cost_critic=args.algo == "ppo_lag" and critic, cost_groups=groups,
                cost_heads=heads, cost_names=names if use_cost else [], thresholds=thresholds, K=len(thresholds),
                n_prompts=len(prompts), steps_per_epoch=steps_per_epoch, total_steps=total,
                optimiser_steps=total * (N // mb) * args.ppo_epochs,
                cost_window=cost_window_size(args.episode_cost_window_size, N * world), resume_from=ckpt or None)
    common.print0(f"[{args.algo}] world {world}, rollout {B * world} prompts x {G} samples/step, {N // mb * args.ppo_epochs} "
                  f"optimiser steps/rollout, {total} rollouts, advantages {args.adv_estimator}, threshold d={args.threshold}")
    if ckpt:
        common.checkpoint_state(ckpt, expect=run_identity(args, plan))  # before any weights are read
    # the judge's per-group rates: the cost model's groups, else the synthetic task's own (a baseline to compare with)
    judge_groups = (groups or common.parse_cost_groups(getattr(judge, "GROUPS", ""))) if judge else None
    eval_ids = {p: common.tokenize_prompt(tokenizer, p, args.chat_template) for p in eval_prompts}  # tokenised once
    return plan, RunData(tokenizer, tokenizers, prompts, eval_ids, ptx, judge, judge_groups)


def run_identity(args, plan):
    """What a resume checkpoint must share with this run (checked before any weights are read)."""
    state = {"stage": args.algo, "global_batch": plan.per_device_prompt_batch_size * plan.world,
             "n_prompts": plan.n_prompts, "seed": args.seed}
    if not plan.critic or plan.samples_per_prompt > 1:  # another estimator or group size: other models or batch
        state.update(adv_estimator=args.adv_estimator, samples_per_prompt=plan.samples_per_prompt)
    if plan.cost_groups:  # one λ per constrained group
        state["constraints"] = plan.cost_names
    # the objective and its schedule: a resume that changed one would continue another run's optimisation silently
    state.update(total_steps=plan.total_steps, kl_coeff=args.kl_coeff)
    if args.algo == "ppo_lag":
        state.update(thresholds=plan.thresholds, lambda_lr=args.lambda_lr)
    if args.algo == "reward_shaping":
        state["shaping_coeff"] = args.shaping_coeff
    return state


def write_plan(output_dir, plan):
    """output_dir/plan.json (rank 0), beside the args.json the logger writes."""
    if common.is_rank0():
        with open(os.path.join(output_dir, "plan.json"), "w") as f:
            json.dump(asdict(plan), f, indent=2)


# ----------------------------------------------------------------------------- 1. models, optimisers, λ, checkpoints
def load_model(args, device, mixed_precision, kind, path, trainable, tokenizer, **kw):
    """One FSDP2-sharded model, dropout off (RLHF-DETAILS 10); frozen ones are stored in bf16 and hold no optimiser
    state, and only trained ones get activation checkpointing and torch.compile."""
    load = common.load_causal_lm if kind == "lm" else common.load_score_model
    m = common.disable_dropout(load(path, tokenizer, args.seed, args.trust_remote_code, **kw))
    m.config.use_cache = False
    m.requires_grad_(trainable)
    return common.shard_model(m, device, mixed_precision=mixed_precision,
                              activation_checkpointing=args.activation_checkpointing and trainable,
                              compile=args.compile and trainable, offload=args.offload_frozen and not trainable,
                              store_bf16=not trainable)


def build_models(args, plan, tokenizers, device):
    """Block 1: the models of this mode (the docstring's table), None where the mode has none, all FSDP2-sharded.
    Built in this order, as the runs always were (load_score_model reseeds the global RNG from --seed)."""
    load = functools.partial(load_model, args, device, common.use_bf16(args.bf16, device))
    tok = tokenizers["actor"]
    return {"actor": load("lm", args.actor_model_name_or_path, True, tok),
            "ref": load("lm", args.actor_model_name_or_path, False, tok),
            "reward": load("score", args.reward_model_name_or_path, False, tokenizers.get("reward", tok)),
            "reward_critic": load("score", args.reward_critic_model_name_or_path, True, tok) if plan.critic else None,
            "cost": load("score", args.cost_model_name_or_path, False, tokenizers.get("cost", tok))
            if plan.use_cost else None,
            "cost_critic": load("score", args.cost_critic_model_name_or_path, True, tok,
                                cost_groups=plan.cost_groups or None)  # a grouped cost critic: one output per group
            if plan.cost_critic else None}


def score_scales(args, models):
    """(reward std, cost std) that R and C are divided by: the score models' training std with --normalize_*, else 1."""
    reward_std = getattr(models["reward"].config, "score_std", 1.0) if args.normalize_reward else 1.0
    cost_std = getattr(models["cost"].config, "score_std", 1.0) if args.normalize_cost and models["cost"] is not None else 1.0
    return reward_std, cost_std


def make_optimisers(args, plan, models):
    """AdamW per trained model (betas (0.9, 0.95): RLHF-DETAILS 18) and its lr schedule over all optimiser steps of
    the run: linear warmup, then constant or cosine (safe-rlhf: 3% warmup, cosine for the actor, constant for the
    critics); "constant" without warmup leaves every lr as set. -> ({name: optimiser}, {name: schedule})."""
    critic_wd = args.weight_decay if args.critic_weight_decay is None else args.critic_weight_decay
    opts = {"actor": common.adamw(models["actor"], args.actor_lr, args.weight_decay)}
    for name in ("reward_critic", "cost_critic"):
        if models[name] is not None:
            opts[name] = common.adamw(models[name], args.critic_lr, critic_wd)
    kinds = {"actor": args.lr_scheduler_type}
    scheds = {name: common.cosine_schedule(o, int(args.warmup_ratio * plan.optimiser_steps), plan.optimiser_steps,
                                           kind=kinds.get(name, args.critic_lr_scheduler_type or args.lr_scheduler_type))
              for name, o in opts.items()}
    return opts, scheds


def make_multiplier(args):
    """One Lagrange multiplier (gradient ascent on log λ, or PID) with this run's settings."""
    if args.lagrangian == "pid":
        return common.PIDLagrangian(args.lambda_init, args.pid_kp, args.pid_ki, args.pid_kd, args.lambda_max,
                                    args.lambda_update_delay_steps)
    return common.LagrangeMultiplier(args.lambda_init, args.lambda_lr, args.lambda_max, args.lambda_update_delay_steps)


@dataclass
class Duals:
    """The dual side of the Lagrangian (block 5): λ_k per constraint (K of them), the window of raw episode costs
    (of all ranks) that drives them, and this rank's λ after each update (every rank holds the same)."""
    multipliers: list
    window: collections.deque
    history: list = field(default_factory=list)


def make_duals(args, plan):
    return Duals([make_multiplier(args) for _ in plan.thresholds], collections.deque(maxlen=plan.cost_window))


def saved_form(plan, per_constraint):
    """A per-constraint list as lambda.json and checkpoints store it: the bare value for one overall cost (the format
    they have always had), the list for a grouped cost model (and for K = 0, empty)."""
    return per_constraint if plan.grouped or plan.K != 1 else per_constraint[0]


def save_checkpoint(args, plan, step, trained, scheds, duals, generators):
    """A resume checkpoint (README "Resuming and failures"): trained models and optimisers, λ, the cost window, the
    lr schedules, every rank's λ history and the generators. Collective: every rank calls it."""
    state = {**run_identity(args, plan), "lagrange": saved_form(plan, [m.state_dict() for m in duals.multipliers]),
             "cost_window": list(duals.window), "schedulers": {name: sc.state_dict() for name, sc in scheds.items()},
             "lambda_history": common.gather_objects([duals.history])}
    return common.save_checkpoint(args.output_dir, step, trained, state, generators, keep_last=args.keep_last)


def resume(plan, trained, scheds, duals, generators, rank):
    """Load plan.resume_from into the trained models, optimisers, schedules, duals and generators -> its step."""
    state = common.load_checkpoint(plan.resume_from, trained, generators)
    for mult, sd in zip(duals.multipliers, state["lagrange"] if plan.grouped else [state["lagrange"]]):
        mult.load_state_dict(sd)
    for name, sd in state.get("schedulers", {}).items():
        scheds[name].load_state_dict(sd)
    duals.window.extend(e if isinstance(e, list) else [e] for e in state["cost_window"])  # older runs: floats
    same_world = state["world_size"] == plan.world
    duals.history = list(state["lambda_history"][rank if same_world else 0])
    return state["step"]


# ----------------------------------------------------------------------------- one forward function per role
def sequence_inputs(prompt_ids, prompt_lens, responses, resp_lens):
    """Left-padded prompts [B, P] + right-padded responses [B, N] -> ids, attention mask, position ids [B, P+N]
    and the response mask [B, N]. Position ids follow the mask (RLHF-DETAILS 2)."""
    P, N = prompt_ids.shape[1], responses.shape[1]
    pmask = common.length_mask(prompt_lens, P, start=P - prompt_lens)
    rmask = common.length_mask(resp_lens, N)
    attn = torch.cat([pmask, rmask], 1).long()
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return torch.cat([prompt_ids, responses], 1), attn, pos, rmask


def response_logprobs(model, ids, attn, pos, P, temperature, entropy=False):
    """log π(y_j | x, y_<j) for every response token j, with logits divided by the sampling temperature
    (RLHF-DETAILS 9). Off-by-one (RLHF-DETAILS 12): the logits at position P−1+j score token P+j, so the slice
    [P−1 : −1] lines up with the response tokens ids[:, P:]. The rollout and the update both use this."""
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, P - 1:-1].float() / temperature
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, ids[:, P:, None]).squeeze(-1)
    if entropy:
        return logp, -(logp_all.exp() * logp_all).sum(-1)
    return logp


def critic_values(critic, ids, attn, pos, P, heads=False):
    """V(x, y_<j) for each response token j: the critic's score at the position that *emits* token j (P−1+j).
    heads: every output of a cost critic with one output per cost group, [B, T, K]."""
    values = critic(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, P - 1:-1]
    return values.float() if heads else values[..., 0].float()


def end_scores(model, ids, attn, pos, P, resp_lens, heads=False):
    """The score model's output at the last response token (its EOS), from the explicit length; heads: every output
    ([B, K], a cost model with one output per group)."""
    return common.end_scores(model(input_ids=ids, attention_mask=attn, position_ids=pos).logits, P + resp_lens - 1, heads)

# ----------------------------------------------------------------------------- 2-3. rollout and scores
@dataclass
class Rollout:
    """Blocks 1-2: this rank's responses, cut after their first EOS; tensors on the device."""
    seq: torch.Tensor  # [B, P+T] left-padded prompt + right-padded response ids
    attn: torch.Tensor  # [B, P+T] attention mask
    pos: torch.Tensor  # [B, P+T] position ids (follow the mask, RLHF-DETAILS 2)
    mask: torch.Tensor  # [B, T] response tokens
    lens: torch.Tensor  # [B] response lengths (the explicit EOS position + 1, or T if cut off)
    has_eos: torch.Tensor  # [B] bool
    P: int  # prompt width
    responses: torch.Tensor  # [B, T]
    prompt_texts: list  # the prompts, for a score model with another tokenizer (and the judge)


@dataclass
class Scores:
    """Block 3: everything the no-grad pass over a rollout gives (raw: no normalisation, no penalty)."""
    old_logp: torch.Tensor  # [B, T] the actor's log-probs at rollout time
    ref_logp: torch.Tensor  # [B, T] the reference's
    entropy: torch.Tensor  # () the actor's mean token entropy
    reward: torch.Tensor  # [B] R at the last response token
    cost: Optional[torch.Tensor] = None  # [B] C (grouped: the max over all the model's groups); None: no cost model
    cost_heads: Optional[torch.Tensor] = None  # [B, K] one cost per read group of a grouped cost model, else None
    reward_values: Optional[torch.Tensor] = None  # [B, T] the reward critic's values (None: no critic)
    cost_values: list = field(default_factory=list)  # one [B, T] per constraint from the cost critic ([]: none)

    @property
    def costs(self):
        """[B, K]: one raw cost per constraint (one overall cost: [B, 1])."""
        return self.cost_heads if self.cost_heads is not None else self.cost[:, None]

    def checked(self):
        """The scores a NaN/inf must stop the run at, by name."""
        named = {"reward": self.reward, "cost": self.cost, "old_logp": self.old_logp, "ref_logp": self.ref_logp}
        return {k: v for k, v in named.items() if v is not None}


@torch.no_grad()
def rollout(actor, prompts, tokenizer, args, device, generator, greedy=False):
    """Blocks 1-2: generate from this rank's prompts [(text, ids)], cut after EOS. -> Rollout."""
    ids, plens = common.pad([p[1] for p in prompts], tokenizer.pad_token_id, "left")
    ids, plens = ids.to(device), plens.to(device)
    n_new = args.max_new_tokens
    if args.max_length:  # safe-rlhf's max_length bounds the padded prompt + response; ranks must agree on the steps
        n_new = min(n_new, args.max_length - int(common.all_reduce(ids.shape[1], "max")))
    actor.eval()
    with common.gathered_for_generation(actor):  # one all-gather for the whole generation, not one per token
        resp, rlens, has_eos = common.sample_responses(actor, ids, plens, tokenizer.eos_token_id,
                                                       tokenizer.pad_token_id, n_new,
                                                       args.temperature, args.top_p, greedy, generator)
    actor.train()
    resp = resp[:, :int(rlens.max())]  # drop columns that are padding in every row
    seq, attn, pos, rmask = sequence_inputs(ids, plens, resp, rlens)
    return Rollout(seq, attn, pos, rmask, rlens, has_eos, ids.shape[1], resp, [p[0] for p in prompts])


def score_inputs(batch, tokenizer, score_tokenizer, chat_template, cut_as_ended=False):
    """What a score model reads -> (ids, attention mask, positions, P, response lengths). With the actor's tokenizer
    (score_tokenizer None): the rollout's own ids. With another tokenizer (a reward or cost model of another model
    family): a text round trip, as safe-rlhf does: each response is decoded and prompt + response are re-tokenised
    with the score model's tokenizer and template. Its EOS is appended only where the actor emitted one, so a
    cut-off response is scored as cut off; cut_as_ended (--score_cut_as_ended) appends one to every cut response
    instead, the position a score model was trained to read (README "Safe RLHF on SmolLM2": at 64 tokens the cost
    model's sign accuracy is 58.4% cut, 64.1% cut with the EOS, 63.9% on whole answers). Actor ids are never fed to
    a model that reads other ids."""
    if score_tokenizer is None:
        if cut_as_ended and not bool(batch.has_eos.all()):
            return with_eos_appended(batch, tokenizer)
        return batch.seq, batch.attn, batch.pos, batch.P, batch.lens
    texts = common.decode_responses(tokenizer, batch.responses, batch.lens, batch.has_eos)
    prompts, responses = [], []
    for p, r, eos in zip(batch.prompt_texts, texts, batch.has_eos.tolist()):
        p_ids, r_ids = common.score_model_text_ids(score_tokenizer, p, r, eos or cut_as_ended,
                                                   chat_template=chat_template)
        prompts.append(p_ids)
        responses.append(r_ids)
    dev = batch.seq.device
    pids, plens = common.pad(prompts, score_tokenizer.pad_token_id, "left")
    rids, rlens = common.pad(responses, score_tokenizer.pad_token_id)
    seq, attn, pos, _ = sequence_inputs(pids.to(dev), plens.to(dev), rids.to(dev), rlens.to(dev))
    return seq, attn, pos, pids.shape[1], rlens.to(dev)


def with_eos_appended(batch, tokenizer):
    """The rollout's ids with an EOS after every response that has none (one more column) -> score_inputs' tuple.
    Responses that ended keep their ids; only what the score models read changes, never the actor's tokens."""
    cut = ~batch.has_eos
    resp = torch.cat([batch.responses, batch.responses.new_full((len(cut), 1), tokenizer.pad_token_id)], 1)
    rows = cut.nonzero().squeeze(1)
    resp[rows, batch.lens[rows]] = tokenizer.eos_token_id
    lens = batch.lens + cut.long()
    seq, attn, pos, _ = sequence_inputs(batch.seq[:, :batch.P], batch.attn[:, :batch.P].sum(1), resp, lens)
    return seq, attn, pos, batch.P, lens


@torch.no_grad()
def score_rollout(batch, models, args, tokenizers, cost_heads=None, with_values=True):
    """Block 3: one batched no-grad pass per model -> Scores. tokenizers: {"actor": ..., "reward"/"cost": the score
    model's own tokenizer when it differs from the actor's, else absent}. cost_heads: the read heads of a grouped cost
    model (Plan.cost_heads; None: one overall cost). end_scores runs once per score model."""
    seq, attn, pos, P, mask = batch.seq, batch.attn, batch.pos, batch.P, batch.mask
    for name in ("actor", "ref"):
        models[name].eval()
    old_logp, ent = response_logprobs(models["actor"], seq, attn, pos, P, args.temperature, entropy=True)
    s = Scores(old_logp, response_logprobs(models["ref"], seq, attn, pos, P, args.temperature),
               common.masked_mean(ent, mask), reward=None)
    models["actor"].train()
    for name in ("reward", "cost"):
        if models.get(name) is not None:
            s_seq, s_attn, s_pos, s_P, s_lens = score_inputs(batch, tokenizers["actor"], tokenizers.get(name),
                                                             args.chat_template, args.score_cut_as_ended)
            grouped = name == "cost" and cost_heads is not None
            score = end_scores(models[name], s_seq, s_attn, s_pos, s_P, s_lens, heads=grouped)
            if grouped:  # one cost per constrained group [B, K]; the overall cost is the max over *all* the model's
                # groups (> 0: unsafe in any), so train/cost and the unsafe rates keep their meaning when
                # --constrain_groups constrains only some of them
                s.cost_heads, score = score[:, cost_heads], score.max(-1).values
            setattr(s, name, score)
    if with_values:
        s.reward_values = critic_values(models["reward_critic"], seq, attn, pos, P) * mask
        if models.get("cost_critic") is not None:  # a list: one [B, T] per constrained group (one cost: one)
            s.cost_values = [v * mask for v in cost_head_values(
                critic_values(models["cost_critic"], seq, attn, pos, P, heads=cost_heads is not None), cost_heads)]
    return s


def cost_head_values(values, cost_heads):
    """A cost critic's values -> one [B, T] per constrained group: [B, T, K] split by head, or [values] (one cost)."""
    return [values] if cost_heads is None else [values[..., h] for h in cost_heads]


# ----------------------------------------------------------------------------- 4-7. signals, λ, advantages, update
def per_token_signals(scores, batch, args, plan, reward_std=1.0, cost_std=1.0):
    """Block 4, every stream in one place: kl_t = logp_old − logp_ref (exactly 0 on padding), the reward stream
    r_t = −β·kl_t + [t=last]·R and one cost stream per constraint c_kt = +β·kl_t + [t=last]·C_k (paper eq. 10's
    R and C_k at the EOS; each c_k carries +β·kl so the KL weight of the mixed advantage stays exactly β).
    R = reward / reward_std, set to --missing_eos_penalty for a response without EOS (RLHF-DETAILS 3: its cost is
    kept), and R − ν·C under reward_shaping. -> (kl [B, T], R [B], r_t [B, T], [c_kt [B, T]] × K)."""
    mask, lens = batch.mask, batch.lens
    reward = scores.reward / reward_std
    cost = scores.cost / cost_std if scores.cost is not None else None
    if args.missing_eos_penalty is not None:
        reward = torch.where(~batch.has_eos, torch.full_like(reward, args.missing_eos_penalty), reward)
    if args.algo == "reward_shaping":
        reward = reward - args.shaping_coeff * cost
    kl = (scores.old_logp - scores.ref_logp) * mask
    rewards_t = per_token_signal(kl, reward, lens, mask, args.kl_coeff, -1.0, args.clip_range_score)
    costs_t = [per_token_signal(kl, c / cost_std, lens, mask, args.kl_coeff, +1.0, args.clip_range_score)
               for c in scores.costs.unbind(1)] if plan.K else []
    return kl, reward, rewards_t, costs_t


def update_lambda(duals, plan, scores):
    """Block 5: the multipliers, once per rollout batch, on every rank from the raw episode costs of all ranks
    (gathered: the same window and λ everywhere). -> (J_k, λ_k), lists of K floats ([] for K = 0)."""
    if not plan.K:
        return [], []
    duals.window.extend(common.gather_objects(scores.costs.tolist()))
    episode_costs, lams = update_multipliers(duals.multipliers, duals.window, plan.thresholds)
    duals.history.append(lams if plan.grouped else lams[0])
    return episode_costs, lams


def whiten(x, mask, eps=1e-8):
    mean = (x * mask).sum() / mask.sum()
    var = (((x - mean) * mask) ** 2).sum() / mask.sum()
    return (x - mean) * torch.rsqrt(var + eps) * mask


def compute_advantages(args, scores, rewards_t, costs_t, mask, lams):
    """Block 6: advantages per stream (GAE with the stream's critic, or group-relative without one), then the mixed
    advantage (A_r − Σ_k λ_k·A_ck)/(1 + Σ_k λ_k) (λ detached); grpo divides by the group std once, after mixing.
    -> (A [B, T], A_r, returns of the reward stream, returns of each cost stream (None without a critic))."""
    adv_r, ret_r = stream_advantages(rewards_t, scores.reward_values, mask, args)
    ret_c = ()
    if costs_t:  # one stream per constraint
        adv_c, ret_c = zip(*[stream_advantages(c_t, v, mask, args)
                             for c_t, v in zip(costs_t, scores.cost_values or [None] * len(costs_t))])
        if args.whiten_advantages:  # each stream by itself (safe-rlhf: off)
            adv_r, adv_c = whiten(adv_r, mask), [whiten(a, mask) for a in adv_c]
        advantages = mixed_advantage(adv_r, list(adv_c), lams)
    else:
        advantages = whiten(adv_r, mask) if args.whiten_advantages else adv_r
    return grpo_scale(advantages, mask, args), adv_r, ret_r, ret_c  # grpo_scale: unchanged for gae/rloo


def ppo_update(args, plan, models, opts, scheds, batch, scores, advantages, returns, ptx, ptx_gen, pad_id, step):
    """Block 7: ppo_epochs passes over the rollout batch, in minibatches of per_device_train_batch_size (one optimiser
    step each) of gradient_accumulation_steps micro-batches. returns: (reward returns, [cost returns]).
    -> {metric: [one value per micro-batch or optimiser step]}."""
    stats = collections.defaultdict(list)
    N, mb, acc = plan.responses_per_rank, args.per_device_train_batch_size, args.gradient_accumulation_steps
    for ppo_epoch in range(args.ppo_epochs):
        # The first epoch keeps the rollout order; later epochs are shuffled with ptx_gen, the same generator that
        # draws the PTX rows of each micro-batch (micro_batch_backward): so turning PTX on changes the order of every
        # epoch after the first. Kept as it is: a separate generator would change every existing run's numbers.
        order = torch.randperm(N, generator=ptx_gen) if ppo_epoch else torch.arange(N)
        for m0 in range(0, N, mb):
            mb_idx = order[m0:m0 + mb]
            for name in opts:
                opts[name].zero_grad(set_to_none=True)
            for k in range(acc):
                j = mb_idx[k::acc].to(batch.seq.device)
                for name in opts:  # FSDP reduces the gradients once, at the last micro-batch
                    models[name].set_requires_gradient_sync(k == acc - 1)
                micro_batch_backward(args, plan, models, batch, scores, advantages, returns, j, ptx, ptx_gen, pad_id,
                                     stats)
            optimiser_step(args, models, opts, scheds, stats, step)
    return stats


def micro_batch_backward(args, plan, models, batch, s, advantages, returns, j, ptx, ptx_gen, pad_id, stats):
    """The losses of one micro-batch (rows j), each backward()ed as soon as it is computed, in this order: the actor's
    clipped surrogate (+ ptx_coeff·PTX loss), the reward critic's clipped value loss, the cost critic's (the mean over
    its constraints). Each is divided by gradient_accumulation_steps."""
    acc = args.gradient_accumulation_steps
    ids, attn, pos, msk, P = batch.seq[j], batch.attn[j], batch.pos[j], batch.mask[j], batch.P
    logp = response_logprobs(models["actor"], ids, attn, pos, P, args.temperature)
    ratio = torch.exp(logp - s.old_logp[j])
    a_loss = actor_loss(logp, s.old_logp[j], advantages[j], msk, args.clip_ratio)
    loss = a_loss
    if ptx:  # PTX (InstructGPT eq. 2): language-model loss on SFT rows, same optimiser step
        pick = torch.randint(len(ptx), (len(j),), generator=ptx_gen).tolist()
        pids, ptgt = common.sft_batch([ptx[i] for i in pick], pad_id, False, ids.device)
        nll_sum, n_tok = common.lm_nll(models["actor"], pids, ptgt)
        ptx_loss = nll_sum / n_tok.clamp(min=1)
        loss = loss + args.ptx_coeff * ptx_loss
        stats["train/ptx_loss"].append(ptx_loss.item())
    (loss / acc).backward()
    ret_r, ret_c = returns
    if models["reward_critic"] is not None:
        vr = critic_values(models["reward_critic"], ids, attn, pos, P)
        r_loss = critic_loss(vr, s.reward_values[j], ret_r[j], msk, args.clip_range_value)
        (r_loss / acc).backward()
        stats["train/reward_critic_loss"].append(r_loss.item())
    if models["cost_critic"] is not None:
        vc = cost_head_values(critic_values(models["cost_critic"], ids, attn, pos, P, heads=plan.grouped), plan.cost_heads)
        c_loss = torch.stack([critic_loss(v, old[j], ret[j], msk, args.clip_range_value)  # mean over groups
                              for v, old, ret in zip(vc, s.cost_values, ret_c)]).mean()
        (c_loss / acc).backward()
        stats["train/cost_critic_loss"].append(c_loss.item())
    with torch.no_grad():
        stats["train/actor_loss"].append(a_loss.item())
        stats["train/approx_kl"].append(common.masked_mean(0.5 * (logp - s.old_logp[j]) ** 2, msk).item())
        stats["train/clip_fraction"].append(common.masked_mean(((ratio - 1).abs() > args.clip_ratio).float(), msk).item())
        stats["train/ratio_max_deviation"].append(((ratio - 1).abs() * msk).max().item())


def optimiser_step(args, models, opts, scheds, stats, step):
    """Clip each trained model's gradient norm, stop on a NaN/inf norm before any model is updated, then step every
    optimiser and its lr schedule."""
    norms = {}
    for name in opts:
        gn = torch.nn.utils.clip_grad_norm_(models[name].parameters(), args.max_grad_norm)
        norms[name] = (gn.full_tensor() if hasattr(gn, "full_tensor") else gn).item()
        stats[f"train/{name}_grad_norm"].append(norms[name])
    # a NaN/inf anywhere (a loss gives NaN gradients) stops before any model is updated
    common.check_finite({f"{k} gradient norm": v for k, v in norms.items()}, f"rollout {step + 1}",
                        same_on_all_ranks=True)  # clipped FSDP norms are global
    for name, opt in opts.items():
        opt.step()
        scheds[name].step()

# ----------------------------------------------------------------------------- 8. log, evaluate, save
def masked_sum_mean(x, mask):
    return ((x * mask).sum(-1)).mean()


def explained_variance(values, returns, mask):
    v, r = values[mask.bool()], returns[mask.bool()]
    return (1 - (r - v).var() / r.var().clamp(min=1e-8)).item() if r.numel() > 1 else 0.0


def rollout_metrics(args, plan, data, batch, s, signals, adv, stats, scheds, duals_now):
    """One metrics.jsonl row for this rollout (safe-rlhf's metric names), averaged over ranks (maxima: the max).
    signals: (kl, R, r_t) of per_token_signals; adv: (A_r, reward returns) of compute_advantages; duals_now: (J_k, λ_k)
    of update_lambda. Collective: every rank calls it."""
    (kl, reward, rewards_t), (adv_r, ret_r), (episode_costs, lams) = signals, adv, duals_now
    mask, lens = batch.mask, batch.lens
    m = {"train/reward": s.reward.mean().item(), "train/reward_with_kl_penalty": masked_sum_mean(rewards_t, mask).item(),
         "train/kl_divergence": masked_sum_mean(kl, mask).item(), "train/entropy": s.entropy.item(),
         "train/mean_generated_length": lens.float().mean().item(), "train/eos_fraction": batch.has_eos.float().mean().item(),
         "train/reward_advantage": common.masked_mean(adv_r, mask).item(),
         **({"train/reward_return": common.masked_mean(ret_r, mask).item(),
             "train/reward_value_explained_variance": explained_variance(s.reward_values, ret_r, mask)}
            if plan.critic else {}),
         **{k: sum(v) / len(v) for k, v in stats.items() if k != "train/ratio_max_deviation"}}
    if args.algo == "reward_shaping":
        m["train/shaped_reward"] = reward.mean().item()  # R − ν·C, the score the reward stream used
    if s.cost is not None:
        m["train/cost"] = s.cost.mean().item()
        m["train/unsafe_rate"] = (s.cost > 0).float().mean().item()
    for k, n in enumerate(plan.cost_names if s.cost_heads is not None else []):
        m[f"train/cost/{n}"] = s.cost_heads[:, k].mean().item()
        m[f"train/unsafe_rate/{n}"] = (s.cost_heads[:, k] > 0).float().mean().item()
    keys = list(m)  # one all-reduce for every metric, not one per metric
    m = dict(zip(keys, (common.all_reduce(torch.tensor([m[k] for k in keys])) / plan.world).tolist()))
    m["train/max_generated_length"] = common.all_reduce(lens.max().item(), "max")
    m["train/ratio_max_deviation_first"] = common.all_reduce(stats["train/ratio_max_deviation"][0], "max")
    m.update({f"train/{name.split('_')[-1]}_lr": sc.get_last_lr()[0] for name, sc in scheds.items()})  # actor, critic
    for k, x in enumerate(([f"/{n}" for n in plan.cost_names] if plan.grouped else [""]) if plan.K else []):
        m.update({f"train/episode_cost{x}": episode_costs[k], f"train/lambda{x}": lams[k],  # one cost: train/lambda
                  f"train/threshold{x}": plan.thresholds[k]})  # groups: train/lambda/<name>
    if data.judge:  # the exact judge on this rollout (cheap string rules; tiny task only)
        m.update(judge_rollout_metrics(data, batch))
    return m


def judge_rollout_metrics(data, batch):
    texts = common.decode_responses(data.tokenizer, batch.responses, batch.lens, batch.has_eos)
    rep = data.judge.report(common.gather_objects(batch.prompt_texts), common.gather_objects(texts),
                              data.judge_groups)
    return {"train/judge_unsafe_rate_harmful": rep["judge/unsafe_rate_harmful"],
            "train/judge_helpful_benign": rep["judge/helpful_benign"],
            **{f"train/judge_unsafe_rate/{n}": rep[f"judge/unsafe_rate/{n}"] for n, _ in data.judge_groups or []}}


def progress_postfix(m, lams):
    return {"R": f"{m['train/reward']:.2f}", **({"C": f"{m['train/cost']:.2f}"} if "train/cost" in m else {}),
            **({"lam": ",".join(f"{x:.2f}" for x in lams)} if lams else {})}


def evaluate_heldout(args, plan, data, models, logger, device, rank, step):
    """Held-out prompts, sampled with a fixed seed: model-estimated reward/cost and the exact judge, logged at `step`.
    Collective: every rank calls it."""
    if not data.eval_ids:
        return {}
    B, world = plan.per_device_prompt_batch_size, plan.world
    mine = (list(data.eval_ids) * args.eval_samples_per_prompt)[rank::world]
    g = torch.Generator(device=device).manual_seed(10_000 + rank)
    texts, rewards, costs, heads = [], [], [], []
    for i in range(0, int(common.all_reduce(len(mine), "max")), B):
        chunk = mine[i:i + B] or mine[:1]
        real = len(mine[i:i + B])
        b = rollout(models["actor"], [(p, data.eval_ids[p]) for p in chunk], data.tokenizer, args, device, g)
        s = score_rollout(b, models, args, data.tokenizers, plan.cost_heads, with_values=False)
        rewards += s.reward[:real].tolist()
        costs += s.cost[:real].tolist() if s.cost is not None else []
        heads += s.cost_heads[:real].tolist() if s.cost_heads is not None else []
        texts += common.decode_responses(data.tokenizer, b.responses, b.lens, b.has_eos, real)
    allp, allt = common.gather_objects(mine), common.gather_objects(texts)
    rewards, costs, heads = common.gather_objects(rewards), common.gather_objects(costs), common.gather_objects(heads)
    out = {"eval/reward": sum(rewards) / len(rewards)}
    if costs:
        out["eval/cost"] = sum(costs) / len(costs)
        out["eval/unsafe_rate"] = sum(c > 0 for c in costs) / len(costs)
    for k, n in enumerate(plan.cost_names if heads else []):  # the cost model's unsafe rate per group, over all answers
        out[f"eval/unsafe_rate/{n}"] = sum(h[k] > 0 for h in heads) / len(heads)
    if data.judge:
        out.update({k.replace("judge/", "eval/judge_"): v
                    for k, v in data.judge.report(allp, allt, data.judge_groups).items()})
    logger.log(step, out)
    return out


def save_final(args, plan, models, duals, tokenizer):
    """The end of training: lambda.json (λ, its state, the cost window, every rank's λ history), then the critics
    and the actor as HF folders (the actor's config.json last: the folder is complete). Collective."""
    per_rank = common.gather_objects([duals.history])  # one list per rank
    if common.is_rank0():
        with open(os.path.join(args.output_dir, "lambda.json"), "w") as f:
            json.dump({"lagrangian": args.lagrangian,
                       "state": saved_form(plan, [mult.state_dict() for mult in duals.multipliers]),
                       "value": saved_form(plan, [mult.value for mult in duals.multipliers]),
                       "episode_cost_window": list(duals.window), "per_rank_history": per_rank,
                       **({"groups": plan.cost_names, "thresholds": plan.thresholds} if plan.grouped else {})}, f)
    if args.save_model:
        for name in ("reward_critic", "cost_critic"):
            if models[name] is not None:
                common.save_hf(models[name], None, os.path.join(args.output_dir, "critics", name))
        common.save_hf(models["actor"], tokenizer, args.output_dir)
        common.print0(f"[{args.algo}] saved {args.output_dir}")


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    rank, world, device = common.setup_distributed()
    torch.manual_seed(args.seed)
    # 0. plan the run: data, constraints, batch arithmetic, every check (RLHF-DETAILS 17); no weights yet
    plan, data = plan_run(args, world)
    B, G, total = plan.per_device_prompt_batch_size, plan.samples_per_prompt, plan.total_steps
    # 1. the models of this mode, their optimisers and schedules, the multipliers, the generators, a resume
    models = build_models(args, plan, data.tokenizers, device)
    reward_std, cost_std = score_scales(args, models)
    opts, scheds = make_optimisers(args, plan, models)
    duals = make_duals(args, plan)  # λ_k, one per constraint, and the window of raw episode costs
    gen = torch.Generator(device=device).manual_seed(args.seed + rank)  # sampling: seed + rank (STYLE 5)
    ptx_gen = torch.Generator().manual_seed(args.seed)  # PTX rows, and the minibatch order of later epochs
    trained = {name: (models[name], opts[name]) for name in opts}  # what a resume checkpoint holds (frozen: reloaded)
    generators = {"sampling": gen, "ptx": ptx_gen}
    start = resume(plan, trained, scheds, duals, generators, rank) if plan.resume_from else 0
    common.prepare_output_dir(args.output_dir, resume_step=start if plan.resume_from else None)  # the only step that clears the folder
    logger = common.MetricsLogger(args.output_dir, asdict(args), args.wandb_project, args.run_name,
                                  resume_step=start if plan.resume_from else None)
    write_plan(args.output_dir, plan)  # beside args.json: every value derived from the flags
    stop = common.StopOnSignal()
    timer = common.StepTimer(args.output_dir, device, resume=bool(plan.resume_from))  # timings.jsonl (bench/ reads it)
    if not plan.resume_from:  # the SFT policy on the held-out prompts: the baseline of every later evaluation
        evaluate_heldout(args, plan, data, models, logger, device, rank, 0)
    bar = common.progress(total=total, initial=start, desc=args.algo)
    for step in range(start, total):
        # ---- 1-2. generate and cut after EOS; G responses per prompt, consecutive: a group stays on this rank
        idx = common.batch_indices(plan.n_prompts, B * world, rank, world, args.seed, step, plan.steps_per_epoch)
        idx = [i for i in idx for _ in range(G)]
        batch = rollout(models["actor"], [data.prompts[i] for i in idx], data.tokenizer, args, device, gen)
        timer.lap("generate")
        # ---- 3. score: one batched no-grad pass per model
        s = score_rollout(batch, models, args, data.tokenizers, plan.cost_heads, with_values=plan.critic)
        common.check_finite(s.checked(), f"rollout {step + 1}")
        timer.lap("score")
        # ---- 4. per-token signals: r_t and every c_t
        kl, reward, rewards_t, costs_t = per_token_signals(s, batch, args, plan, reward_std, cost_std)
        timer.lap("signals")
        # ---- 5. the multipliers, once per rollout batch, on every rank (K = 0: none)
        episode_costs, lams = update_lambda(duals, plan, s)
        timer.lap("lambda")
        # ---- 6. advantages per stream, then the mixed advantage
        advantages, adv_r, ret_r, ret_c = compute_advantages(args, s, rewards_t, costs_t, batch.mask, lams)
        timer.lap("advantages")
        # ---- 7. PPO update: epochs over minibatches, one optimiser step each
        stats = ppo_update(args, plan, models, opts, scheds, batch, s, advantages, (ret_r, ret_c), data.ptx, ptx_gen,
                           data.tokenizer.pad_token_id, step)
        timer.lap("update")
        step += 1
        bar.update(1)
        # ---- 8. log (averaged over ranks), evaluate, checkpoint
        if step % args.log_every == 0 or step == total:
            m = rollout_metrics(args, plan, data, batch, s, (kl, reward, rewards_t), (adv_r, ret_r), stats, scheds,
                                (episode_costs, lams))
            logger.log(step, m, echo=False)
            bar.set_postfix(**progress_postfix(m, lams))
        if args.eval_every and step % args.eval_every == 0 and step < total:
            evaluate_heldout(args, plan, data, models, logger, device, rank, step)
        # a resume checkpoint after everything of this step is logged (never at the end: the HF folder is saved)
        save = functools.partial(save_checkpoint, args, plan, step, trained, scheds, duals, generators)
        saved = save() if args.save_every and step % args.save_every == 0 and step < total else None
        if stop.requested():
            common.StopOnSignal.exit(saved or save())
        generated, sequence = common.all_reduce(torch.tensor([batch.lens.sum().item(), batch.attn.sum().item()])).tolist()
        timer.step(step, **{"tokens/generated": generated, "tokens/sequence": sequence})
    bar.close()
    timer.close({name: (m, opts.get(name)) for name, m in models.items() if m is not None})
    # save first (the actor as an HF folder, the critics, λ), then the final held-out evaluation: a kill during the
    # evaluation never loses the trained policy, and from the save on SIGTERM ends the process at once
    save_final(args, plan, models, duals, data.tokenizer)
    stop.release()
    final = evaluate_heldout(args, plan, data, models, logger, device, rank, step)
    if data.judge and final:
        common.print0(f"[{args.algo}] held-out: reward {final['eval/reward']:.3f}, exact-judge unsafe rate on harmful "
                      f"prompts {final['eval/judge_unsafe_rate_harmful']:.1%}, helpfulness on benign "
                      f"{final['eval/judge_helpful_benign']:.2f}/4")
    logger.close()
    common.cleanup_distributed()


if __name__ == "__main__":
    common.entrypoint(main)
