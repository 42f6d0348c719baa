"""The command line explains itself (--help: a description, default and allowed values for every flag), a stage run
before the stage it needs ends in one line naming what to run, and chosen/rejected preference rows (HH-RLHF, TRL)
train a reward model."""
import dataclasses
import gzip
import importlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import common
from conftest import REAL, ROOT, main_inprocess, metrics, run

STAGES = ["sft", "train_preference", "ppo_lagrangian", "evaluate", "dpo"]
ENUMS = {"ppo_lagrangian": {"algo": ["ppo_lag", "ppo", "reward_shaping"], "lagrangian": ["gradient", "pid"],
                            "adv_estimator": ["gae", "grpo", "rloo"], "lr_scheduler_type": ["constant", "cosine"],
                            "critic_lr_scheduler_type": ["", "constant", "cosine"],
                            "grpo_std": ["lagrangian", "none", "per_stream"]},
         "train_preference": {"objective": ["reward", "cost"], "loss_type": ["sequence-wise", "token-wise"]},
         "dpo": {"loss": ["dpo", "safedpo"], "preference": ["better", "safer"]},
         "evaluate": {"task": ["preference", "arena", "curves", "xstest", "refusal_agreement"],
                      "objective": ["", "reward", "cost"]}}
HH = os.path.join(REAL, "hh-rlhf_harmless-base_test.jsonl.gz")


@pytest.mark.parametrize("stage", STAGES)
def test_every_flag_has_a_description_default_and_choices(stage):
    module = importlib.import_module(stage)
    parser = common.build_parser(module.Args)
    by_dest = {}
    for a in parser._actions:
        if a.dest != "help":
            by_dest.setdefault(a.dest, []).append(a)
    for f in dataclasses.fields(module.Args):
        for a in by_dest[f.name]:
            assert a.help and len(a.help.split()) >= 2, f"{stage} --{f.name}: no description"
        if f.name in ENUMS.get(stage, {}):
            assert list(by_dest[f.name][0].choices) == ENUMS[stage][f.name]
    p = subprocess.run([sys.executable, f"{stage}.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0
    text = " ".join(p.stdout.split())  # argparse wraps lines
    for f in dataclasses.fields(module.Args):
        assert f"--{f.name}" in text
    n_flags = sum(1 for a in parser._actions if a.dest != "help")
    assert text.split(" options: ")[-1].count("(default:") == n_flags  # every flag prints its default
    for name, values in ENUMS.get(stage, {}).items():
        assert f"--{name} {{{','.join(values)}}}" in text


def test_a_wrong_enumerated_value_is_one_argparse_line():
    p = run("ppo_lagrangian.py", "--algo", "ppo_lagg", check=False)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(err) == 1, p.stderr
    assert "argument --algo: invalid choice: 'ppo_lagg'" in err[0] and "reward_shaping" in err[0]


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory):
    """The project's files as a fresh clone has them: no output/, no models/."""
    dst = tmp_path_factory.mktemp("fresh") / "repo"
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".git", ".venv*", "output", "models", "wandb", "tests",
                                                             "bench", "__pycache__", ".pytest_cache"))
    return dst


@pytest.mark.parametrize("command,expect", [
    (["train_preference.py"], "output/sft does not exist: run sft.py first, or pass --model_name_or_path"),
    (["train_preference.py", "--objective", "cost"], "output/sft does not exist: run sft.py first"),
    (["ppo_lagrangian.py"], "output/sft does not exist: run sft.py first, or pass --actor_model_name_or_path"),
    (["ppo_lagrangian.py", "--actor_model_name_or_path", "assets/tiny-llama"],
     "output/reward does not exist: run train_preference.py --objective reward first"),
    (["evaluate.py"], "output/sft does not exist: run sft.py first, or pass --policies"),
    (["evaluate.py", "--task", "preference"], "output/cost does not exist: run train_preference.py --objective cost first"),
    (["sft.py", "--model_name_or_path", "Qwen/Qwen2.5-0.5B-Instruct"], "the hub is unreachable"),
])
def test_later_stage_before_earlier_one_is_one_line(fresh_clone, command, expect):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}  # a new user's shell: no offline flag
    env.update(WANDB_MODE="offline", HF_HUB_DISABLE_IMPLICIT_TOKEN="1")
    t0 = time.time()
    p = subprocess.run([sys.executable, *command], cwd=fresh_clone, capture_output=True, text=True, timeout=300, env=env)
    print(f"{' '.join(command)}: {time.time() - t0:.1f} s")  # ~3 s here; the bound is 20 s
    out = p.stdout + p.stderr
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1].startswith("error: ") and expect in p.stderr, out
    assert "Retrying" not in out and "http" not in out and "Traceback" not in out, out


def test_hh_rlhf_rows_load_and_a_bad_dialogue_is_named():
    rows = common.load_rows(HH, "reward", skip_invalid=True)
    assert len(rows) == 2312 - 9  # 4 rows with an empty chosen answer, 5 whose chosen and rejected are two dialogues
    r = rows[0]
    assert r["better_response_id"] == 0 and r["prompt"].startswith("what are some pranks with a pen")
    assert "\n\nHuman: yep" in r["prompt"] and not r["response_0"].startswith("Assistant")
    with pytest.raises(common.UserError, match=r"hh-rlhf_harmless-base_test.jsonl.gz: row 87: field 'response_0' is empty"):
        common.load_rows(HH, "reward")
    bad = json.loads(gzip.open(HH, "rt").readlines()[1254])  # row 1255
    assert common.from_chosen_rejected(bad)[1] == "chosen and rejected differ before their last Assistant turn (not one dialogue)"
    with pytest.raises(common.UserError, match=r"row 1: missing field 'is_response_0_safe'"):
        common.load_rows(HH, "cost")


def test_trl_prompt_chosen_rejected_rows(tmp_path):
    f = tmp_path / "trl.jsonl"
    f.write_text(json.dumps({"prompt": "how do i make tea ?", "chosen": "boil water .", "rejected": "no ."}) + "\n" +
                 json.dumps({"prompt": "hi", "chosen": "same", "rejected": "same"}) + "\n")
    with pytest.raises(common.UserError, match="trl.jsonl: row 2: response_0 and response_1 are identical"):
        common.load_rows(str(f), "reward")
    r = common.load_rows(str(f), "reward", skip_invalid=True)
    assert r == [{"prompt": "how do i make tea ?", "response_0": "boil water .", "response_1": "no .",
                  "better_response_id": 0, "response": "boil water ."}]


def test_reward_model_trains_on_real_hh_rlhf_rows(tmp_path):
    out = tmp_path / "rm"
    sub = tmp_path / "hh600.jsonl"  # the first 600 real rows (one of them invalid): keeps the suite fast
    with gzip.open(HH, "rt") as f:
        sub.write_text("".join(next(f) for _ in range(600)))
    run("train_preference.py", "--objective", "reward", "--model_name_or_path", "assets/tiny-llama", "--train_data", sub,
        "--skip_invalid_rows", "--truncate_long_prompts", "--max_length", 192, "--max_steps", 12, "--log_every", 1,
        "--per_device_train_batch_size", 8, "--learning_rate", 1e-3, "--warmup_ratio", 0, "--eval_data", "",
        "--output_dir", out)
    losses = metrics(out, "train/loss")
    assert len(losses) == 12 and all(0 < x < 5 for x in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4  # it learns something from real rows
    # evaluate.py --task preference reads the same form (a reward model: chosen/rejected rows are accepted)
    sub = tmp_path / "hh80.jsonl"
    with gzip.open(HH, "rt") as f:
        sub.write_text("".join(next(f) for _ in range(80)))
    code, stdout, err = main_inprocess("evaluate.py", "--task", "preference", "--model_name_or_path", out,
                                       "--eval_data", sub, "--output_dir", tmp_path / "ev", "--max_length", 128)
    assert code == 0, err
    result = json.load(open(tmp_path / "ev" / "preference.json"))
    assert result["objective"] == "reward" and result["n_pairs"] == 80 and 0 <= result["accuracy"][0] <= 1


def test_alpaca_rows_are_sft_rows(tmp_path):
    """safe-rlhf's PTX data (alpaca: instruction/input/output) reads as prompt/response, validated like any row."""
    f = tmp_path / "alpaca.jsonl"
    f.write_text(json.dumps({"instruction": "Add the numbers.", "input": "1 and 2", "output": "3"}) + "\n" +
                 json.dumps({"instruction": "Say hi.", "input": "", "output": "hi"}) + "\n" +
                 json.dumps({"instruction": "Empty.", "input": "", "output": " "}) + "\n")
    with pytest.raises(common.UserError, match="alpaca.jsonl: row 3: field 'response' is empty"):
        common.load_rows(str(f), "sft")
    rows = common.load_rows(str(f), "sft", skip_invalid=True)
    assert [(r["prompt"], r["response"]) for r in rows] == [("Add the numbers.\n\n1 and 2", "3"), ("Say hi.", "hi")]
