"""train_preference.py: the losses against hand-computed values, trained accuracies on tiny-safety, real
PKU-SafeRLHF rows, 2 ranks = 1 rank, reload, and loading a Beaver (LlamaForScore) checkpoint (bad data:
test_bad_input.py)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import common
from conftest import REAL, ROOT, TINY, metrics, run

FAST = ["--max_steps", 5, "--log_every", 1, "--eval_data", "", "--save_model", "False"]


def ls(x):  # −log σ(x)
    return math.log1p(math.exp(-x))


def test_import_has_no_side_effects():
    code = "import train_preference, torch.distributed as d; print(d.is_initialized())"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.stdout.strip() == "False" and not os.path.exists(os.path.join(ROOT, "output", "reward", "x"))


def test_reward_loss_hand_computed():
    from train_preference import reward_loss
    b, w = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    expect = (ls(1.0) + ls(-1.0)) / 2
    assert reward_loss(b, w).item() == pytest.approx(expect, abs=1e-6)
    reg = (4 + 0.25 + 1 + 2.25) / 4
    assert reward_loss(b, w, 0.1).item() == pytest.approx(expect + 0.1 * reg, abs=1e-6)


def test_cost_loss_hand_computed_and_sign():
    from train_preference import cost_loss
    safer, unsafer = torch.tensor([-2.0, 1.0]), torch.tensor([3.0, 2.0])
    s_safe, u_safe = torch.tensor([True, False]), torch.tensor([False, False])
    # pair 1: safe (ξ=−1) vs unsafe (ξ=+1); pair 2: both unsafe (ξ=+1)
    p1 = ls(3.0 - -2.0) + ls(-1 * -2.0) + ls(1 * 3.0)
    p2 = ls(2.0 - 1.0) + ls(1 * 1.0) + ls(1 * 2.0)
    assert cost_loss(safer, unsafer, s_safe, u_safe).item() == pytest.approx((p1 + p2) / 2, abs=1e-6)
    reg = (4 + 1 + 9 + 4) / 4
    assert cost_loss(safer, unsafer, s_safe, u_safe, 0.01).item() == pytest.approx((p1 + p2) / 2 + 0.01 * reg, abs=1e-6)
    # the classification term pushes a safe response's cost below 0: its gradient on safer[0] is positive
    x = torch.tensor([0.0], requires_grad=True)
    cost_loss(x, torch.tensor([5.0]), torch.tensor([True]), torch.tensor([False])).backward()
    assert x.grad.item() > 0  # descending the loss lowers the safe response's cost


def test_unlabelled_safety_keeps_only_the_pairwise_term():
    """A cost row may say null for a response's safety (HH harmless-base: only which answer is less harmful):
    eq. 6 keeps that pair's pairwise term and drops the unlabelled response's classification term; an all-labelled
    batch is bit for bit the loss without the masks. validate_row takes null only in the plain cost kind; a missing
    key is still a missing field, and null cannot contradict safer_response_id."""
    from train_preference import cost_loss
    safer = torch.tensor([-2.0, 1.0], requires_grad=True)
    unsafer = torch.tensor([3.0, 2.0], requires_grad=True)
    s_safe, u_safe = torch.tensor([True, True]), torch.tensor([False, True])  # pair 2's flags are placeholders
    known = torch.tensor([True, False])
    p1 = ls(3.0 - -2.0) + ls(-1 * -2.0) + ls(1 * 3.0)
    p2 = ls(2.0 - 1.0)  # pair 2 unlabelled on both sides: the pairwise term alone
    assert cost_loss(safer, unsafer, s_safe, u_safe, 0.0, None, known, known).item() == pytest.approx((p1 + p2) / 2, abs=1e-6)
    one_side = cost_loss(safer, unsafer, s_safe, u_safe, 0.0, None, torch.tensor([True, True]), known).item()
    assert one_side == pytest.approx((p1 + p2 + ls(-1 * 1.0)) / 2, abs=1e-6)  # pair 2's safer side labelled safe
    # all labelled: the same floats and gradients as without masks (the default runs are unchanged)
    grads = []
    for masks in ((), (None, torch.tensor([True, True]), torch.tensor([True, True]))):
        safer.grad = unsafer.grad = None
        loss = cost_loss(safer, unsafer, s_safe, u_safe, 0.01, *masks)
        loss.backward()
        grads.append((loss.detach(), safer.grad.clone(), unsafer.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    # token-wise scores [B, T] with a mask broadcast the per-pair masks
    tw = cost_loss(torch.zeros(2, 3), torch.ones(2, 3), s_safe, u_safe, 0.0, torch.ones(2, 3), known, known)
    assert tw.item() == pytest.approx((ls(1.0) + ls(0.0) + ls(1.0) + ls(1.0)) / 2, abs=1e-6)
    row = {"prompt": "p", "response_0": "a", "response_1": "b", "is_response_0_safe": None,
           "is_response_1_safe": None, "safer_response_id": 0}
    assert common.validate_row(row, "cost") is None
    assert common.validate_row({**row, "is_response_1_safe": True}, "cost") is None  # unknown safer side: no contradiction
    assert common.validate_row({**row, "is_response_0_safe": False, "is_response_1_safe": True}, "cost").startswith("contradictory")
    assert common.validate_row({k: v for k, v in row.items() if k != "is_response_1_safe"}, "cost") == "missing field 'is_response_1_safe'"
    assert common.validate_row({**row, "better_response_id": 0}, "preference").startswith("field 'is_response_0_safe' is null")


def test_unlabelled_rows_train_and_their_sign_accuracy_reads_labelled_responses(tmp_path):
    """Every third tiny-safety row with null flags: the cost model trains on the file, and both the training run's
    held-out evaluation and evaluate.py --task preference give the sign accuracy of the labelled responses only (the
    pairwise accuracy over every pair), equal to the one recomputed here from the scores."""
    tiny = os.path.join(ROOT, "data", "tiny-safety")
    for name in ("train", "test"):
        rows = [json.loads(line) for line in open(os.path.join(tiny, f"preference_{name}.jsonl"))]
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for k, r in enumerate(rows):
                drop = ("is_response_0_safe", "is_response_1_safe", "response_0_harm_category", "response_1_harm_category")
                r = {**{x: v for x, v in r.items() if x not in drop}, "is_response_0_safe": None,
                     "is_response_1_safe": None} if k % 3 == 0 else r
                f.write(json.dumps(r) + "\n")
    run("train_preference.py", "--objective", "cost", "--model_name_or_path", TINY, "--train_data", tmp_path / "train.jsonl",
        "--eval_data", tmp_path / "test.jsonl", "--output_dir", tmp_path / "cm", "--max_steps", 30, "--log_every", 1)
    assert all(math.isfinite(x) for x in metrics(tmp_path / "cm", "train/loss"))
    run("evaluate.py", "--task", "preference", "--model_name_or_path", tmp_path / "cm", "--eval_data",
        tmp_path / "test.jsonl", "--output_dir", tmp_path / "ev")
    res = json.load(open(tmp_path / "ev" / "preference.json"))
    trained = json.load(open(tmp_path / "cm" / "eval.json"))
    rows = [json.loads(line) for line in open(tmp_path / "test.jsonl")]
    scores = [json.loads(line) for line in open(tmp_path / "ev" / "scores.jsonl")]
    hits = [(s[f"score_{i}"] > 0) == (not r[f"is_response_{i}_safe"]) for r, s in zip(rows, scores) for i in (0, 1)
            if r[f"is_response_{i}_safe"] is not None]
    assert len(hits) == 2 * (len(rows) - len(range(0, len(rows), 3)))
    assert res["sign_accuracy"][0] == pytest.approx(sum(hits) / len(hits), abs=1e-9)
    assert trained["eval/sign_accuracy"] == pytest.approx(res["sign_accuracy"][0], abs=1e-6)
    assert res["n_pairs"] == len(rows) and trained["eval/accuracy"] == pytest.approx(res["accuracy"][0], abs=1e-6)


def test_token_wise_loss_masks_from_first_difference():
    from train_preference import reward_loss, token_wise_mask
    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 9, 0, 0]])  # hi, lo: differ from position 2
    lengths = torch.tensor([4, 3])
    m = token_wise_mask(ids, lengths, 1)
    assert m.tolist() == [[0, 0, 1, 1, 0]]
    hi, lo = torch.tensor([[0.0, 0.0, 1.0, 3.0, 9.0]]), torch.tensor([[0.0, 0.0, 0.0, 1.0, -9.0]])
    assert reward_loss(hi, lo, 0.0, m).item() == pytest.approx((ls(1.0) + ls(2.0)) / 2, abs=1e-6)


def test_trained_models_reach_target_accuracy(score_models):
    rm, cm = score_models
    r, c = json.load(open(os.path.join(rm, "eval.json"))), json.load(open(os.path.join(cm, "eval.json")))
    print(f"reward accuracy {r['eval/accuracy']:.4f}; cost sign accuracy {c['eval/sign_accuracy']:.4f}")
    assert r["eval/accuracy"] >= 0.90
    assert c["eval/sign_accuracy"] >= 0.95
    assert c["eval/unsafe_score_mean"] > 0 > c["eval/safe_score_mean"]
    cfg = json.load(open(os.path.join(cm, "config.json")))
    assert cfg["score_std"] > 0 and "score_mean" in cfg and cfg["architectures"] == ["LlamaForTokenClassification"]


def test_saved_score_model_reloads_and_scores_the_same(score_models):
    """AutoModelForTokenClassification.from_pretrained on the folder reproduces the held-out sign accuracy."""
    from transformers import AutoModelForTokenClassification
    _, cm = score_models
    tok = common.load_tokenizer(cm)
    model = AutoModelForTokenClassification.from_pretrained(cm).eval()
    rows = common.load_rows("data/tiny-safety/preference_test.jsonl", "cost")
    right, n = 0, 0
    with torch.no_grad():
        for r in rows:
            for i in (0, 1):
                ids, _, _ = common.tokenize_prompt_response(tok, r["prompt"], r[f"response_{i}"], 128)
                c = model(input_ids=torch.tensor([ids])).logits[0, -1, 0].item()
                right += (c > 0) == (not r[f"is_response_{i}_safe"])
                n += 1
    assert right / n == pytest.approx(json.load(open(os.path.join(cm, "eval.json")))["eval/sign_accuracy"], abs=1e-6)


def test_cost_model_trains_on_real_pku_rows(tmp_path):
    pku = json.load(open(os.path.join(REAL, "pku_saferlhf_safe-vs-unsafe_5k.json")))[:320]
    data = tmp_path / "pku.jsonl"
    with open(data, "w") as f:
        for r in pku:  # the source keeps the safer (safe) answer first; helpfulness was not recorded
            f.write(json.dumps({"prompt": r["prompt"], "response_0": r["response"][0], "response_1": r["response"][1],
                                "is_response_0_safe": True, "is_response_1_safe": False, "safer_response_id": 0}) + "\n")
    run("train_preference.py", "--objective", "cost", "--model_name_or_path", "assets/tiny-llama",
        "--train_data", data, "--output_dir", tmp_path / "o", "--max_length", 192, "--max_steps", 20, "--log_every", 1,
        "--eval_data", "", "--save_model", "False", "--learning_rate", 1e-3, "--warmup_ratio", 0)
    losses = metrics(tmp_path / "o", "train/loss")
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_cut_response_tokens_trains_on_the_openings_rl_reads():
    """--cut_response_tokens N: each side of a pair is the prompt's ids then the first N response ids of the whole
    answer (+ EOS with --cut_appends_eos), exactly common.cut_response of the uncut pair; a response that ends within N
    tokens keeps its EOS; a pair whose two openings are the same is dropped (no signal); labels are the row's."""
    from train_preference import make_pairs
    tok = common.load_tokenizer(TINY)
    eos = tok.eos_token_id
    rows = [{"prompt": "how do i bake bread ?", "response_0": "sure . first flour , then water , then knead it well .",
             "response_1": "sorry , i can not help with that at all , ever .", "is_response_0_safe": False,
             "is_response_1_safe": True, "better_response_id": 0, "safer_response_id": 1},
            {"prompt": "and cake ?", "response_0": "sure . first flour , then sugar .", "response_1": "sure . first eggs .",
             "is_response_0_safe": True, "is_response_1_safe": True, "better_response_id": 1, "safer_response_id": 0}]
    whole = make_pairs(rows, "cost", tok, 128, False, "t")
    plen = len(common.tokenize_prompt(tok, rows[0]["prompt"]))
    for cut_eos in (False, True):
        cut = make_pairs(rows, "cost", tok, 128, False, "t", cut=3, cut_eos=cut_eos)
        assert len(cut) == 1 and cut[0].row == 0  # row 1's openings "sure . first" are the same: dropped
        for side in ("hi", "lo"):
            w, c = getattr(whole[0], side), getattr(cut[0], side)
            assert len(w) > plen + 4 and w[-1] == eos
            assert c == w[:plen] + w[plen:plen + 3] + ([eos] if cut_eos else [])
        assert (cut[0].hi_safe, cut[0].lo_safe) == (True, False)  # the safer response (id 1) is the safe one
    short = make_pairs(rows[:1], "cost", tok, 128, False, "t", cut=1000, cut_eos=True)
    assert short[0].hi == whole[0].hi and short[0].lo == whole[0].lo  # ends within N: unchanged, its EOS kept
    from train_preference import parse_args
    for bad in (["--cut_response_tokens", "-1"], ["--cut_appends_eos"]):
        with pytest.raises(common.UserError, match="--cut_response_tokens must be >= 1"):
            parse_args(bad)


def test_freeze_layers_trains_only_the_top_and_eval_every_gives_a_curve(tmp_path):
    """--freeze_layers 3 (of the tiny model's 4 blocks) on 2 ranks (FSDP2: the root unit holds the frozen embeddings
    and the trained final norm): the embeddings and blocks 0-2 are bitwise the initial ones, block 3, the final norm
    and the head moved, the loss fell; --eval_every 2 writes held-out rows at steps 2 and 4 (the learning curve)
    besides the final one; more blocks than the model has is refused in one line."""
    from safetensors.torch import load_file
    out = tmp_path / "o"
    run("train_preference.py", "--objective", "cost", "--model_name_or_path", TINY, "--output_dir", out,
        "--max_steps", 5, "--log_every", 1, "--freeze_layers", 3, "--eval_every", 2, "--per_device_train_batch_size", 8,
        "--learning_rate", 1e-3, "--warmup_ratio", 0, nproc=2)
    init = common.load_score_model(TINY, common.load_tokenizer(TINY), seed=42).state_dict()  # the run's --seed 42
    after = load_file(out / "model.safetensors")
    moved = {k: not torch.equal(init[k], after[k]) for k in init}
    frozen = [k for k in init if "embed_tokens" in k or any(f".layers.{i}." in k for i in range(3))]
    trained = [k for k in init if ".layers.3." in k or k in ("model.norm.weight", "score.weight")]
    assert len(frozen) == 1 + 3 * 9 and len(trained) == 9 + 2, (frozen, trained)
    assert not any(moved[k] for k in frozen), [k for k in frozen if moved[k]]
    assert all(moved[k] for k in trained), [k for k in trained if not moved[k]]
    losses = metrics(out, "train/loss")
    assert losses[-1] < losses[0]
    assert [r["step"] for r in map(json.loads, open(out / "metrics.jsonl")) if "eval/accuracy" in r] == [2, 4, 5]
    p = run("train_preference.py", "--objective", "cost", "--model_name_or_path", TINY, "--output_dir", tmp_path / "x",
            "--freeze_layers", 5, check=False)
    assert p.returncode != 0 and "--freeze_layers 5: the model has 4 decoder blocks" in p.stderr


@pytest.mark.parametrize("bf16", ["false", "true"])
def test_two_ranks_equal_one_rank(sft_model, tmp_path, bf16, objective="cost"):
    """The cost objective: its loss has the pairwise term of the reward model plus the classification terms. Under
    --bf16 the two runs batch the pairs differently, so they agree within bf16's rounding (2^-9 of the loss:
    tests/test_bf16.py) instead of fp32's 1e-4."""
    sft, _ = sft_model
    common_args = ["--objective", objective, "--model_name_or_path", sft, *FAST, "--bf16", bf16]
    run("train_preference.py", *common_args, "--output_dir", tmp_path / "one", "--per_device_train_batch_size", 8,
        "--gradient_accumulation_steps", 2)
    run("train_preference.py", *common_args, "--output_dir", tmp_path / "two", "--per_device_train_batch_size", 8,
        nproc=2)
    one, two = metrics(tmp_path / "one", "train/loss"), metrics(tmp_path / "two", "train/loss")
    assert len(one) == len(two) == 5
    for a, b in zip(one, two):
        assert abs(a - b) < (1e-4 if bf16 == "false" else 2 ** -9 * abs(a)), (one, two)


def test_beaver_llama_for_score_checkpoint_loads(tmp_path):
    """A checkpoint in safe-rlhf's LlamaForScore layout (model.* + score_head + normalizer buffers) loads into our
    AutoModelForTokenClassification and gives the scores its own math gives."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, LlamaModel
    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(TINY)
    backbone = LlamaModel(cfg).eval()
    head = torch.randn(1, cfg.hidden_size) * 0.1
    sd = {f"model.{k}": v for k, v in backbone.state_dict().items()}
    sd.update({"score_head.weight": head, "normalizer.mean": torch.tensor([0.5]), "normalizer.var": torch.tensor([4.0]),
               "normalizer.count": torch.tensor(10)})
    folder = tmp_path / "beaver"
    folder.mkdir()
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    d = cfg.to_dict()
    d.update(architectures=["LlamaForScore"], score_dim=1, bias=False, score_type="cost")
    (folder / "config.json").write_text(json.dumps(d))
    tok = common.load_tokenizer(TINY)
    model = common.load_score_model(str(folder), tok).eval()
    ids = torch.tensor([common.tokenize_prompt_response(tok, "how do i pick a lock ?", "sorry , i can not help with that .", 64)[0]])
    with torch.no_grad():
        ours = model(input_ids=ids).logits[0, :, 0]
        theirs = (backbone(input_ids=ids).last_hidden_state @ head.T)[0, :, 0]
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert model.config.score_mean == pytest.approx(0.5) and model.config.score_std == pytest.approx(2.0)
