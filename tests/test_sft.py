"""sft.py end to end: 2-rank FSDP equals 1 rank, the default run learns the task format, the saved folder reloads
to the same logits, pad == eos trains the same, real rows batch (bad input: test_bad_input.py)."""
import gzip
import json
import os

import pytest
import torch

import common
from conftest import REAL, TINY, metrics, run

FAST = ["--max_steps", 5, "--log_every", 1, "--judge", "", "--eval_data", "", "--save_model", "False"]


def test_two_ranks_equal_one_rank(tmp_path):
    run("sft.py", "--output_dir", tmp_path / "one", *FAST, "--per_device_train_batch_size", 8,
        "--gradient_accumulation_steps", 2)
    run("sft.py", "--output_dir", tmp_path / "two", *FAST, "--per_device_train_batch_size", 8, nproc=2)
    one, two = metrics(tmp_path / "one", "train/loss"), metrics(tmp_path / "two", "train/loss")
    assert len(one) == len(two) == 5
    assert one[-1] < one[0]
    for a, b in zip(one, two):
        assert abs(a - b) < 1e-4, (one, two)


def test_default_run_learns_format_and_reports_unsafe_rate(sft_model):
    out, p = sft_model
    assert "[judge]" in p.stdout and "unsafe rate on" in p.stdout
    rep = [r for r in metrics(out) if "judge/format_rate" in r][-1]
    assert rep["judge/format_rate"] >= 0.9
    assert 0.25 <= rep["judge/unsafe_rate_harmful"] <= 0.8  # SFT answers about half the harmful requests
    losses = metrics(out, "eval/loss")
    assert losses[-1] < losses[0]


def test_saved_folder_reloads_to_same_logits(sft_model):
    from transformers import AutoModelForCausalLM
    out, _ = sft_model
    tok = common.load_tokenizer(out)
    m1 = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([common.tokenize_prompt_response(tok, "how do i make tea ?", "sure . first kettle .", 64)[0]])
    # the in-memory sharded model's logits are checked against these in the 2-rank run below; here the saved
    # weights must equal what the model computes after a save -> load -> save round trip
    logits = m1(input_ids=ids).logits
    m1.save_pretrained(os.path.join(out, "..", "resaved"))
    m2 = AutoModelForCausalLM.from_pretrained(os.path.join(out, "..", "resaved")).eval()
    assert torch.equal(logits, m2(input_ids=ids).logits)
    assert open(os.path.join(out, "config.json")).read().count("LlamaForCausalLM") == 1


def test_in_memory_fsdp_model_equals_reloaded(tmp_path):
    """The sharded in-memory model (2 ranks) and the folder it saved give the same logits."""
    run("tests/helpers/save_and_compare.py", tmp_path / "m", nproc=2)
    assert (tmp_path / "m" / "logits_ok").read_text() == "ok"


def test_pad_equal_eos_trains_the_same(tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(TINY)
    tok.pad_token = tok.eos_token
    folder = tmp_path / "padeos"
    tok.save_pretrained(folder)
    (folder / "config.json").write_text(open(os.path.join(TINY, "config.json")).read())
    run("sft.py", "--output_dir", tmp_path / "a", *FAST)
    run("sft.py", "--output_dir", tmp_path / "b", *FAST, "--model_name_or_path", folder)
    assert metrics(tmp_path / "a", "train/loss") == pytest.approx(metrics(tmp_path / "b", "train/loss"), abs=1e-6)


def test_real_rows_validate_tokenise_and_batch():
    """Real PKU-SafeRLHF and HH-RLHF rows go through the same validation and tokenisation path."""
    tok = common.load_tokenizer(TINY)
    pku = json.load(open(os.path.join(REAL, "pku_saferlhf_safe-vs-unsafe_5k.json")))[:64]
    rows = [{"prompt": r["prompt"], "response_0": r["response"][0], "response_1": r["response"][1],
             "is_response_0_safe": True, "is_response_1_safe": False, "safer_response_id": 0} for r in pku]
    for i, r in enumerate(rows):
        assert common.validate_row(r, "cost") is None, i
    hh = [json.loads(l) for l in gzip.open(os.path.join(REAL, "hh-rlhf_harmless-base_test.jsonl.gz"), "rt")][:64]
    sft = []
    for r in hh:  # last assistant turn of the chosen dialogue is the response, the rest the prompt
        head, _, resp = r["chosen"].rpartition("\n\nAssistant:")
        sft.append({"prompt": head.strip(), "response": resp.strip() or "ok"})
    assert all(common.validate_row(r, "sft") is None for r in sft)
    toks = [common.tokenize_prompt_response(tok, r["prompt"], r["response_0"], 256) for r in rows]
    toks = [t for t in toks if t]
    assert len(toks) > 50 and any(t[2] for t in toks)  # some long real answers are truncated, and reported
    ids, lengths = common.pad([t[0] for t in toks], tok.pad_token_id)
    assert ids.shape == (len(toks), int(lengths.max())) and (lengths <= 256).all()
    plens = torch.tensor([t[1] for t in toks])
    mask = common.length_mask(lengths - plens, ids.shape[1], start=plens)
    assert mask.sum().item() == (lengths - plens).sum().item()
