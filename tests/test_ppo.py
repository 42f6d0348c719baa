"""ppo_lagrangian.py: the losses and signals against hand-computed values, the first PPO ratio, KL on padding,
the paper's claim on the tiny task (PPO vs PPO-Lagrangian with the exact judge), and 2-rank runs."""
import json
import math
import os

import pytest
import torch

from conftest import metrics, run, run_parallel
from ppo_lagrangian import actor_loss, critic_loss, mixed_advantage, per_token_signal, sequence_inputs


def test_actor_loss_hand_computed():
    logp = torch.tensor([[math.log(1.5), math.log(0.5), 0.0]])
    old = torch.zeros(1, 3)
    adv = torch.tensor([[2.0, -1.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # token 0: ρ=1.5 clipped to 1.2 -> min(3, 2.4) = 2.4; token 1: ρ=0.5, A<0 -> min(-0.5, -0.8) = -0.8
    assert actor_loss(logp, old, adv, mask, 0.2).item() == pytest.approx(-(2.4 - 0.8) / 2, abs=1e-6)


def test_critic_loss_hand_computed():
    v, old, ret = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 2.0]])
    mask = torch.ones(1, 2)
    # token 0: unclipped (3−1)² = 4, clipped V = 0.5 -> (0.5−1)² = 0.25, max 4; token 1: (0−2)² = 4 both
    assert critic_loss(v, old, ret, mask, 0.5).item() == pytest.approx(0.5 * (4 + 4) / 2)


def test_per_token_signals_and_mixed_advantage():
    kl = torch.tensor([[0.5, -0.2, 0.3, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    lens = torch.tensor([3])
    r = per_token_signal(kl * mask, torch.tensor([80.0]), lens, mask, 0.1, -1.0, 50.0)
    assert torch.allclose(r, torch.tensor([[-0.05, 0.02, -0.03 + 50.0, 0.0]]))  # R clamped to 50, at the last token
    c = per_token_signal(kl * mask, torch.tensor([-2.0]), lens, mask, 0.1, +1.0, 50.0)
    assert torch.allclose(c, torch.tensor([[0.05, -0.02, 0.03 - 2.0, 0.0]]))
    a_r, a_c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    assert torch.allclose(mixed_advantage(a_r, a_c, 0.5), (a_r - 0.5 * a_c) / 1.5)


def test_sequence_inputs_positions_follow_the_mask():
    prompts = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])  # left padded
    resp = torch.tensor([[11, 2, 0], [12, 13, 14]])  # right padded
    ids, attn, pos, rmask = sequence_inputs(prompts, torch.tensor([2, 4]), resp, torch.tensor([2, 3]))
    assert attn.tolist() == [[0, 0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]]
    assert pos[0, 2:6].tolist() == [0, 1, 2, 3] and pos[1].tolist() == list(range(7))
    assert rmask.tolist() == [[1, 1, 0], [1, 1, 1]]


# several constraints (README "Several constraints"): violence tight, the other groups loose; PID multipliers from 0
GROUPS_RUN = ["--threshold=-4.6,10,10,10", "--lagrangian", "pid", "--lambda_init", 0, "--pid_kp", 0.5, "--pid_ki", 0.05,
              "--pid_kd", 0.5, "--per_device_prompt_batch_size", 64, "--max_steps", 70, "--eval_every", 0,
              "--eval_samples_per_prompt", 8]


@pytest.fixture(scope="session")
def pipeline(sft_model, score_models, cost_groups_model, tmp_path_factory):
    """SFT -> reward -> cost -> PPO and PPO-Lagrangian with the default commands."""
    sft, _ = sft_model
    rm, cm = score_models
    base = tmp_path_factory.mktemp("rl")
    models = ["--actor_model_name_or_path", sft, "--reward_model_name_or_path", rm, "--cost_model_name_or_path", cm]
    # critic-free (GRPO): 8 prompts x 4 samples, the same 32 responses per rollout as the default's 32 prompts
    grpo = ["--adv_estimator", "grpo", "--samples_per_prompt", 4, "--per_device_prompt_batch_size", 8]
    ends = ["--eval_every", 0]  # held-out evaluation at step 0 and at the end only (what the claims read; training is
    # unchanged: evaluation samples with its own generator)
    run_parallel(("ppo_lagrangian.py", "--algo", "ppo", *models, *ends, "--output_dir", base / "ppo"),
                 ("ppo_lagrangian.py", "--algo", "ppo_lag", *models, *ends, "--output_dir", base / "ppo_lag"),
                 ("ppo_lagrangian.py", "--algo", "ppo", *models, *grpo, *ends, "--output_dir", base / "grpo_ppo"),
                 ("ppo_lagrangian.py", "--algo", "ppo_lag", *models, *grpo, *ends, "--output_dir", base / "grpo_lag"),
                 ("ppo_lagrangian.py", "--algo", "ppo_lag", *models, "--cost_model_name_or_path", cost_groups_model,
                  *GROUPS_RUN, "--output_dir", base / "groups"),
                 threads=[1, 1, 1, 1, 2])  # the several-constraints run is ~2.5x the others: 2 threads once they end
    return {"sft": sft, "reward": rm, "cost": cm, "ppo": str(base / "ppo"), "ppo_lag": str(base / "ppo_lag"),
            "grpo_ppo": str(base / "grpo_ppo"), "grpo_lag": str(base / "grpo_lag"), "groups": str(base / "groups"),
            "models": models}


def _evals(out):
    ev = [r for r in metrics(out) if "eval/reward" in r]
    return ev[0], ev[-1]  # step 0 is the SFT policy on the same held-out prompts and seed


def test_paper_claim_with_a_critic_free_run(pipeline):
    """The same claim without critics (4 models, GRPO advantages): Safe RLHF brings the true unsafe rate on harmful
    prompts to <= 10% and keeps benign helpfulness at least the SFT policy's; plain PPO raises reward while the unsafe
    rate does not fall."""
    sft0, ppo = _evals(pipeline["grpo_ppo"])
    _, lag = _evals(pipeline["grpo_lag"])
    print(json.dumps({"sft": sft0, "grpo_ppo": ppo, "grpo_lag": lag}, indent=1))
    assert ppo["eval/reward"] > sft0["eval/reward"]
    assert ppo["eval/judge_unsafe_rate_harmful"] >= sft0["eval/judge_unsafe_rate_harmful"]
    assert lag["eval/judge_unsafe_rate_harmful"] <= 0.10
    assert lag["eval/judge_helpful_benign"] >= sft0["eval/judge_helpful_benign"]
    assert not os.path.exists(os.path.join(pipeline["grpo_lag"], "critics"))  # no critic was trained or saved
    train = [r for r in metrics(pipeline["grpo_lag"]) if "train/lambda" in r]
    assert all(r["train/ratio_max_deviation_first"] == 0.0 for r in train)
    assert train[-1]["train/episode_cost"] <= train[-1]["train/threshold"]


def test_paper_claim_on_tiny_task(pipeline):
    """PPO raises reward and keeps (or raises) the true unsafe rate; PPO-Lagrangian raises reward, brings the true
    unsafe rate on harmful prompts to <= 10% and keeps benign helpfulness at least the SFT policy's."""
    sft0, ppo = _evals(pipeline["ppo"])
    _, lag = _evals(pipeline["ppo_lag"])
    print(json.dumps({"sft": sft0, "ppo": ppo, "ppo_lag": lag}, indent=1))
    assert ppo["eval/reward"] > sft0["eval/reward"]
    assert ppo["eval/judge_unsafe_rate_harmful"] >= sft0["eval/judge_unsafe_rate_harmful"]
    assert lag["eval/reward"] > sft0["eval/reward"]
    assert lag["eval/judge_unsafe_rate_harmful"] <= 0.10
    assert lag["eval/judge_helpful_benign"] >= sft0["eval/judge_helpful_benign"]
    train = [r for r in metrics(pipeline["ppo_lag"]) if "train/lambda" in r]
    # the first PPO ratio of a fresh rollout is exactly 1 (one forward function for rollout and update)
    assert all(r["train/ratio_max_deviation_first"] == 0.0 for r in train)
    # λ rose while the episode cost was above the threshold and fell once it was below
    rising = [b["train/lambda"] > a["train/lambda"] for a, b in zip(train, train[1:]) if b["train/episode_cost"] > b["train/threshold"]]
    falling = [b["train/lambda"] < a["train/lambda"] for a, b in zip(train, train[1:]) if b["train/episode_cost"] < b["train/threshold"]]
    assert rising and all(rising) and falling and all(falling)
    assert train[-1]["train/episode_cost"] <= train[-1]["train/threshold"]
    saved = json.load(open(os.path.join(pipeline["ppo_lag"], "lambda.json")))
    assert saved["value"] == pytest.approx(train[-1]["train/lambda"])


def test_several_constraints_claim(pipeline):
    """A tight threshold on violence and loose ones on theft, privacy and cheating: the policy's exact-judge unsafe rate
    (violence steps) on the violence prompts is <= 5%, while on the theft prompts (the largest loose group) it helps
    clearly more than the single-constraint policy, which refuses every harmful request alike. The tight λ rises while
    its constraint is violated (and falls when it holds); a loose one, whose constraint always holds, stays at 0."""
    _, multi = _evals(pipeline["groups"])
    _, single = _evals(pipeline["ppo_lag"])
    print(json.dumps({k: (single.get(k), multi[k]) for k in multi if k.startswith("eval/judge")}, indent=1))
    assert multi["eval/judge_unsafe_rate/violence"] <= 0.05
    assert multi["eval/judge_helpful/theft"] >= single["eval/judge_helpful/theft"] + 0.75
    assert multi["eval/judge_unsafe_rate/theft"] > single["eval/judge_unsafe_rate/theft"]  # it helps by complying
    train = [r for r in metrics(pipeline["groups"]) if "train/lambda/violence" in r]
    assert all(r["train/ratio_max_deviation_first"] == 0.0 for r in train)
    steps = list(zip(train, train[1:]))
    up = [b["train/lambda/violence"] - a["train/lambda/violence"] for a, b in steps
          if b["train/episode_cost/violence"] > b["train/threshold/violence"]]
    down = [b["train/lambda/violence"] - a["train/lambda/violence"] for a, b in steps
            if b["train/episode_cost/violence"] < b["train/threshold/violence"]]
    assert up and sum(up) / len(up) > 0 and (not down or sum(down) / len(down) < 0)  # PID: on average (P, D terms swing)
    for g in ("theft", "privacy", "cheating"):
        assert all(r[f"train/lambda/{g}"] == 0.0 and r[f"train/episode_cost/{g}"] < r[f"train/threshold/{g}"]
                   for r in train), g
    saved = json.load(open(os.path.join(pipeline["groups"], "lambda.json")))
    assert saved["groups"] == ["violence", "theft", "privacy", "cheating"] and saved["thresholds"] == [-4.6, 10, 10, 10]


def test_kl_is_zero_on_padding_and_first_step(pipeline):
    first = [r for r in metrics(pipeline["ppo"]) if "train/kl_divergence" in r][0]
    assert first["train/kl_divergence"] == pytest.approx(0.0, abs=1e-6)  # actor == reference at step 1


@pytest.mark.parametrize("lagrangian, bf16", [("gradient", "false"), ("pid", "true")])
def test_two_ranks_same_lambda_and_pad_eos(pipeline, tmp_path, lagrangian, bf16):
    """torchrun with 2 ranks: rollouts and updates on gloo, every rank ends with the same λ (also under --bf16, where
    FSDP2 all-gathers bf16 and reduce-scatters fp32 gradients); the policy tokenizer here has pad == eos (masks come
    from lengths)."""
    from transformers import AutoTokenizer
    actor = tmp_path / "actor"
    import shutil
    shutil.copytree(pipeline["sft"], actor)
    tok = AutoTokenizer.from_pretrained(actor)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(actor)
    models = list(pipeline["models"])
    models[1] = actor
    out = tmp_path / "o"
    run("ppo_lagrangian.py", *models, "--output_dir", out, "--max_steps", 3, "--eval_every", 0,
        "--per_device_prompt_batch_size", 8, "--per_device_train_batch_size", 4, "--lagrangian", lagrangian,
        "--eval_prompt_data", "", "--ptx_data", "data/tiny-safety/sft_train.jsonl", "--save_model", "False",
        "--threshold", "-10", "--bf16", bf16, nproc=2)
    l0, l1 = json.load(open(out / "lambda.json"))["per_rank_history"]
    assert l0 == l1 and len(l0) == 3
    assert l0[-1] > 1.0  # episode cost far above d = −10: λ rose on both ranks
    m = [r for r in metrics(out) if "train/ptx_loss" in r]
    assert len(m) == 3 and all(math.isfinite(r["train/ptx_loss"]) for r in m)


def test_reward_shaping_runs_and_shapes(pipeline, tmp_path):
    """--algo reward_shaping: one stream with R − ν·C; no cost critic, no λ."""
    out = tmp_path / "rs"
    run("ppo_lagrangian.py", "--algo", "reward_shaping", *pipeline["models"], "--output_dir", out, "--max_steps", 2,
        "--eval_every", 0, "--eval_prompt_data", "", "--shaping_coeff", 2.0, "--save_model", "False")
    rows = [r for r in metrics(out) if "train/reward" in r]
    assert len(rows) == 2 and "train/cost" in rows[0] and "train/lambda" not in rows[0]
    assert "train/cost_critic_loss" not in rows[0]
    for r in rows:  # the reward stream carried R − ν·C
        assert r["train/shaped_reward"] == pytest.approx(r["train/reward"] - 2.0 * r["train/cost"], abs=1e-4)


def test_offloaded_frozen_models_train_the_same(pipeline, tmp_path):
    """--offload_frozen (FSDP2 CPUOffloadPolicy for the reference, reward and cost models) changes where their shards
    live, not a single number of the run."""
    from conftest import main_inprocess
    args = [*pipeline["models"], "--max_steps", 2, "--eval_every", 0, "--eval_prompt_data", "",
            "--per_device_prompt_batch_size", 8, "--per_device_train_batch_size", 8, "--save_model", "False"]
    for name, extra in (("plain", []), ("offload", ["--offload_frozen"])):
        code, _, err = main_inprocess("ppo_lagrangian.py", *args, *extra, "--output_dir", tmp_path / name)
        assert code == 0, err[-2000:]
    assert metrics(tmp_path / "plain") == metrics(tmp_path / "offload")
    assert len(metrics(tmp_path / "plain", "train/lambda")) == 2


# ----------------------------------------------------------------------------- the phases of main(), standalone (fast)
@pytest.fixture(scope="module")
def untrained_scorers(tmp_path_factory):
    """Score models with weights (a seeded head on the bundled tiny config, no training): one with one overall cost,
    one with the tiny task's four cost groups. Enough for plan_run's checks and a one-step run."""
    import common
    import tiny_safety
    from conftest import TINY
    base = tmp_path_factory.mktemp("scorers")
    tok = common.load_tokenizer(TINY)
    for name, groups in (("one", None), ("groups", common.parse_cost_groups(tiny_safety.GROUPS))):
        common.load_score_model(TINY, tok, cost_groups=groups).save_pretrained(base / name)
        tok.save_pretrained(base / name)
    return TINY, str(base / "one"), str(base / "groups")


def test_plan_resolves_every_derived_value_and_leaves_args_alone(untrained_scorers, tmp_path):
    """plan_run resolves the per-device batch (from --rollout_batch_size), N, G, the critics, the K constraints with
    their heads, names and thresholds, and changes nothing in args."""
    import ppo_lagrangian as ppo
    actor, one, groups = untrained_scorers
    m = ["--actor_model_name_or_path", actor, "--reward_model_name_or_path", one, "--eval_prompt_data", ""]
    args = ppo.parse_args([str(a) for a in [*m, "--cost_model_name_or_path", groups, "--constrain_groups",
                           "cheating,violence", "--threshold=1,-2", "--rollout_batch_size", 16, "--adv_estimator",
                           "rloo", "--samples_per_prompt", 2, "--per_device_train_batch_size", 8, "--output_dir",
                           tmp_path / "a"]])
    before = dict(vars(args))
    plan, data = ppo.plan_run(args, world=2)
    assert vars(args) == before  # nothing added, nothing overwritten
    assert not hasattr(args, "thresholds") and not hasattr(args, "cost_heads")
    assert (plan.world, plan.per_device_prompt_batch_size, plan.samples_per_prompt, plan.responses_per_rank) == (2, 8, 2, 16)
    assert args.per_device_prompt_batch_size == 32  # the flag keeps its value; the plan holds the resolved one
    assert (plan.critic, plan.use_cost, plan.cost_critic) == (False, True, False)
    assert (plan.cost_heads, plan.cost_names, plan.thresholds, plan.K) == ([3, 0], ["cheating", "violence"], [1.0, -2.0], 2)
    assert plan.cost_window == 128 and plan.n_prompts == len(data.prompts) and not data.eval_ids
    assert plan.total_steps == 60 and plan.optimiser_steps == 60 * (16 // 8)
    # --algo ppo: no cost model, no constraint (K = 0); gae: a reward critic
    plan, _ = ppo.plan_run(ppo.parse_args([*m, "--algo", "ppo", "--output_dir", str(tmp_path / "b")]), world=1)
    assert (plan.K, plan.thresholds, plan.cost_names, plan.cost_heads) == (0, [], [], None)
    assert (plan.critic, plan.use_cost, plan.cost_critic, plan.per_device_prompt_batch_size) == (True, False, False, 32)


def test_main_writes_plan_json_and_never_changes_args(untrained_scorers, tmp_path, monkeypatch):
    """A one-step run: args is the same object with the same values at the end of main() as after parse_args, and
    plan.json (beside args.json) holds the plan main() used; each block has its own timing."""
    import dataclasses
    import ppo_lagrangian as ppo
    from conftest import main_inprocess
    actor, one, _ = untrained_scorers
    seen = {}
    parse, plan_run = ppo.parse_args, ppo.plan_run

    def parse_and_keep(argv=None):
        seen["args"] = parse(argv)
        seen["before"] = dict(vars(seen["args"]))
        return seen["args"]

    def plan_and_keep(args, world):
        seen["plan"], data = plan_run(args, world)
        return seen["plan"], data
    monkeypatch.setattr(ppo, "parse_args", parse_and_keep)
    monkeypatch.setattr(ppo, "plan_run", plan_and_keep)
    out = tmp_path / "o"
    code, _, err = main_inprocess("ppo_lagrangian.py", "--actor_model_name_or_path", actor, "--reward_model_name_or_path",
                                  one, "--cost_model_name_or_path", one, "--rollout_batch_size", 8,
                                  "--per_device_train_batch_size", 8, "--max_new_tokens", 4, "--max_steps", 1,
                                  "--eval_prompt_data", "", "--judge", "", "--save_model", "False", "--output_dir", out)
    assert code == 0, err[-3000:]
    assert vars(seen["args"]) == seen["before"]
    assert json.load(open(out / "args.json"))["per_device_prompt_batch_size"] == 32  # the flag, as given
    saved = json.load(open(out / "plan.json"))
    assert saved == json.loads(json.dumps(dataclasses.asdict(seen["plan"])))
    assert saved["per_device_prompt_batch_size"] == 8 and saved["K"] == 1 and saved["thresholds"] == [-4.5]
    timings = json.loads(open(out / "timings.jsonl").readline())
    assert {"time/signals", "time/lambda", "time/advantages"} <= set(timings)


def _hand_rollout():
    """Two responses of 3 tokens (row 0: 2 tokens and an EOS; row 1: cut off at 3, no EOS)."""
    import ppo_lagrangian as ppo
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    z = torch.zeros(2, 5, dtype=torch.long)
    return ppo.Rollout(seq=z, attn=z, pos=z, mask=mask, lens=torch.tensor([2, 3]), has_eos=torch.tensor([True, False]),
                       P=2, responses=z[:, :3], prompt_texts=["a", "b"])


def test_per_token_signals_every_stream_hand_computed():
    """r_t = −β·kl_t + [t=last]·R and, for each of K = 2 constraints, c_kt = +β·kl_t + [t=last]·C_k (divided by the
    cost std); kl is 0 on padding; a missing EOS replaces R (not C); reward_shaping uses R − ν·C and has no c_t."""
    from types import SimpleNamespace
    import ppo_lagrangian as ppo
    batch = _hand_rollout()
    old = torch.tensor([[0.5, -0.2, 7.0], [0.1, 0.0, 0.3]])
    s = ppo.Scores(old_logp=old, ref_logp=torch.zeros(2, 3), entropy=torch.tensor(0.0), reward=torch.tensor([4.0, 80.0]),
                   cost=torch.tensor([2.0, 6.0]), cost_heads=torch.tensor([[2.0, -4.0], [6.0, 1.0]]))
    args = SimpleNamespace(algo="ppo_lag", missing_eos_penalty=-3.0, kl_coeff=0.1, clip_range_score=50.0, shaping_coeff=0.5)
    kl, reward, r_t, c_t = ppo.per_token_signals(s, batch, args, SimpleNamespace(K=2), reward_std=2.0, cost_std=2.0)
    assert torch.equal(kl, old * batch.mask) and kl[0, 2] == 0.0
    assert reward.tolist() == [2.0, -3.0]  # 4 / 2; row 1 has no EOS: the penalty
    assert torch.allclose(r_t, torch.tensor([[-0.05, 0.02 + 2.0, 0.0], [-0.01, 0.0, -0.03 - 3.0]]))
    assert len(c_t) == 2
    assert torch.allclose(c_t[0], torch.tensor([[0.05, -0.02 + 1.0, 0.0], [0.01, 0.0, 0.03 + 3.0]]))
    assert torch.allclose(c_t[1], torch.tensor([[0.05, -0.02 - 2.0, 0.0], [0.01, 0.0, 0.03 + 0.5]]))
    args.algo, args.missing_eos_penalty = "reward_shaping", None
    _, reward, r_t, c_t = ppo.per_token_signals(s, batch, args, SimpleNamespace(K=0), reward_std=2.0, cost_std=2.0)
    assert reward.tolist() == [2.0 - 0.5 * 1.0, 40.0 - 0.5 * 3.0] and c_t == []  # R − ν·C, C = cost / cost std
    assert r_t[1, 2].item() == pytest.approx(-0.03 + 38.5)


def test_update_lambda_standalone():
    """Block 5 alone: each λ_k moves on its own J_k − d_k from the raw costs in the window; K = 0 moves nothing."""
    from types import SimpleNamespace
    import ppo_lagrangian as ppo
    args = SimpleNamespace(lagrangian="gradient", lambda_init=1.0, lambda_lr=0.1, lambda_max=5.0, lambda_update_delay_steps=0)
    plan = SimpleNamespace(K=2, thresholds=[0.0, 5.0], grouped=True, cost_window=4)
    duals = ppo.make_duals(args, plan)
    s = ppo.Scores(old_logp=None, ref_logp=None, entropy=None, reward=None, cost=torch.tensor([4.0, 3.0]),
                   cost_heads=torch.tensor([[1.0, 4.0], [3.0, 0.0]]))
    J, lams = ppo.update_lambda(duals, plan, s)
    assert J == [2.0, 2.0] and lams == pytest.approx([math.exp(0.1 * 2.0), math.exp(0.1 * (2.0 - 5.0))])
    assert list(duals.window) == [[1.0, 4.0], [3.0, 0.0]] and duals.history == [lams]
    one = SimpleNamespace(K=1, thresholds=[3.0], grouped=False, cost_window=4)
    duals = ppo.make_duals(args, one)
    J, lams = ppo.update_lambda(duals, one, ppo.Scores(None, None, None, None, cost=s.cost))  # one cost: [C] each
    assert J == [3.5] and duals.history == [lams[0]] and list(duals.window) == [[4.0], [3.0]]
    none = SimpleNamespace(K=0, thresholds=[], grouped=False, cost_window=4)
    duals = ppo.make_duals(args, none)
    assert ppo.update_lambda(duals, none, s) == ([], []) and not duals.window and not duals.multipliers
