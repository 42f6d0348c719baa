"""Bad input in every stage ends in one clear `error:` line naming the file (and row), exit code 1, no traceback and
no output folder; the cases that are handled (a tokenizer without a pad token, prompts longer than max_length) are
handled as the README says. Most cases run the stage's main() in this process (common.entrypoint, as `__main__`
does) to keep the suite fast; two run the real command line, one of them on 2 ranks."""
import json
import shutil

import pytest

from conftest import ROOT, main_inprocess, run

SFT_ROW = {"prompt": "how do i make tea ?", "response": "sure . first kettle ."}
PAIR = json.loads(open(f"{ROOT}/data/tiny-safety/preference_train.jsonl").readline())
PAIR.update(is_response_0_safe=True, is_response_1_safe=False, safer_response_id=0)
SFT_FAST = ["--max_steps", 1, "--judge", "", "--eval_data", "", "--per_device_train_batch_size", 4]
PREF_FAST = ["--model_name_or_path", "assets/tiny-llama", "--max_steps", 1, "--eval_data", "",
             "--per_device_train_batch_size", 4]


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def tokenizerless_model(tmp_path):
    d = tmp_path / "no_tokenizer"
    d.mkdir()
    shutil.copy(f"{ROOT}/assets/tiny-llama/config.json", d)
    return d


def configless_model(tmp_path):
    d = tmp_path / "no_config"
    d.mkdir()
    return d


def finished_run(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    return []


def unfinished_run(tmp_path):
    ck = tmp_path / "out" / "checkpoints" / "step-00000004"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text("{}")
    return []


# (script, flags built in tmp_path, text the error line must contain). `D` = a data file written from rows.
CASES = {
    "sft malformed JSON line": ("sft.py", lambda t: ["--train_data", jsonl(t / "d.jsonl", [SFT_ROW, '{"prompt": '])],
                                "d.jsonl: row 2: malformed JSON"),
    "sft missing field": ("sft.py", lambda t: ["--train_data", jsonl(t / "d.jsonl", [SFT_ROW, {"prompt": "x"}])],
                          "d.jsonl: row 2: missing field 'response'"),
    "sft wrong type": ("sft.py", lambda t: ["--train_data", jsonl(t / "d.jsonl", [SFT_ROW, {"prompt": "x", "response": 3}])],
                       "d.jsonl: row 2: field 'response' must be str"),
    "sft empty prompt": ("sft.py", lambda t: ["--train_data", jsonl(t / "d.jsonl", [{"prompt": " ", "response": "y"}])],
                         "d.jsonl: row 1: field 'prompt' is empty"),
    "sft empty file": ("sft.py", lambda t: ["--train_data", jsonl(t / "d.jsonl", [])], "d.jsonl: file is empty"),
    "sft nonexistent data": ("sft.py", lambda t: ["--train_data", t / "nope.jsonl"], "nope.jsonl does not exist"),
    "sft nonexistent model": ("sft.py", lambda t: ["--model_name_or_path", t / "nope"], "nope does not exist"),
    "sft model without tokenizer": ("sft.py", lambda t: ["--model_name_or_path", tokenizerless_model(t)],
                                    "no_tokenizer has no tokenizer"),
    "sft model without config": ("sft.py", lambda t: ["--model_name_or_path", configless_model(t)],
                                 "no_config has no config.json"),
    "sft every prompt too long": ("sft.py", lambda t: ["--max_length", 8], "every prompt is longer than max_length=8"),
    "sft global batch not divisible": ("sft.py", lambda t: ["--global_batch_size", 10],
                                       "--global_batch_size 10 is not divisible by world size 1 x per-device batch 4"),
    "sft unknown flag": ("sft.py", lambda t: ["--no_such_flag", 1], "unknown flag(s) --no_such_flag 1"),
    "sft finished output": ("sft.py", finished_run, "already holds a finished run"),
    "sft unfinished output": ("sft.py", unfinished_run, "holds resume checkpoints of an unfinished run"),
    "sft resume from nothing": ("sft.py", lambda t: ["--resume", t], "not a checkpoint folder"),
    "reward finished output": ("train_preference.py", finished_run, "already holds a finished run"),
    "ppo finished output": ("ppo_lagrangian.py", finished_run, "already holds a finished run"),
    "reward id not 0/1": ("train_preference.py", lambda t: ["--train_data", jsonl(t / "p.jsonl", [PAIR, {**PAIR, "better_response_id": 2}])],
                          "p.jsonl: row 2: field 'better_response_id' must be 0 or 1, got 2"),
    "reward identical responses": ("train_preference.py", lambda t: ["--train_data", jsonl(t / "p.jsonl", [{**PAIR, "response_1": PAIR["response_0"]}])],
                                   "p.jsonl: row 1: response_0 and response_1 are identical"),
    "cost contradictory labels": ("train_preference.py", lambda t: ["--objective", "cost", "--train_data", jsonl(t / "p.jsonl", [PAIR, {**PAIR, "safer_response_id": 1}])],
                                  "p.jsonl: row 2: contradictory labels"),
    "cost label of wrong type": ("train_preference.py", lambda t: ["--objective", "cost", "--train_data", jsonl(t / "p.jsonl", [{**PAIR, "is_response_0_safe": "yes"}])],
                                 "p.jsonl: row 1: field 'is_response_0_safe' must be bool"),
    "preference unknown objective": ("train_preference.py", lambda t: ["--objective", "safety"], "argument --objective: invalid choice: 'safety' (choose from 'reward', 'cost')"),
    "ppo prompt without prompt": ("ppo_lagrangian.py", lambda t: ["--prompt_data", jsonl(t / "q.jsonl", [{"question": "hi"}])],
                                  "q.jsonl: row 1: missing field 'prompt'"),
    "ppo reward model without weights": ("ppo_lagrangian.py", lambda t: [f"--{m}_model_name_or_path=assets/tiny-llama"
                                                                         for m in ("actor", "reward", "cost")],
                                         "reward model folder assets/tiny-llama has no weights"),
    "ppo batch arithmetic": ("ppo_lagrangian.py", lambda t: ["--per_device_prompt_batch_size", 10,
                                                             "--per_device_train_batch_size", 4],
                             "per_device_prompt_batch_size x samples_per_prompt (10 x 1) must be a multiple"),
    "dpo missing safety flag": ("dpo.py", lambda t: ["--train_data", jsonl(t / "p.jsonl", [PAIR, {k: v for k, v in PAIR.items() if k != "is_response_1_safe"}])],
                                "p.jsonl: row 2: missing field 'is_response_1_safe'"),
    "safedpo null safety flag": ("dpo.py", lambda t: ["--train_data", jsonl(t / "p.jsonl", [PAIR, {**PAIR, "is_response_1_safe": None}])],
                                 "p.jsonl: row 2: field 'is_response_1_safe' is null (unlabelled safety)"),
    "dpo id not 0/1": ("dpo.py", lambda t: ["--loss", "dpo", "--train_data", jsonl(t / "p.jsonl", [{**PAIR, "better_response_id": 3}])],
                       "p.jsonl: row 1: field 'better_response_id' must be 0 or 1, got 3"),
    "dpo empty file": ("dpo.py", lambda t: ["--train_data", jsonl(t / "p.jsonl", [])], "p.jsonl: file is empty"),
    "dpo unknown loss": ("dpo.py", lambda t: ["--loss", "ipo"], "argument --loss: invalid choice: 'ipo'"),
    "dpo finished output": ("dpo.py", finished_run, "already holds a finished run"),
    "evaluate unknown task": ("evaluate.py", lambda t: ["--task", "vibes"], "argument --task: invalid choice: 'vibes'"),
    "evaluate nonexistent policy": ("evaluate.py", lambda t: ["--policies", f"a={t / 'nope'}"], "nope does not exist"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(tmp_path, case):
    script, flags, msg = CASES[case]
    fast = SFT_FAST if script == "sft.py" else PREF_FAST if script in ("train_preference.py", "dpo.py") else []
    out = tmp_path / "out"
    code, stdout, stderr = main_inprocess(script, *fast, "--output_dir", out, *flags(tmp_path))
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    assert code == 1 and last.startswith("error:") and msg in last, (code, stderr[-2000:])
    assert "Traceback" not in stderr
    if "finished output" not in case:
        assert not out.exists()  # nothing was written
    else:
        assert not (out / "metrics.jsonl").exists()  # the earlier run is untouched


def test_tokenizer_without_pad_token_is_handled(tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(f"{ROOT}/assets/tiny-llama")
    tok.pad_token = None
    model = tmp_path / "nopad"
    tok.save_pretrained(model)
    shutil.copy(f"{ROOT}/assets/tiny-llama/config.json", model)
    code, _, err = main_inprocess("sft.py", *SFT_FAST, "--model_name_or_path", model, "--output_dir", tmp_path / "o")
    assert code == 0, err[-2000:]
    saved = AutoTokenizer.from_pretrained(tmp_path / "o")
    assert saved.pad_token_id is not None and saved.pad_token_id != saved.eos_token_id


def test_long_prompts_are_counted_then_dropped_or_truncated(tmp_path):
    long = {"prompt": " ".join(["tea"] * 80), "response": "sure . first kettle ."}
    data = jsonl(tmp_path / "d.jsonl", [SFT_ROW] * 8 + [long] * 3)
    code, out, err = main_inprocess("sft.py", *SFT_FAST, "--train_data", data, "--max_length", 48,
                                    "--output_dir", tmp_path / "a", "--save_model", "False")
    assert code == 0, err[-2000:]
    assert "d.jsonl: 8 rows" in out and "3 prompts longer than max_length dropped" in out
    code, out, err = main_inprocess("sft.py", *SFT_FAST, "--train_data", data, "--max_length", 48,
                                    "--truncate_long_prompts", "--output_dir", tmp_path / "b", "--save_model", "False")
    assert code == 0, err[-2000:]
    assert "d.jsonl: 11 rows" in out and "3 prompts longer than max_length cut to their last tokens" in out


def test_command_line_exit_codes(tmp_path):
    """The real command line: one line on stderr and exit code 1, on 1 rank and (through torchrun) on 2."""
    p = run("train_preference.py", "--objective", "cost", "--no_such_flag", check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == "error: unknown flag(s) --no_such_flag (see --help)"
    assert "Traceback" not in p.stderr
    p = run("sft.py", *SFT_FAST, "--per_device_train_batch_size", 1, "--global_batch_size", 3,
            "--output_dir", tmp_path / "o", nproc=2, check=False)
    assert p.returncode != 0
    assert "error: --global_batch_size 3 is not divisible by world size 2 x per-device batch 1" in p.stderr
    assert not (tmp_path / "o").exists()
