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
