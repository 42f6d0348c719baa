"""Critic-free Safe RLHF (--adv_estimator grpo|rloo): the group advantages against hand-computed values (a group of
equal rewards gives 0, not NaN), the sequence score R − β·Σkl, and a 2-rank run that ends with the same λ on every
rank and a checkpoint that resumes bitwise. The paper's claim with a critic-free run: tests/test_ppo.py."""
import json
import math
import os

import pytest
import torch

from conftest import metrics, run
from test_resume import same_weights


def test_group_advantages_hand_computed():
    from ppo_lagrangian import grpo_advantages, rloo_advantages
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])  # two groups of 4; the second has equal rewards
    std = math.sqrt((1.5 ** 2 + 0.5 ** 2 + 0.5 ** 2 + 1.5 ** 2) / 3)  # Bessel's correction, as TRL
    want = [-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std, 0.0, 0.0, 0.0, 0.0]
    assert grpo_advantages(r, 4).tolist() == pytest.approx(want, abs=1e-5)
    # leave-one-out: 1 − mean(2,3,4) = −2, 2 − mean(1,3,4) = −2/3, ...
    assert rloo_advantages(r, 4).tolist() == pytest.approx([-2.0, -2 / 3, 2 / 3, 2.0, 0, 0, 0, 0], abs=1e-6)
    assert torch.isfinite(grpo_advantages(torch.full((4,), 7.0), 4)).all()


def test_stream_advantages_use_the_kl_split_sequence_score():
    """The per-sequence reward R − β·Σkl and cost C + β·Σkl, group-relative, on every response token."""
    from types import SimpleNamespace
    from ppo_lagrangian import mixed_advantage, per_token_signal, rloo_advantages, stream_advantages
    args = SimpleNamespace(adv_estimator="rloo", samples_per_prompt=2, gamma=1.0, gae_lambda=0.95)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    lens = torch.tensor([3, 2])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.0, 0.0]]) * mask
    R, C, beta = torch.tensor([2.0, 1.0]), torch.tensor([-1.0, 3.0]), 0.5
    r_t = per_token_signal(kl, R, lens, mask, beta, -1.0, 50.0)
    c_t = per_token_signal(kl, C, lens, mask, beta, +1.0, 50.0)
    seq_r = torch.tensor([2.0 - 0.5 * 0.6, 1.0 - 0.5 * 0.4])  # R − β·Σkl
    seq_c = torch.tensor([-1.0 + 0.5 * 0.6, 3.0 + 0.5 * 0.4])  # C + β·Σkl
    adv_r, ret = stream_advantages(r_t, None, mask, args)
    adv_c, _ = stream_advantages(c_t, None, mask, args)
    assert ret is None
    assert torch.allclose(adv_r, rloo_advantages(seq_r, 2)[:, None] * mask)
    assert adv_r[0, 0].item() == pytest.approx(seq_r[0].item() - seq_r[1].item())  # G = 2: the other's score
    lam = 2.0
    mixed = mixed_advantage(adv_r, adv_c, lam)
    want0 = ((seq_r[0] - seq_r[1]) - lam * (seq_c[0] - seq_c[1])) / (1 + lam)
    assert mixed[0, 1].item() == pytest.approx(want0.item(), abs=1e-6) and mixed[1, 2].item() == 0.0


CRITIC_FREE = ["--adv_estimator", "grpo", "--samples_per_prompt", 4, "--per_device_prompt_batch_size", 4,
               "--per_device_train_batch_size", 8, "--eval_every", 0, "--eval_prompt_data", "", "--save_model", "False"]


def test_critic_free_needs_a_group(tmp_path):
    p = run("ppo_lagrangian.py", "--adv_estimator", "rloo", "--output_dir", tmp_path / "o", check=False)
    assert p.returncode == 1 and "--samples_per_prompt must be >= 2, got 1" in p.stderr


def test_critic_free_two_ranks_same_lambda_and_bitwise_resume(score_models, sft_model, tmp_path):
    sft, _ = sft_model
    rm, cm = score_models
    m = ["--actor_model_name_or_path", sft, "--reward_model_name_or_path", rm, "--cost_model_name_or_path", cm]
    run("ppo_lagrangian.py", *m, *CRITIC_FREE, "--max_steps", 3, "--output_dir", tmp_path / "two", nproc=2)
    hist = json.load(open(tmp_path / "two" / "lambda.json"))["per_rank_history"]
    assert len(hist) == 2 and hist[0] == hist[1] and len(hist[0]) == 3
    assert not os.path.exists(tmp_path / "two" / "critics")
    # a critic-free checkpoint (actor + its optimiser, λ, RNG) resumes to the same numbers as an uninterrupted run
    full, part = tmp_path / "full", tmp_path / "part"
    run("ppo_lagrangian.py", *m, *CRITIC_FREE, "--adv_estimator", "rloo", "--max_steps", 4, "--save_model", "True",
        "--output_dir", full)
    run("ppo_lagrangian.py", *m, *CRITIC_FREE, "--adv_estimator", "rloo", "--max_steps", 4, "--save_every", 2,
        "--output_dir", part)
    ckpt = part / "checkpoints" / "step-00000002"
    assert sorted(os.listdir(part / "checkpoints")) == ["step-00000002"]
    resumed = tmp_path / "resumed"
    run("ppo_lagrangian.py", *m, *CRITIC_FREE, "--adv_estimator", "rloo", "--max_steps", 4, "--resume", ckpt,
        "--save_model", "True", "--output_dir", resumed)
    same_weights(str(full), str(resumed))
    a, b = metrics(full), metrics(resumed)
    assert [r for r in a if r["step"] > 2] == [r for r in b if r["step"] > 2]
    assert json.load(open(full / "lambda.json"))["state"] == json.load(open(resumed / "lambda.json"))["state"]


def test_critic_free_nan_stop_and_reward_shaping(score_models, sft_model, tmp_path, monkeypatch):
    """The NaN stop and --algo reward_shaping with a critic-free estimator."""
    from conftest import main_inprocess, nan_score_at_call
    sft, _ = sft_model
    rm, cm = score_models
    m = ["--actor_model_name_or_path", sft, "--reward_model_name_or_path", rm, "--cost_model_name_or_path", cm]
    code, _, err = main_inprocess("ppo_lagrangian.py", *m, *CRITIC_FREE, "--adv_estimator", "rloo", "--algo",
                                  "reward_shaping", "--max_steps", 2, "--output_dir", tmp_path / "shaping")
    assert code in (0, None), err[-2000:]
    rows = [r for r in metrics(tmp_path / "shaping") if "train/shaped_reward" in r]
    assert len(rows) == 2 and all(math.isfinite(r["train/shaped_reward"]) for r in rows)
    nan_score_at_call(monkeypatch, 3)  # rollout 2's reward is NaN
    code, _, err = main_inprocess("ppo_lagrangian.py", *m, *CRITIC_FREE, "--max_steps", 3, "--output_dir", tmp_path / "nan")
    assert code == 1 and "non-finite reward at rollout 2" in err.strip().splitlines()[-1], err[-2000:]


@pytest.mark.parametrize("G", [2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 15, 16])
def test_equal_scores_give_exactly_zero_advantage(G):
    """G identical responses (the late-training case: G equal refusals) get an advantage of exactly 0 from every
    estimator. In float32 the mean of G equal numbers is often one ulp off (G = 3, 6, 8, ...), and GRPO divided that
    ulp by a zero std (audit, issue 20: |A| up to 3.8)."""
    from types import SimpleNamespace
    from ppo_lagrangian import grpo_advantages, grpo_scale, rloo_advantages
    values = torch.rand(200, generator=torch.Generator().manual_seed(G)) * 20 - 10  # 200 groups, one value each
    scores = values.repeat_interleave(G)
    assert (grpo_advantages(scores, G) == 0).all() and (rloo_advantages(scores, G) == 0).all()
    args = SimpleNamespace(adv_estimator="grpo", grpo_std="lagrangian", samples_per_prompt=G)
    mask = torch.ones(len(scores), 3)
    assert (grpo_scale(torch.zeros(len(scores), 3), mask, args) == 0).all()


def _critic_free_streams(estimator, grpo_std="lagrangian"):
    """Two groups of 3 responses: reward stream R − β·Σkl, two cost streams C_k + β·Σkl, mixed with λ = (2, 0.5),
    through the functions main() calls (stream_advantages -> mixed_advantage -> grpo_scale)."""
    from types import SimpleNamespace
    from ppo_lagrangian import grpo_scale, mixed_advantage, per_token_signal, stream_advantages
    args = SimpleNamespace(adv_estimator=estimator, grpo_std=grpo_std, samples_per_prompt=3, gamma=1.0, gae_lambda=0.95)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    lens = mask.sum(1).long()
    kl = torch.tensor([[0.2, 0.1], [0.3, 0.0], [0.0, 0.4], [0.1, 0.1], [0.5, 0.0], [0.2, 0.3]]) * mask
    R = torch.tensor([1.0, 3.0, 2.0, 0.5, 0.5, 4.0])
    C = [torch.tensor([-1.0, 2.0, 0.0, 1.0, -2.0, 0.5]), torch.tensor([0.3, -0.4, 0.1, 0.0, 0.2, -0.1])]
    beta, lam = 0.5, [2.0, 0.5]
    adv_r, _ = stream_advantages(per_token_signal(kl, R, lens, mask, beta, -1.0, 50.0), None, mask, args)
    adv_c = [stream_advantages(per_token_signal(kl, c, lens, mask, beta, +1.0, 50.0), None, mask, args)[0] for c in C]
    A = grpo_scale(mixed_advantage(adv_r, adv_c, lam), mask, args)
    # by hand: the Lagrangian score L = R − Σλ_k C_k − β(1 + Σλ_k)·Σkl of each response, in float64
    skl = kl.sum(1).double()
    L = R.double() - lam[0] * C[0].double() - lam[1] * C[1].double() - beta * (1 + sum(lam)) * skl
    return A, L.view(2, 3), mask, (R.double() - beta * skl).view(2, 3), [(c.double() + beta * skl).view(2, 3) for c in C], lam


def test_grpo_normalises_the_lagrangian_score_once():
    """GRPO (default --grpo_std lagrangian): A_i = (L_i − mean_g L)/(std_g L + ε), L = R − Σλ_k C_k − β(1 + Σλ_k)Σkl:
    λ_k weighs cost k against the reward and the KL weight is β, as the Lagrangian says. Every token of a response
    carries it; each group's advantages have std 1. (A per-stream std, or RLOO's unscaled difference, fail here.)"""
    A, L, mask, _, _, _ = _critic_free_streams("grpo")
    want = (L - L.mean(1, keepdim=True)) / (L.std(1, keepdim=True) + 1e-6)
    assert torch.allclose(A[:, 0].double(), want.view(-1), atol=1e-5)
    assert torch.equal(A, A[:, :1] * mask)


def test_rloo_and_dr_grpo_are_the_lagrangian_leave_one_out():
    A, L, _, _, _, lam = _critic_free_streams("rloo")
    loo = (L - L.mean(1, keepdim=True)) * 3 / 2 / (1 + sum(lam))  # G/(G−1)·(L − mean), scaled by 1/(1 + Σλ)
    assert torch.allclose(A[:, 0].double(), loo.view(-1), atol=1e-5)
    A, L, _, _, _, lam = _critic_free_streams("grpo", "none")  # Dr. GRPO: no std
    assert torch.allclose(A[:, 0].double(), ((L - L.mean(1, keepdim=True)) / (1 + sum(lam))).view(-1), atol=1e-5)


def test_grpo_per_stream_is_the_old_behaviour_on_request():
    A, _, _, r, c, lam = _critic_free_streams("grpo", "per_stream")
    norm = lambda x: (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)  # noqa: E731
    want = (norm(r) - lam[0] * norm(c[0]) - lam[1] * norm(c[1])) / (1 + sum(lam))
    assert torch.allclose(A[:, 0].double(), want.view(-1), atol=1e-5)


def test_lambda_without_a_cap_never_overflows_and_window_holds_a_rollout():
    import common
    from ppo_lagrangian import cost_window_size
    m = common.LagrangeMultiplier(1.0, 0.1, lambda_max=None)
    for _ in range(200):
        m.update(50.0, 0.0)  # a long, large violation
    assert math.isfinite(m.value) and m.value == pytest.approx(math.exp(common.LagrangeMultiplier.LOG_LAMBDA_CAP))
    assert cost_window_size(128, 32) == 128 and cost_window_size(128, 256) == 256


def test_main_keeps_each_group_on_one_rank_and_the_kl_in_every_stream(score_models, sft_model, cost_groups_model,
                                                                       tmp_path):
    """main() as it runs, on 2 ranks (tests/helpers/record_ppo.py records what it hands its phases): the G responses to
    a prompt are consecutive and on one rank (a group mixing prompts, or split across ranks, fails), the ranks hold
    different prompts, and every stream main() builds carries the KL with its sign: Σ_t r_t = R − β·Σkl, Σ_t c_kt =
    C_k + β·Σkl for each of the K = 4 cost heads (KL is 0 at rollout 1, non-zero at rollout 2)."""
    G, K, beta = 3, 4, 0.5
    run("tests/helpers/record_ppo.py", tmp_path / "rec", "--actor_model_name_or_path", sft_model[0],
        "--reward_model_name_or_path", score_models[0], "--cost_model_name_or_path", cost_groups_model,
        "--adv_estimator", "grpo", "--samples_per_prompt", G, "--per_device_prompt_batch_size", 4,
        "--per_device_train_batch_size", 12, "--max_steps", 2, "--eval_prompt_data", "", "--save_model", "False",
        "--kl_coeff", beta, "--output_dir", tmp_path / "o", nproc=2)
    recs = [json.load(open(tmp_path / f"rec.rank{r}.json")) for r in (0, 1)]
    for step in range(2):
        seen = []
        for rec in recs:
            prompts = rec["prompts"][step]
            assert len(prompts) == 4 * G
            groups = [prompts[i:i + G] for i in range(0, len(prompts), G)]
            assert all(len(set(g)) == 1 for g in groups), groups  # one prompt per group, consecutive
            seen.append({g[0] for g in groups})
            assert len(seen[-1]) == 4  # four different prompts on this rank
        assert not seen[0] & seen[1]  # no prompt on both ranks: no group is split across them
    for rec in recs:
        assert all(x == 0.0 for x in rec["kl_sum"][0])  # the actor is the reference at rollout 1
        assert any(abs(x) > 1e-3 for x in rec["kl_sum"][1])
        for step in range(2):
            kl, R, C = torch.tensor(rec["kl_sum"][step]), torch.tensor(rec["reward"][step]), torch.tensor(rec["cost"][step])
            signals = rec["signals"][step * (1 + K):(step + 1) * (1 + K)]
            assert len(C[0]) == K and len(signals) == 1 + K
            assert torch.allclose(torch.tensor(signals[0]), R.clamp(-50, 50) - beta * kl, atol=1e-4)
            for k in range(K):
                assert torch.allclose(torch.tensor(signals[1 + k]), C[:, k].clamp(-50, 50) + beta * kl, atol=1e-4)
