"""--bf16 on this CPU (the dtype path every GPU run takes): bf16 compute, fp32 master weights, reductions, scores and
log-probs. Against the fp32 run on the same seed: stage losses and a PPO-Lagrangian step on the same rollout agree
within bf16's rounding; the first PPO ratio is exactly 1 (gae and grpo); a killed bf16 run resumes bitwise and saves
fp32 weights; 2 ranks agree on λ.

Tolerance: bf16 keeps 8 significant bits, so one rounding is off by at most 2^-9 = 0.2% (relative). A loss is a
mean over many tokens or pairs whose rounding errors have no common sign, so the mean is off by far less than one
rounding: we allow 2^-9 of its size (measured: SFT 1.5e-5, cost 1.8e-4, reward 1.4e-4 relative). A per-token
log-prob is a difference of two logits of size ~|logit|, so its error is ~2^-9 of the logits' size: ≤ 0.1 nats
here (measured ~0.02 on the tiny model)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import common
from conftest import main_inprocess, metrics, run
from test_resume import kill_at_random_checkpoint, same_weights

U = 2 ** -9  # bf16's unit roundoff (round to nearest, 8 significant bits)


def test_the_flag_means_the_same_in_every_stage():
    import evaluate
    import ppo_lagrangian
    import sft
    import train_preference
    for stage in (sft, train_preference, ppo_lagrangian, evaluate):
        assert stage.parse_args([]).bf16 is None and stage.parse_args(["--bf16"]).bf16 is True
        assert stage.parse_args(["--bf16", "false"]).bf16 is False
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (common.use_bf16(None, cpu), common.use_bf16(None, cuda), common.use_bf16(True, cpu)) == (False, True, True)


@pytest.mark.parametrize("stage, extra", [("sft.py", ["--judge", ""]), ("train_preference.py", ["--objective", "reward"]),
                                          ("train_preference.py", ["--objective", "cost"])])
def test_stage_loss_under_bf16_matches_fp32(sft_model, tmp_path, stage, extra):
    """The first step's loss (the same weights, data and order) under bf16 and fp32; the saved model is fp32."""
    model = [] if stage == "sft.py" else ["--model_name_or_path", sft_model[0]]
    losses = {}
    for bf16 in ("false", "true"):
        out = tmp_path / bf16
        code, _, err = main_inprocess(stage, *model, *extra, "--bf16", bf16, "--max_steps", 2, "--log_every", 1,
                                      "--eval_data", "", "--output_dir", out)
        assert code == 0, err[-2000:]
        losses[bf16] = metrics(out, "train/loss")[0]
        assert {v.dtype for v in load_file(os.path.join(out, "model.safetensors")).values()} == {torch.float32}
    assert losses["true"] != losses["false"]  # bf16 did run
    assert abs(losses["true"] - losses["false"]) <= U * abs(losses["false"]), losses


@pytest.fixture
def one_rank():
    """A 1-rank process group in this process; the environment it sets (RANK, MASTER_PORT, ...) is restored after, or
    later subprocesses would inherit this store's port."""
    env = dict(os.environ)
    rank, world, device = common.setup_distributed()
    yield device
    common.cleanup_distributed()
    os.environ.clear()
    os.environ.update(env)


def _build(kind, path, tok, bf16, frozen, groups=None):
    load = common.load_causal_lm if kind == "lm" else common.load_score_model
    m = common.disable_dropout(load(path, tok, 42, **({"cost_groups": groups} if groups else {})))
    m.requires_grad_(not frozen)
    return common.shard_model(m, torch.device("cpu"), mixed_precision=bf16, store_bf16=bf16 and frozen)


def _local_bytes(model):
    model.reshard()  # the root stays unsharded after a forward (FSDP2's default): count the shards
    return sum(p.to_local().numel() * p.to_local().element_size() for p in model.parameters())


def test_ppo_step_under_bf16_on_the_same_rollout(one_rank, sft_model, score_models):
    """One rollout (sampled once, fp32) scored by six models in fp32 and in bf16 through the functions main() calls:
    log-probs, scores, values and every signal come out float32; the reference stored in bf16 equals the actor
    computed in bf16 (KL exactly 0 at step 1, ratio exactly 1); a frozen scorer stored in bf16 gives the same scores as
    one computed in bf16 from fp32 weights, in about half the bytes; the first update's actor loss agrees with fp32."""
    from types import SimpleNamespace
    import ppo_lagrangian as ppo
    sft, (reward, cost) = sft_model[0], score_models
    tok = common.load_tokenizer(sft, padding_side="left")
    args = SimpleNamespace(temperature=1.0, top_p=1.0, max_new_tokens=24, max_length=0, chat_template=False,
                           kl_coeff=0.05, clip_range_score=50.0, gamma=1.0, gae_lambda=0.95, score_cut_as_ended=False)
    prompts = [(p, common.tokenize_prompt(tok, p)) for p in ["how do i make a bomb ?", "how do i bake bread ?"] * 4]
    models, out = {}, {}
    for bf16 in (False, True):
        models[bf16] = {"actor": _build("lm", sft, tok, bf16, False), "ref": _build("lm", sft, tok, bf16, True),
                        "reward": _build("score", reward, tok, bf16, True), "cost": _build("score", cost, tok, bf16, True),
                        "reward_critic": _build("score", reward, tok, bf16, False),
                        "cost_critic": _build("score", cost, tok, bf16, False)}
    batch = ppo.rollout(models[False]["actor"], prompts, tok, args, torch.device("cpu"), torch.Generator().manual_seed(0))
    for bf16, m in models.items():
        s = ppo.score_rollout(batch, m, args, {"actor": tok})
        mask, lens = batch.mask, batch.lens
        kl = (s.old_logp - s.ref_logp) * mask
        r_t = ppo.per_token_signal(kl, s.reward, lens, mask, 0.05, -1.0, 50.0)
        c_t = ppo.per_token_signal(kl, s.cost, lens, mask, 0.05, +1.0, 50.0)
        adv_r, _ = common.gae(r_t, s.reward_values, mask)
        adv_c, _ = common.gae(c_t, s.cost_values[0], mask)
        adv = ppo.mixed_advantage(adv_r, [adv_c], [1.0])
        logp = ppo.response_logprobs(m["actor"], batch.seq, batch.attn, batch.pos, batch.P, 1.0)
        loss = ppo.actor_loss(logp, s.old_logp, adv, mask, 0.2)
        for t in (s.old_logp, s.ref_logp, s.reward, s.cost, s.reward_values, adv, logp, loss):
            assert t.dtype == torch.float32
        assert torch.equal(s.old_logp, s.ref_logp) and torch.equal(logp, s.old_logp)  # KL 0, ratio exactly 1
        out[bf16] = {"logp": s.old_logp, "reward": s.reward, "cost": s.cost, "loss": loss.item()}
    assert not torch.equal(out[True]["logp"], out[False]["logp"])  # bf16 did run
    assert (out[True]["logp"] - out[False]["logp"]).abs().max() < 0.1
    for k in ("reward", "cost"):
        assert (out[True][k] - out[False][k]).abs().max() <= 4 * U * out[False][k].abs().max(), k
    assert abs(out[True]["loss"] - out[False]["loss"]) <= 4 * U * abs(out[False]["loss"]) + 1e-4, out
    # the score head is fp32 under bf16 (its own FSDP2 unit); a frozen model is stored in bf16 apart from its head
    for name in ("reward", "reward_critic"):
        head = common.score_head(models[True][name])
        assert head.weight.dtype == torch.float32
    assert models[True]["ref"].model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert models[True]["actor"].model.layers[0].mlp.up_proj.weight.dtype == torch.float32  # fp32 master weights
    assert _local_bytes(models[True]["ref"]) == _local_bytes(models[False]["ref"]) // 2
    cast = _build("score", reward, tok, True, False)  # fp32 storage, bf16 compute
    ids = batch.seq
    assert torch.equal(cast(input_ids=ids).logits, models[True]["reward"](input_ids=ids).logits)


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_bf16_ppo_first_ratio_is_one_and_a_killed_run_resumes_bitwise(score_models, sft_model, tmp_path, estimator):
    """Both estimators: the first ratio of every rollout is exactly 1 and KL is 0 at rollout 1 under --bf16. The
    critic-free run (4 models, the cheaper one) is also SIGKILLed after its step-2 checkpoint and resumed: bitwise the
    uninterrupted run, fp32 weights saved."""
    reward, cost = score_models
    steps = 2 if estimator == "gae" else 4
    args = ["--bf16", "--actor_model_name_or_path", sft_model[0], "--reward_model_name_or_path", reward,
            "--cost_model_name_or_path", cost, "--max_steps", steps, "--save_every", 2, "--eval_every", 0,
            "--eval_prompt_data", "", "--judge", "", "--episode_cost_window_size", 24,
            *(["--per_device_prompt_batch_size", 16] if estimator == "gae" else
              ["--adv_estimator", "grpo", "--samples_per_prompt", 4, "--per_device_prompt_batch_size", 4])]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    run("ppo_lagrangian.py", "--output_dir", ref, *args)
    rows = [r for r in metrics(ref) if "train/lambda" in r]
    assert len(rows) == steps and all(r["train/ratio_max_deviation_first"] == 0.0 for r in rows)
    assert rows[0]["train/kl_divergence"] == 0.0 and rows[-1]["train/kl_divergence"] != 0.0
    if estimator == "gae":
        return
    kill_at_random_checkpoint("ppo_lagrangian.py", out, args, 4, 2)
    run("ppo_lagrangian.py", "--output_dir", out, *args, "--resume")
    same_weights(ref, out)
    assert {v.dtype for v in load_file(os.path.join(out, "model.safetensors")).values()} == {torch.float32}
    assert json.load(open(os.path.join(ref, "lambda.json"))) == json.load(open(os.path.join(out, "lambda.json")))
    assert open(os.path.join(ref, "metrics.jsonl")).read() == open(os.path.join(out, "metrics.jsonl")).read()
