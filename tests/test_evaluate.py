"""evaluate.py: bootstrap CIs, the arena of a policy against itself (win rate near 50%, CI covering it),
preference accuracy, curves."""
import json
import os

import pytest

from conftest import ROOT, run
from evaluate import bootstrap_ci


def test_bootstrap_ci_brackets_the_mean():
    m, lo, hi = bootstrap_ci([0.0] * 30 + [1.0] * 70, n=500)
    assert m == pytest.approx(0.7) and lo < 0.7 < hi and hi - lo < 0.25
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0, 1.0)


def test_arena_same_policy_twice_is_a_coin_flip(sft_model, tmp_path):
    """Two copies of one policy (with the same seed, so identical answers: every comparison is a tie worth 0.5)
    and a model-free judge pass; then preference accuracy and curves on the same folders."""
    sft, _ = sft_model
    out = tmp_path / "arena"
    # the SFT folder stands in for both score models: the arena only needs a score per answer
    p = run("evaluate.py", "--task", "arena", "--policies", f"a={sft},b={sft}", "--reward_model_name_or_path", sft,
            "--cost_model_name_or_path", sft, "--output_dir", out, "--samples_per_prompt", 1, "--bootstrap", 300)
    res = json.load(open(out / "arena.json"))
    win = res["pairs"]["a_vs_b"]["reward_win_rate"]
    assert win[1] <= 0.5 <= win[2] and abs(win[0] - 0.5) < 0.1
    assert res["policies"]["a"]["judge_unsafe_rate_harmful"] == res["policies"]["b"]["judge_unsafe_rate_harmful"]
    assert (out / "reward_cost_scatter.png").stat().st_size > 1000 and "| a |" in (out / "arena.md").read_text()
    assert "a_vs_b" in p.stdout or "| a |" in p.stdout


def test_arena_without_score_models_writes_the_answers_only(sft_model, tmp_path):
    """--reward_model_name_or_path '' --cost_model_name_or_path '': the arena samples every policy's answers (the same
    answers a scored arena samples: same seed) and writes them alone; one score model without the other is refused
    before any generation."""
    sft, _ = sft_model
    common_args = ["--task", "arena", "--policies", f"a={sft}", "--samples_per_prompt", 2, "--bootstrap", 50]
    run("evaluate.py", *common_args, "--reward_model_name_or_path", "", "--cost_model_name_or_path", "",
        "--output_dir", tmp_path / "only")
    run("evaluate.py", *common_args, "--reward_model_name_or_path", sft, "--cost_model_name_or_path", sft,
        "--output_dir", tmp_path / "scored")
    only = [json.loads(l) for l in open(tmp_path / "only" / "answers.jsonl")]
    scored = [json.loads(l) for l in open(tmp_path / "scored" / "answers.jsonl")]
    prompts = {json.loads(l)["prompt"] for l in open(os.path.join(ROOT, "data", "tiny-safety", "prompts_test.jsonl"))}
    assert len(only) == 2 * len(prompts) and {r["prompt"] for r in only} == prompts
    assert [(r["prompt"], r["a"]["answer"], r["a"]["eos"]) for r in only] == \
        [(r["prompt"], r["a"]["answer"], r["a"]["eos"]) for r in scored]
    assert set(only[0]["a"]) == {"answer", "eos"} and not (tmp_path / "only" / "arena.json").exists()
    p = run("evaluate.py", *common_args, "--reward_model_name_or_path", sft, "--cost_model_name_or_path", "",
            "--output_dir", tmp_path / "half", check=False)
    assert p.returncode != 0 and "give both" in p.stderr and not (tmp_path / "half").exists()


def test_curves_and_bad_run_dir(sft_model, tmp_path):
    sft, _ = sft_model
    run("evaluate.py", "--task", "curves", "--run_dirs", sft, "--output_dir", tmp_path / "c")
    p = run("evaluate.py", "--task", "curves", "--run_dirs", tmp_path / "nope", "--output_dir", tmp_path / "d", check=False)
    assert p.returncode != 0 and "does not exist" in p.stderr and "Traceback" not in p.stderr


def test_preference_task_matches_training_eval(score_models, tmp_path):
    _, cm = score_models
    run("evaluate.py", "--task", "preference", "--model_name_or_path", cm, "--output_dir", tmp_path)
    res = json.load(open(tmp_path / "preference.json"))
    trained = json.load(open(os.path.join(cm, "eval.json")))
    assert res["objective"] == "cost"
    assert res["sign_accuracy"][0] == pytest.approx(trained["eval/sign_accuracy"], abs=1e-6)
    assert res["accuracy"][0] == pytest.approx(trained["eval/accuracy"], abs=1e-6)
    assert (tmp_path / "score_histogram.png").exists() and (tmp_path / "scores.jsonl").exists()
    # a held-out file with one bad row (HH-RLHF has empty answers): one line naming file and row, or skipped and
    # counted under --skip_invalid_rows, the accuracy over the good rows unchanged
    good = open(os.path.join(ROOT, "data", "tiny-safety", "preference_test.jsonl")).read().splitlines()
    bad = json.loads(good[0]) | {"response_1": ""}
    f = tmp_path / "with_bad_row.jsonl"
    f.write_text("\n".join(good[:3] + [json.dumps(bad)] + good[3:]) + "\n")
    p = run("evaluate.py", "--task", "preference", "--model_name_or_path", cm, "--eval_data", f,
            "--output_dir", tmp_path / "bad", check=False)
    assert p.returncode != 0 and "row 4: field 'response_1' is empty" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "bad").exists()
    p = run("evaluate.py", "--task", "preference", "--model_name_or_path", cm, "--eval_data", f,
            "--output_dir", tmp_path / "skip", "--skip_invalid_rows")
    skipped = json.load(open(tmp_path / "skip" / "preference.json"))
    assert "skipped 1 invalid rows" in p.stdout + p.stderr and skipped["n_pairs"] == res["n_pairs"] == len(good)
    assert skipped["accuracy"] == res["accuracy"] and skipped["sign_accuracy"] == res["sign_accuracy"]


def test_pipeline_script_end_to_end_shortened(tmp_path):
    """scripts/pipeline.sh, shortened, with NPROC=2 (every stage under torchrun), ends with the arena table."""
    import subprocess
    import sys
    from conftest import ROOT
    env = {**os.environ, "OUT": str(tmp_path / "out"), "NPROC": "2", "STAGE_EXTRA": "--max_steps 10",
           "EXTRA": "--max_steps 2 --eval_every 0 --eval_samples_per_prompt 1", "ARENA_EXTRA": "--samples_per_prompt 1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    p = subprocess.run(["bash", "scripts/pipeline.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "| ppo_lag |" in p.stdout and "| safedpo |" in p.stdout and "reward_cost_scatter.png" in p.stdout
    times = dict(l.split("\t") for l in open(tmp_path / "out" / "wall_times.tsv").read().splitlines())
    assert set(times) == {"sft", "reward", "cost", "ppo", "ppo_lag", "dpo", "safedpo", "arena"}
    assert json.load(open(tmp_path / "out" / "eval" / "arena.json"))["samples"] == 56


def test_cut_response_hand_computed():
    """An answer ending within n tokens is unchanged; a longer one keeps its first n tokens, without EOS (as PPO with
    --max_new_tokens n scores it) or with one appended."""
    from common import cut_response
    assert cut_response([1, 2, 9], 4, 9) == [1, 2, 9]
    assert cut_response([1, 2, 3, 4, 9], 4, 9) == [1, 2, 3, 4, 9]  # 4 tokens, then its EOS: it ended in time
    assert cut_response([1, 2, 3, 4, 5, 9], 4, 9) == [1, 2, 3, 4]
    assert cut_response([1, 2, 3, 4, 5, 9], 4, 9, append_eos=True) == [1, 2, 3, 4, 9]
    assert cut_response([1, 2, 3, 4, 5], 4, 9) == [1, 2, 3, 4]  # already cut by --max_length: no EOS to keep


def test_preference_on_answers_cut_to_the_rollout_length(tmp_path):
    """--cut_response_tokens scores each held-out answer as a policy with that many new tokens would have produced it:
    a cut longer than every answer changes nothing; a short cut changes the scores of long answers only, and
    --cut_appends_eos changes them again (the EOS position is what a score model was trained to read)."""
    from conftest import TINY, main_inprocess
    import common
    cm = tmp_path / "cm"
    run("train_preference.py", "--objective", "cost", "--model_name_or_path", TINY, "--output_dir", cm,
        "--max_steps", 2, "--eval_data", "")
    rows = open(os.path.join(ROOT, "data", "tiny-safety", "preference_test.jsonl")).read().splitlines()[:24]
    data = tmp_path / "eval.jsonl"
    data.write_text("\n".join(rows) + "\n")

    def scores(name, *extra):  # in this process: four evaluations without four interpreter starts
        code, _, err = main_inprocess("evaluate.py", "--task", "preference", "--model_name_or_path", cm, "--eval_data",
                                      data, "--output_dir", tmp_path / name, "--bootstrap", 50, *extra)
        assert code in (0, None), err
        return [(json.loads(l)["score_0"], json.loads(l)["score_1"]) for l in open(tmp_path / name / "scores.jsonl")]
    whole, long_cut = scores("whole"), scores("long", "--cut_response_tokens", 1000)
    cut, cut_eos = scores("cut", "--cut_response_tokens", 3), scores("cut_eos", "--cut_response_tokens", 3,
                                                                     "--cut_appends_eos")
    assert long_cut == whole
    tok = common.load_tokenizer(str(cm))
    n_long = 0
    for r, w, c, e in zip(map(json.loads, rows), whole, cut, cut_eos):
        for i in (0, 1):
            n = len(common.score_model_text_ids(tok, r["prompt"], r[f"response_{i}"], True, 128)[1])  # with EOS
            if n <= 4:  # ends within 3 tokens: scored as it is
                assert c[i] == pytest.approx(w[i], abs=1e-5) and e[i] == pytest.approx(w[i], abs=1e-5)
            else:  # other batch shapes may move the last float bits: a real change is far above 1e-5
                n_long += 1
                assert abs(c[i] - w[i]) > 1e-4 and abs(e[i] - c[i]) > 1e-4
    assert n_long > 10
