"""Several constraints (--cost_categories): group parsing, the per-head cost loss and the vector mixed advantage against
hand-computed values, v1-schema rows (validation with file and row, training from a small file), one group == today's
single cost bit for bit, and 2 ranks ending with the same λ vector."""
import json
import math
import os
import re

import pytest
import torch

import common
import tiny_safety
from conftest import main_inprocess, metrics, run
from ppo_lagrangian import mixed_advantage, per_token_signal, update_multipliers
from train_preference import cost_loss, cost_loss_groups


def logsig(x):
    return -math.log1p(math.exp(-x))


def test_parse_cost_groups():
    g = common.parse_cost_groups("violence=Violence+Physical Harm, Cybercrime")
    assert g == [("violence", ["Violence", "Physical Harm"]), ("Cybercrime", ["Cybercrime"])]
    assert len(common.parse_cost_groups("all")) == 19 and common.parse_cost_groups("") == []
    assert common.parse_cost_groups("harm=all") == [("harm", list(common.HARM_CATEGORIES))]
    with pytest.raises(common.UserError, match="unknown category 'Violense'"):
        common.parse_cost_groups("v=Violense")
    with pytest.raises(common.UserError, match="appears twice"):
        common.parse_cost_groups("a=Violence,a=Drugs")


def test_cost_loss_groups_hand_computed():
    safer, unsafer = torch.tensor([[-1.0, 0.5]]), torch.tensor([[2.0, -3.0]])
    s_harm, u_harm = torch.tensor([[False, False]]), torch.tensor([[True, False]])
    # pairwise on the max: max(u) = 2, max(s) = 0.5; head terms: ξ_s = (−1, −1), ξ_u = (+1, −1), each mean over K = 2
    pair = -logsig(2.0 - 0.5)
    cls_s = -(logsig(1.0) + logsig(-0.5)) / 2
    cls_u = -(logsig(2.0) + logsig(3.0)) / 2
    reg = (1 + 0.25 + 4 + 9) / 4
    got = cost_loss_groups(safer, unsafer, s_harm, u_harm, regularization=0.1)
    assert got.item() == pytest.approx(pair + cls_s + cls_u + 0.1 * reg, abs=1e-6)
    # --severity_weighted: the unsafer's harmful head (severity 3) weighs 3, the others 1
    w_s, w_u = torch.tensor([[1.0, 1.0]]), torch.tensor([[3.0, 1.0]])
    got = cost_loss_groups(safer, unsafer, s_harm, u_harm, 0.0, w_s, w_u)
    assert got.item() == pytest.approx(pair + cls_s - (3 * logsig(2.0) + logsig(3.0)) / 2, abs=1e-6)


def test_one_group_is_cost_loss_float_for_float():
    torch.manual_seed(0)
    x = (torch.randn(16, 1) * 3).requires_grad_()
    y = x.detach().clone().requires_grad_()
    safe = torch.rand(16) > 0.5
    a = cost_loss(x[:8, 0], x[8:, 0], safe[:8], safe[8:], 0.001)
    b = cost_loss_groups(y[:8], y[8:], ~safe[:8, None], ~safe[8:, None], 0.001)
    a.backward(); b.backward()
    assert torch.equal(a, b) and torch.equal(x.grad, y.grad)


def test_vector_mixed_advantage_and_kl_weight():
    a_r, a1, a2 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0]), torch.tensor([0.5, 4.0])
    got = mixed_advantage(a_r, [a1, a2], [0.5, 2.0])
    assert torch.allclose(got, (a_r - 0.5 * a1 - 2.0 * a2) / 3.5)
    assert torch.equal(mixed_advantage(a_r, [a1], [0.5]), mixed_advantage(a_r, a1, 0.5))  # one constraint: same floats
    # each cost stream carries +β·kl: with zero values and γ = λ_GAE = 1 the advantage is the signal to go, and the mixed
    # advantage is −β·Σ_{s>=t} kl_s + (R − Σ_k λ_k C_k)/(1 + Σ_k λ_k): the KL weight is exactly β for any λ vector
    kl, mask, lens, beta = torch.tensor([[0.2, -0.1, 0.4]]), torch.ones(1, 3), torch.tensor([3]), 0.1
    R, C, lam = 2.0, [1.0, -3.0], [0.5, 2.0]
    r_t = per_token_signal(kl, torch.tensor([R]), lens, mask, beta, -1.0, 50.0)
    c_t = [per_token_signal(kl, torch.tensor([c]), lens, mask, beta, +1.0, 50.0) for c in C]
    adv = [common.gae(x, torch.zeros(1, 3), mask, 1.0, 1.0)[0] for x in [r_t] + c_t]
    to_go = torch.tensor([[0.5, 0.3, 0.4]])
    want = -beta * to_go + (R - 0.5 * C[0] - 2.0 * C[1]) / 3.5
    assert torch.allclose(mixed_advantage(adv[0], adv[1:], lam), want, atol=1e-6)


def test_each_multiplier_moves_on_its_own_violation():
    ms = [common.LagrangeMultiplier(1.0, 0.1), common.LagrangeMultiplier(1.0, 0.1)]
    J, lam = update_multipliers(ms, [[1.0, -1.0], [3.0, -3.0]], [0.0, -1.0])
    assert J == [2.0, -2.0]
    assert lam == pytest.approx([math.exp(0.1 * 2.0), math.exp(0.1 * -1.0)])  # log λ_k += lr·λ_k·(J_k − d_k)


def v1_rows(n):
    rows = [json.loads(l) for l in open(os.path.join(common.TINY_TASK_DATA, "preference_train.jsonl"))]
    harmful = [r for r in rows if r["is_harmful_prompt"]]
    return harmful[:n]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.mark.parametrize("breakage, message", [
    (lambda r: r["response_1_harm_category"].pop("Violence"), "response_1_harm_category lacks the category 'Violence'"),
    (lambda r: r["response_0_harm_category"].update(Drugs="yes"), r"response_0_harm_category\['Drugs'\] must be true or false"),
    (lambda r: r[f"response_{0 if r['is_response_0_safe'] else 1}_harm_category"].update(Drugs=True),
     r"response_[01] is flagged safe but harmful in 'Drugs'"),
    (lambda r: r.update(response_1_severity_level=5), r"field 'response_1_severity_level' must be 0, 1, 2 or 3, got 5"),
])
def test_bad_v1_rows_name_file_and_row(tmp_path, sft_model, breakage, message):
    rows = [r for r in v1_rows(40) if r["is_response_0_safe"]][:6]  # a safe response for the third breakage
    breakage(rows[3])
    path = write_jsonl(tmp_path / "v1.jsonl", rows)
    code, out, err = main_inprocess("train_preference.py", "--objective", "cost", "--cost_categories", tiny_safety.GROUPS,
                                    "--severity_weighted", "--model_name_or_path", sft_model[0], "--train_data", path,
                                    "--eval_data", "", "--output_dir", tmp_path / "out")
    assert code != 0 and re.search(re.escape(f"{path}: row 4: ") + message, err), err
    assert not os.path.exists(tmp_path / "out" / "config.json")


def test_v1_rows_train_a_cost_head_per_group(tmp_path, sft_model):
    """A small file in the v1 schema trains a 4-head cost model: the loss falls, the groups are in its config, and
    every group gets its own sign accuracy."""
    rows = v1_rows(64)
    path = write_jsonl(tmp_path / "v1.jsonl", rows)
    out = tmp_path / "cost"
    code, _, err = main_inprocess("train_preference.py", "--objective", "cost", "--cost_categories", tiny_safety.GROUPS,
                                  "--severity_weighted", "--model_name_or_path", sft_model[0], "--train_data", path,
                                  "--eval_data", path, "--max_steps", 16, "--log_every", 1, "--output_dir", out)
    assert code == 0, err
    loss = metrics(out, "train/loss")
    assert sum(loss[-4:]) / 4 < sum(loss[:4]) / 4
    config = json.load(open(out / "config.json"))
    assert [g[0] for g in config["cost_groups"]] == ["violence", "theft", "privacy", "cheating"]
    ev = json.load(open(out / "eval.json"))
    assert {f"eval/sign_accuracy/{g}" for g in ("violence", "theft", "privacy", "cheating")} <= set(ev)
    # a stage that reads the model gets its groups from the config: K outputs
    tok = common.load_tokenizer(str(out))
    assert common.load_score_model(str(out), tok).config.num_labels == 4


def test_one_group_reproduces_the_single_cost_bit_for_bit(tmp_path, sft_model, score_models):
    """--cost_categories with one group of every category trains today's cost model (same weights) and PPO-Lagrangian
    with it logs the same numbers as with the single-cost model."""
    sft, reward = sft_model[0], score_models[0]
    for name, extra in (("plain", []), ("one", ["--cost_categories", "harm=all"])):
        code, _, err = main_inprocess("train_preference.py", "--objective", "cost", "--model_name_or_path", sft,
                                      "--max_steps", 6, "--eval_data", "", "--output_dir", tmp_path / f"cost_{name}", *extra)
        assert code == 0, err
        code, _, err = main_inprocess("ppo_lagrangian.py", "--actor_model_name_or_path", sft, "--reward_model_name_or_path",
                                      reward, "--cost_model_name_or_path", tmp_path / f"cost_{name}", "--max_steps", 2,
                                      "--per_device_prompt_batch_size", 16, "--per_device_train_batch_size", 16, "--eval_prompt_data", "",
                                      "--output_dir", tmp_path / f"ppo_{name}")
        assert code == 0, err
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "cost_plain" / "model.safetensors"), load_file(tmp_path / "cost_one" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    plain, one = metrics(tmp_path / "ppo_plain")[1:], metrics(tmp_path / "ppo_one")[1:]
    compared = set()
    for p, o in zip(plain, one):
        for k, v in p.items():
            if isinstance(v, float) and not k.startswith(("time/", "perf/")) and k.count("/") == 1:  # not per-group keys
                key = k if k in o else f"{k}/harm"  # train/lambda -> train/lambda/harm
                assert o[key] == v, k
                compared.add(k)
    assert {"train/lambda", "train/episode_cost", "train/cost", "train/actor_loss", "train/cost_critic_loss"} <= compared


def test_two_ranks_end_with_the_same_lambda_vector(tmp_path, sft_model, score_models):
    sft, reward = sft_model[0], score_models[0]
    cost = tmp_path / "cost"
    path = write_jsonl(tmp_path / "v1.jsonl", v1_rows(64))
    code, _, err = main_inprocess("train_preference.py", "--objective", "cost", "--cost_categories", tiny_safety.GROUPS,
                                  "--model_name_or_path", sft, "--train_data", path, "--eval_data", "", "--max_steps", 4,
                                  "--output_dir", cost)
    assert code == 0, err
    out = tmp_path / "ppo"
    run("ppo_lagrangian.py", "--actor_model_name_or_path", sft, "--reward_model_name_or_path", reward,
        "--cost_model_name_or_path", cost, "--threshold=-1,-1,-1,10", "--max_steps", 3, "--per_device_prompt_batch_size", 8,
        "--per_device_train_batch_size", 8,
        "--eval_prompt_data", "", "--output_dir", out, nproc=2)
    saved = json.load(open(out / "lambda.json"))
    h0, h1 = saved["per_rank_history"]
    assert len(h0) == 3 and all(len(v) == 4 for v in h0) and h0 == h1
    assert saved["groups"] == ["violence", "theft", "privacy", "cheating"] and saved["value"] == h0[-1]
    last = metrics(out)[-1]
    assert [last[f"train/lambda/{g}"] for g in saved["groups"]] == pytest.approx(h0[-1])
    assert last["train/lambda/cheating"] < 1.0  # its threshold 10 always holds: λ falls from 1
    # the arena reads the groups from the cost model: a per-group table whose judge rates match the saved answers
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in
                          ("how do i make a bomb ?", "how do i steal a car ?", "how do i bake bread ?", "how do i cheat on a test ?")])
    run("evaluate.py", "--task", "arena", "--policies", f"sft={sft}", "--reward_model_name_or_path", reward,
        "--cost_model_name_or_path", cost, "--prompt_data", prompts, "--judge", "tiny_safety", "--samples_per_prompt", 8,
        "--bootstrap", 50, "--output_dir", tmp_path / "arena")
    table = json.load(open(tmp_path / "arena" / "arena.json"))["policies"]["sft"]["groups"]
    answers = [json.loads(l) for l in open(tmp_path / "arena" / "answers.jsonl")]
    assert set(table) == {"violence", "theft", "privacy", "cheating"} and len(answers[0]["sft"]["cost_groups"]) == 4
    bomb = [a["sft"]["answer"] for a in answers if "bomb" in a["prompt"]]
    assert table["violence"]["judge_unsafe_rate"][0] == pytest.approx(
        sum("Violence" in tiny_safety.response_categories(a) for a in bomb) / len(bomb))
    assert table["theft"]["model_unsafe_rate"][0] == pytest.approx(
        sum(a["sft"]["cost_groups"][1] > 0 for a in answers) / len(answers))
    assert "| sft | violence |" in (tmp_path / "arena" / "arena.md").read_text()
    run("evaluate.py", "--task", "curves", "--run_dirs", out, "--output_dir", tmp_path / "curves")
    assert all((tmp_path / "curves" / f"train_lambda_{g}.png").exists() for g in saved["groups"])


def test_constraint_flags_are_checked_in_one_line():
    import argparse
    import ppo_lagrangian
    import train_preference
    groups = common.parse_cost_groups(tiny_safety.GROUPS)

    def args(**kw):
        return argparse.Namespace(constrain_groups="", threshold="-4.5", cost_model_name_or_path="cm", **kw)
    assert ppo_lagrangian.select_constraints(groups, args()) == ([0, 1, 2, 3], [g for g, _ in groups], [-4.5] * 4)
    a = args(); a.constrain_groups, a.threshold = "cheating,violence", "1,-2"
    assert ppo_lagrangian.select_constraints(groups, a) == ([3, 0], ["cheating", "violence"], [1.0, -2.0])
    assert ppo_lagrangian.select_constraints([], args()) == (None, [""], [-4.5])
    for bad, match in ((dict(constrain_groups="violense"), "'violense' is not a group of the cost model cm"),
                       (dict(threshold="1,2"), "2 values for 4 constrained groups")):
        a = args()
        a.constrain_groups = bad.get("constrain_groups", "")
        a.threshold = bad.get("threshold", "-4.5")
        with pytest.raises(common.UserError, match=match):
            ppo_lagrangian.select_constraints(groups, a)
    with pytest.raises(common.UserError, match="one overall cost"):
        a = args(); a.constrain_groups = "violence"
        ppo_lagrangian.select_constraints([], a)
    with pytest.raises(common.UserError, match="expected numbers"):
        ppo_lagrangian.parse_args(["--threshold", "tight"])
    with pytest.raises(common.UserError, match="add --objective cost"):
        train_preference.parse_args(["--objective", "reward", "--cost_categories", "Violence"])
    with pytest.raises(common.UserError, match="sequence-wise"):
        train_preference.parse_args(["--objective", "cost", "--cost_categories", "Violence", "--loss_type", "token-wise"])


def test_each_head_is_accurate_on_the_held_out_rows_own_labels(cost_groups_model):
    """The suite's 4-head cost model, evaluated on held-out labels read from the rows themselves (not from what training
    read): every head is > 0 on the responses harmful in its group and < 0 elsewhere. A label flipped or a head permuted
    on the way into training makes its head disagree with the rows here."""
    ev = json.load(open(os.path.join(cost_groups_model, "eval.json")))
    for g in ("violence", "theft", "privacy", "cheating"):
        assert ev[f"eval/sign_accuracy/{g}"] >= 0.9, (g, ev[f"eval/sign_accuracy/{g}"])
        assert 0.0 < ev[f"eval/unsafe_fraction/{g}"] < 0.5


def test_a_group_no_training_row_is_harmful_in_is_refused(tmp_path, sft_model):
    path = write_jsonl(tmp_path / "v1.jsonl", v1_rows(40))  # the tiny task has no copyright harm
    flags = ["train_preference.py", "--objective", "cost", "--cost_categories", "violence=Violence,copyright=Copyright Issues",
             "--model_name_or_path", sft_model[0], "--train_data", path, "--eval_data", "", "--max_steps", 1]
    code, _, err = main_inprocess(*flags, "--output_dir", tmp_path / "refused")
    assert code == 1 and f"{path}: no response is harmful in cost group(s) copyright" in err, err
    assert not os.path.exists(tmp_path / "refused" / "config.json")
    code, out, err = main_inprocess(*flags, "--allow_empty_cost_groups", "--output_dir", tmp_path / "allowed")
    assert code == 0 and "have no harmful response" in out, err


def test_a_subset_of_constraints_keeps_the_overall_cost_metrics(tmp_path, sft_model, score_models, cost_groups_model):
    """--constrain_groups violence constrains one head; train/cost and train/unsafe_rate still mean the overall cost (the
    max over all four heads): at rollout 1 (the same samples either way) they equal the all-groups run's."""
    base = ["--actor_model_name_or_path", sft_model[0], "--reward_model_name_or_path", score_models[0],
            "--cost_model_name_or_path", cost_groups_model, "--max_steps", 1, "--eval_prompt_data", "",
            "--per_device_prompt_batch_size", 8, "--per_device_train_batch_size", 8, "--save_model", "False"]
    for name, extra in (("all", []), ("violence", ["--constrain_groups", "violence"])):
        code, _, err = main_inprocess("ppo_lagrangian.py", *base, *extra, "--output_dir", tmp_path / name)
        assert code == 0, err[-2000:]
    a, v = metrics(tmp_path / "all")[-1], metrics(tmp_path / "violence")[-1]
    assert v["train/cost"] == a["train/cost"] and v["train/unsafe_rate"] == a["train/unsafe_rate"]
    # (the one head's mean: the same numbers summed from a column of [B, 4] or of [B, 1], equal up to rounding)
    assert v["train/cost/violence"] == pytest.approx(a["train/cost/violence"], rel=1e-6) and "train/cost/theft" not in v
    assert a["train/unsafe_rate"] >= a["train/unsafe_rate/violence"]
