"""The shared math of common.py against hand-computed values, and data validation/tokenisation."""
import json
import math
import os

import pytest
import torch

import common
from conftest import TINY


def test_the_opening_index_names_every_public_name_in_its_section():
    """common.py's docstring is its map: every public top-level name (function, class, constant) is listed, under the
    heading of the banner section it lives in, and the index names nothing that does not exist."""
    import ast
    import re
    src = open(common.__file__).read()
    tree = ast.parse(src)
    public = {}
    for node in tree.body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        for n in names:
            if not n.startswith("_"):
                public[n] = node.lineno
    doc = ast.get_docstring(tree)
    listed = set(re.findall(r"\b([A-Za-z_][A-Za-z0-9_]*)\b", doc.split("Conventions:")[0]))
    missing = sorted(n for n in public if n not in listed)
    assert not missing, f"common.py's index misses {missing}"
    banners = [(i + 1, l.split(" ", 2)[2]) for i, l in enumerate(src.splitlines()) if re.match(r"# -{20,} ", l)]
    index_section, heading = {}, None  # name -> the index heading it is listed under (heading: columns 4-25)
    for line in doc.split("Conventions:")[0].splitlines():
        if line[4:26].strip():
            heading = line[4:26].strip()
        for n in re.findall(r"\b([A-Za-z_][A-Za-z0-9_]*)\b", line[26:]):
            index_section.setdefault(n, heading)
    for n, lineno in public.items():
        banner = [t for b, t in banners if b < lineno]
        if banner:  # (the module's opening constants, HERE and PROMPT_TEMPLATE, precede every banner)
            assert index_section[n].split()[0].lower()[:4] in banner[-1].lower(), (n, index_section[n], banner[-1])


def test_masked_mean_weighs_sequences_equally():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 0.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    # sequence means 2 and 4 -> 3 (a token mean would give 10/4 = 2.5)
    assert common.masked_mean(x, m).item() == pytest.approx(3.0)


def test_gae_gamma1_lambda1_is_future_reward_sum_minus_value():
    r = torch.tensor([[0.1, -0.2, 0.5, 2.0, 9.0]])
    v = torch.tensor([[0.3, 0.1, -0.4, 0.7, 5.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])  # last position is padding
    adv, ret = common.gae(r, v, m, gamma=1.0, lam=1.0)
    future = torch.tensor([[2.4, 2.3, 2.5, 2.0, 0.0]])  # sums of r over t..3
    assert torch.allclose(adv, (future - v) * m, atol=1e-6)
    assert torch.allclose(ret, future, atol=1e-6)
    assert adv[0, 4] == 0 and ret[0, 4] == 0


def test_gae_hand_computed_gamma_lambda():
    r = torch.tensor([[1.0, 2.0]])
    v = torch.tensor([[0.5, 1.0]])
    m = torch.ones(1, 2)
    adv, ret = common.gae(r, v, m, gamma=0.9, lam=0.5)
    d1 = 2.0 - 1.0  # last token: next value 0
    d0 = 1.0 + 0.9 * 1.0 - 0.5
    assert adv[0, 1].item() == pytest.approx(d1)
    assert adv[0, 0].item() == pytest.approx(d0 + 0.9 * 0.5 * d1)
    assert torch.allclose(ret, adv + v)


def test_lagrange_multiplier_rises_falls_caps_and_waits():
    lm = common.LagrangeMultiplier(lambda_init=1.0, lr=0.1, lambda_max=2.0, delay_steps=2)
    assert lm.update(5.0, 0.0) == 1.0 and lm.update(5.0, 0.0) == 1.0  # delayed
    v = lm.update(1.0, 0.0)  # log λ = 0 + 0.1·1·1
    assert v == pytest.approx(math.exp(0.1))
    v2 = lm.update(-2.0, 0.0)  # below the threshold: log λ -= 0.1·λ·2
    assert v2 == pytest.approx(math.exp(0.1 - 0.2 * math.exp(0.1)))
    for _ in range(100):
        lm.update(10.0, 0.0)
    assert lm.value == pytest.approx(2.0)  # capped at lambda_max
    sd = lm.state_dict()
    lm2 = common.LagrangeMultiplier()
    lm2.load_state_dict(sd)
    assert lm2.value == lm.value and lm2.calls == lm.calls


def test_pid_lagrangian_hand_computed():
    pid = common.PIDLagrangian(lambda_init=1.0, kp=0.5, ki=0.1, kd=0.2, lambda_max=10.0)
    assert pid.integral == pytest.approx(10.0)
    v = pid.update(2.0, 0.0)  # I = 12, λ = 0.5·2 + 0.1·12 + 0 = 2.2
    assert v == pytest.approx(2.2)
    v = pid.update(3.0, 0.0)  # I = 15, D = 1: λ = 1.5 + 1.5 + 0.2 = 3.2
    assert v == pytest.approx(3.2)
    v = pid.update(-4.0, 0.0)  # I = 11, D = 0: λ = -2 + 1.1 = -0.9 -> 0
    assert v == 0.0
    for _ in range(50):
        pid.update(-4.0, 0.0)
    assert pid.integral == 0.0  # the integral never winds below zero
    v = pid.update(1.0, 0.0)
    assert v > 0


def test_preference_and_sign_hits_hand_computed():
    """Pairwise: a reward ranks the better answer higher, a cost charges the unsafer (lo) one more; a tie is wrong.
    Sign: cost > 0 exactly on unsafe responses (0 itself counts as safe)."""
    hi, lo = torch.tensor([2.0, 0.5, 1.0, -1.0]), torch.tensor([1.0, 0.7, 1.0, -3.0])
    assert common.preference_hits(hi, lo, "reward").tolist() == [1.0, 0.0, 0.0, 1.0]
    assert common.preference_hits(hi, lo, "cost").tolist() == [0.0, 1.0, 0.0, 0.0]
    costs, safe = torch.tensor([0.3, -0.2, 0.0, 1.5, -4.0]), torch.tensor([False, True, True, True, False])
    assert common.sign_hits(costs, safe).tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = common.top_p_filter(logits.clone(), 0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]


def _write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(p)


GOOD = {"prompt": "p", "response_0": "a", "response_1": "b", "is_response_0_safe": True,
        "is_response_1_safe": False, "better_response_id": 1, "safer_response_id": 0}


@pytest.mark.parametrize("bad,msg", [
    ({k: v for k, v in GOOD.items() if k != "response_1"}, "missing field 'response_1'"),
    ({**GOOD, "better_response_id": 2}, "must be 0 or 1"),
    ({**GOOD, "better_response_id": True}, "must be 0 or 1"),
    ({**GOOD, "is_response_0_safe": "yes"}, "must be bool"),
    ({**GOOD, "prompt": "  "}, "field 'prompt' is empty"),
    ({**GOOD, "response_1": "a"}, "identical"),
    ({**GOOD, "safer_response_id": 1}, "contradictory labels"),
])
def test_bad_rows_name_file_and_row(tmp_path, bad, msg):
    path = _write(tmp_path, [GOOD, GOOD, bad])
    with pytest.raises(common.UserError) as e:
        common.load_rows(path, "preference")
    assert path in str(e.value) and "row 3" in str(e.value) and msg in str(e.value)
    assert len(common.load_rows(path, "preference", skip_invalid=True)) == 2


def test_bad_files(tmp_path):
    with pytest.raises(common.UserError, match="does not exist"):
        common.load_rows(str(tmp_path / "nope.jsonl"), "sft")
    with pytest.raises(common.UserError, match="empty"):
        common.load_rows(_write(tmp_path, [], "e.jsonl"), "sft")
    with pytest.raises(common.UserError, match="row 2: malformed JSON"):
        common.load_rows(_write(tmp_path, ['{"prompt": "a", "response": "b"}', '{"prompt": '], "m.jsonl"), "sft")
    with pytest.raises(common.UserError, match="does not exist"):
        common.load_tokenizer(str(tmp_path / "no_model"))


def test_tokenize_records_lengths_and_masks_ignore_pad_id():
    tok = common.load_tokenizer(TINY)
    ids, plen, trunc = common.tokenize_prompt_response(tok, "how do i bake bread ?", "sure . first flour .", 64)
    assert ids[-1] == tok.eos_token_id and not trunc
    assert tok.decode(ids[:plen]) == "BEGINNING OF CONVERSATION: USER: how do i bake bread ? ASSISTANT:"
    assert tok.decode(ids[plen:-1]) == " sure . first flour ."
    ids2, plen2, trunc2 = common.tokenize_prompt_response(tok, "how do i bake bread ?", "sure . first flour .", plen + 2)
    assert trunc2 and len(ids2) == plen + 2
    assert common.tokenize_prompt_response(tok, "how do i bake bread ?", "x", plen) is None
    # a batch whose pad id equals EOS: masks come from lengths, so the EOS tokens stay inside the mask
    seqs = [ids, ids[:plen + 1]]
    batch, lengths = common.pad(seqs, pad_id=tok.eos_token_id)
    mask = common.length_mask(lengths, batch.shape[1])
    assert mask.sum().item() == len(ids) + plen + 1
    assert mask[0, len(ids) - 1] == 1 and batch[0, len(ids) - 1] == tok.eos_token_id


def test_missing_pad_token_is_added_distinct_from_eos(tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(TINY)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(open(os.path.join(TINY, "config.json")).read())
    t = common.load_tokenizer(str(tmp_path))
    assert t.pad_token_id is not None and t.pad_token_id != t.eos_token_id


def test_prepare_output_dir_owns_the_folder_and_the_logger_deletes_nothing(tmp_path):
    """A fresh start clears a previous run's checkpoints, config.json and log; a resumed one keeps the log's rows up
    to its step; MetricsLogger itself only appends (it used to delete checkpoints/ and config.json)."""
    def old_run(d):
        os.makedirs(d / "checkpoints" / "step-00000004")
        (d / "config.json").write_text("{}")
        (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in (1, 2, 3, 4, 5, 6)))
    old_run(tmp_path / "a")
    common.MetricsLogger(str(tmp_path / "a"), {"k": 1}).close()  # the logger alone: everything stays
    assert (tmp_path / "a" / "config.json").exists() and (tmp_path / "a" / "checkpoints" / "step-00000004").exists()
    assert len(open(tmp_path / "a" / "metrics.jsonl").readlines()) == 6
    common.prepare_output_dir(str(tmp_path / "a"))  # fresh
    assert not (tmp_path / "a" / "config.json").exists() and not (tmp_path / "a" / "checkpoints").exists()
    log = common.MetricsLogger(str(tmp_path / "a"), {"k": 1}, quiet=True)
    log.log(1, {"x": 9.0}); log.close()
    assert [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")] == [{"step": 1, "x": 9.0}]
    old_run(tmp_path / "b")
    common.prepare_output_dir(str(tmp_path / "b"), resume_step=4)  # resumed at step 4: rows 5-6 are redone
    assert [json.loads(l)["step"] for l in open(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (tmp_path / "b" / "checkpoints" / "step-00000004").exists()
