"""Runs that survive: a run killed with SIGKILL at a random step and resumed ends bitwise equal to an uninterrupted
run (SFT and PPO-Lagrangian with its critics, λ, cost window and RNG); SIGTERM writes a checkpoint and exits 143;
a checkpoint written by 2 ranks resumes on 1; the same seed gives the same metrics.jsonl twice; a NaN stops the run
before it reaches a checkpoint; a pickled payload in a checkpoint or model folder is never executed."""
import json
import os
import pickle
import random
import shutil
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

import common
from conftest import ROOT, TIMEOUT, main_inprocess, metrics, nan_score_at_call, output_of, run, start

SFT = ["--max_steps", 16, "--save_every", 2, "--judge", "", "--eval_data", "", "--log_every", 1]


def wait_for(path, p, timeout=TIMEOUT):
    t0 = time.time()
    while not os.path.exists(path):
        assert p.poll() is None, f"run ended before {path} appeared:\n{output_of(p)[-3000:]}"
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.02)


def same_weights(a, b, atol=0.0):
    x, y = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert x.keys() == y.keys()
    for k in x:
        if atol == 0:
            assert torch.equal(x[k], y[k]), k
        else:
            assert torch.allclose(x[k], y[k], atol=atol, rtol=0), (k, (x[k] - y[k]).abs().max())


def kill_at_random_checkpoint(script, out, args, steps, save_every):
    """Start a run, SIGKILL it right after a randomly chosen checkpoint appears (it is then mid-step), and plant a
    half-written checkpoint folder, as a kill during a save would leave it."""
    k = random.choice(range(save_every, steps // 2 + 1, save_every))
    p = start(script, "--output_dir", out, *args)
    wait_for(os.path.join(out, "checkpoints", f"step-{k:08d}"), p)
    p.kill()
    p.wait()
    assert not os.path.exists(os.path.join(out, "config.json")), f"killed too late (checkpoint {k})"
    tmp = os.path.join(out, "checkpoints", f"step-{steps - 1:08d}.tmp")
    os.makedirs(tmp, exist_ok=True)
    open(os.path.join(tmp, "__0_0.distcp"), "wb").write(b"half a file")
    return k


@pytest.fixture(scope="module")
def sft_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "sft"
    run("sft.py", "--output_dir", out, *SFT)
    return str(out)


def test_sft_sigkill_then_resume_is_bitwise_identical(sft_reference, tmp_path):
    out = str(tmp_path / "sft")
    kill_at_random_checkpoint("sft.py", out, SFT, 16, 2)
    p = run("sft.py", "--output_dir", out, *SFT, "--resume")
    assert "[resume] continuing from" in p.stdout
    same_weights(sft_reference, out)
    assert open(os.path.join(sft_reference, "metrics.jsonl")).read() == open(os.path.join(out, "metrics.jsonl")).read()
    left = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert left == ["step-00000012", "step-00000014"], left  # keep_last 2; the planted .tmp folder is gone


def test_sigterm_writes_a_checkpoint_and_exits_143(sft_reference, tmp_path):
    out = str(tmp_path / "sft")
    p = start("sft.py", "--output_dir", out, *SFT[:1], 400, *SFT[2:])
    wait_for(os.path.join(out, "checkpoints", "step-00000002"), p)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=TIMEOUT) == 143
    log = output_of(p)
    assert "SIGTERM: saved" in log and "Traceback" not in log
    saved = common.checkpoint_dirs(out)[-1]
    stopped = int(saved.rsplit("-", 1)[1])
    assert metrics(out)[-1]["step"] == stopped  # every logged step is in the checkpoint
    # resume with the same schedule (400 steps; another --max_steps is refused) and stop it the same way again:
    # the log continues from the checkpoint without a gap or a repeated step
    p = start("sft.py", "--output_dir", out, *SFT[:1], 400, *SFT[2:], "--resume")
    t0 = time.time()
    while int(common.checkpoint_dirs(out)[-1].rsplit("-", 1)[1]) <= stopped:
        assert p.poll() is None and time.time() - t0 < TIMEOUT, output_of(p)[-3000:]
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=TIMEOUT) == 143 and "[resume] continuing from" in output_of(p)
    steps = [r["step"] for r in metrics(out)]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] > stopped


def test_ppo_lagrangian_sigkill_then_resume_is_bitwise_identical(score_models, sft_model, tmp_path):
    reward, cost = score_models
    args = ["--actor_model_name_or_path", sft_model[0], "--reward_model_name_or_path", reward,
            "--cost_model_name_or_path", cost, "--max_steps", 8, "--save_every", 2, "--eval_every", 0,
            "--per_device_prompt_batch_size", 16, "--eval_prompt_data", "", "--judge", "",
            "--episode_cost_window_size", 24]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    run("ppo_lagrangian.py", "--output_dir", ref, *args)
    kill_at_random_checkpoint("ppo_lagrangian.py", out, args, 8, 2)
    run("ppo_lagrangian.py", "--output_dir", out, *args, "--resume")
    same_weights(ref, out)
    for critic in ("reward_critic", "cost_critic"):
        same_weights(os.path.join(ref, "critics", critic), os.path.join(out, "critics", critic))
    assert json.load(open(os.path.join(ref, "lambda.json"))) == json.load(open(os.path.join(out, "lambda.json")))
    assert open(os.path.join(ref, "metrics.jsonl")).read() == open(os.path.join(out, "metrics.jsonl")).read()
    lam = metrics(out, "train/lambda")
    assert len(lam) == 8 and len(set(lam)) > 1  # λ moved, and its state crossed the restart


def test_two_rank_run_is_deterministic_and_resumes_on_one_rank(tmp_path):
    args = ["--max_steps", 8, "--save_every", 4, "--judge", "", "--eval_data", "", "--log_every", 1,
            "--per_device_train_batch_size", 8]
    a, b, c = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")
    run("sft.py", "--output_dir", a, *args, nproc=2)
    run("sft.py", "--output_dir", b, *args, nproc=2)
    assert open(os.path.join(a, "metrics.jsonl")).read() == open(os.path.join(b, "metrics.jsonl")).read()
    same_weights(a, b)
    # 2 ranks x 8 -> 1 rank x 8 x 2 accumulation steps: the same global batch of 16, so the same steps
    ck = os.path.join(a, "checkpoints", "step-00000004")
    code, _, err = main_inprocess("sft.py", "--output_dir", c, *args, "--resume", ck)
    assert code == 1 and "global_batch=16 but this run has 8" in err  # refused before reading weights
    run("sft.py", "--output_dir", c, *args, "--resume", ck, "--global_batch_size", 16)
    ref = {r["step"]: r["train/loss"] for r in metrics(a)}
    got = {r["step"]: r["train/loss"] for r in metrics(c)}
    assert sorted(got) == [5, 6, 7, 8]
    for s in got:
        assert abs(got[s] - ref[s]) < 1e-4, (s, got[s], ref[s])
    same_weights(a, c, atol=1e-4)


def test_preference_resume_from_a_mid_run_checkpoint_is_bitwise_identical(tmp_path):
    """train_preference.py (cost objective, the one with more state in its loss): a run continued from its step-3
    checkpoint in a fresh folder ends exactly where the uninterrupted run ends."""
    args = ["--objective", "cost", "--model_name_or_path", "assets/tiny-llama", "--max_steps", 6, "--save_every", 3,
            "--eval_data", "", "--log_every", 1, "--per_device_train_batch_size", 8]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main_inprocess("train_preference.py", *args, "--output_dir", a)[0] == 0
    b.mkdir()
    with open(b / "metrics.jsonl", "w") as f:  # what the interrupted run had logged up to its checkpoint
        f.writelines(l for l in open(a / "metrics.jsonl") if json.loads(l)["step"] <= 3)
    code, out, err = main_inprocess("train_preference.py", *args, "--output_dir", b, "--resume",
                                    a / "checkpoints" / "step-00000003")
    assert code == 0 and "continuing from" in out, err[-2000:]
    same_weights(a, b)
    assert open(a / "metrics.jsonl").read() == open(b / "metrics.jsonl").read()
    # another --max_steps would silently re-lay the cosine schedule under the resumed steps: refused in one line
    ck = a / "checkpoints" / "step-00000003"
    longer = [x if x != 6 else 12 for x in args]
    code, out, err = main_inprocess("train_preference.py", *longer, "--output_dir", tmp_path / "c", "--resume", ck)
    assert code != 0 and "total_steps=6 but this run has 12" in err, (code, err[-2000:])
    assert not (tmp_path / "c" / "config.json").exists()
    # a checkpoint written before total_steps was recorded resumes as before
    state = json.load(open(ck / "trainer_state.json"))
    del state["total_steps"]
    json.dump(state, open(ck / "trainer_state.json", "w"))
    code, out, err = main_inprocess("train_preference.py", *args, "--output_dir", tmp_path / "d", "--resume", ck)
    assert code == 0 and "continuing from" in out, err[-2000:]


def test_nan_stops_before_the_checkpoint_and_the_last_good_one_resumes(tmp_path, monkeypatch):
    out = str(tmp_path / "sft")
    args = ["--output_dir", out, "--max_steps", 8, "--save_every", 2, "--judge", "", "--eval_data", "", "--log_every", 1]
    lm_nll, calls = common.lm_nll, []

    def nan_at_step_5(model, ids, mask):
        s, n = lm_nll(model, ids, mask)
        calls.append(1)
        return (s * float("nan") if len(calls) == 5 else s), n

    monkeypatch.setattr(common, "lm_nll", nan_at_step_5)
    code, _, err = main_inprocess("sft.py", *args)
    assert code == 1 and "non-finite loss, gradient norm at sft step 5" in err.strip().splitlines()[-1]
    assert [os.path.basename(d) for d in common.checkpoint_dirs(out)] == ["step-00000002", "step-00000004"]
    assert not os.path.exists(os.path.join(out, "config.json"))
    assert not [d for d in os.listdir(os.path.join(out, "checkpoints")) if d.endswith(".tmp")]
    monkeypatch.setattr(common, "lm_nll", lm_nll)
    code, _, err = main_inprocess("sft.py", *args, "--resume")  # the last good checkpoint is intact
    assert code == 0, err[-2000:]
    assert [r["step"] for r in metrics(out) if "train/loss" in r] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_nan_score_in_ppo_stops_the_run(score_models, sft_model, tmp_path, monkeypatch):
    reward, cost = score_models
    nan_score_at_call(monkeypatch, 3)  # rollout 2's reward is NaN
    code, _, err = main_inprocess("ppo_lagrangian.py", "--actor_model_name_or_path", sft_model[0],
                                  "--reward_model_name_or_path", reward, "--cost_model_name_or_path", cost,
                                  "--max_steps", 4, "--per_device_prompt_batch_size", 16, "--eval_prompt_data", "",
                                  "--output_dir", tmp_path / "ppo")
    assert code == 1 and "non-finite reward at rollout 2" in err.strip().splitlines()[-1], err[-2000:]
    assert not (tmp_path / "ppo" / "config.json").exists()


class Payload:
    """Unpickling this runs `touch <marker>`: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickled_payloads_are_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    # 1. a resume checkpoint whose DCP metadata (a pickle) was replaced by a payload
    out = tmp_path / "run"
    code, _, err = main_inprocess("sft.py", "--output_dir", out, "--max_steps", 2, "--save_every", 1, "--judge", "",
                                  "--eval_data", "", "--save_model", "False")
    assert code == 0, err[-2000:]
    ck = common.checkpoint_dirs(out)[-1]
    with open(os.path.join(ck, ".metadata"), "wb") as f:
        pickle.dump(Payload(marker), f)
    code, _, err = main_inprocess("sft.py", "--output_dir", out, "--max_steps", 2, "--judge", "", "--eval_data", "",
                                  "--resume")
    assert code == 1 and "refusing to load" in err and "system" in err, err[-2000:]
    assert not marker.exists()
    # 2. a model folder whose only weights are a pickle: refused, never unpickled
    model = tmp_path / "model"
    shutil.copytree(f"{ROOT}/assets/tiny-llama", model)
    with open(model / "pytorch_model.bin", "wb") as f:
        pickle.dump(Payload(marker), f)
    code, _, err = main_inprocess("sft.py", "--model_name_or_path", model, "--output_dir", tmp_path / "o")
    assert code == 1 and "holds weights only as pickle" in err
    # 3. the same folder with safetensors beside the pickle: the safetensors are loaded, the pickle ignored
    tok = common.load_tokenizer(str(model))
    m = common.load_causal_lm(f"{ROOT}/assets/tiny-llama", tok)
    m.save_pretrained(model, safe_serialization=True)
    with open(model / "pytorch_model.bin", "wb") as f:
        pickle.dump(Payload(marker), f)
    common.load_causal_lm(str(model), tok)
    common.load_score_model(str(model), tok)
    assert not marker.exists()
    # 4. custom code in a model folder is not imported without --trust_remote_code
    custom = tmp_path / "custom"
    shutil.copytree(f"{ROOT}/assets/tiny-llama", custom)
    (custom / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    cfg = json.load(open(custom / "config.json"))
    cfg.update(model_type="evil_llama", auto_map={"AutoConfig": "evil.EvilConfig",
                                                  "AutoModelForCausalLM": "evil.EvilModel"})
    json.dump(cfg, open(custom / "config.json", "w"))
    code, _, err = main_inprocess("sft.py", "--model_name_or_path", custom, "--output_dir", tmp_path / "o2",
                                  *["--max_steps", 1, "--judge", "", "--eval_data", ""])
    assert code == 1 and "trust_remote_code" in err.strip().splitlines()[-1], err[-2000:]
    assert not marker.exists()


def test_every_torch_load_is_weights_only():
    """Static check of the project's own code: no torch.load without weights_only=True, no bare pickle.load."""
    import re
    for name in os.listdir(ROOT):
        if name.endswith(".py"):
            src = open(os.path.join(ROOT, name)).read()
            for call in re.findall(r"torch\.load\([^)]*\)", src):
                assert "weights_only=True" in call, (name, call)
            assert "pickle.load(" not in src and "pickle.loads(" not in src, name


def test_ppo_lagrangian_checkpoint_of_two_ranks_resumes_on_one(score_models, sft_model, tmp_path):
    """PPO-Lagrangian on 2 ranks, resumed on 1 with the same rollout batch: weights, optimisers, λ state and the
    cost window carry over exactly; the sampling streams are reseeded (and the log says so)."""
    reward, cost = score_models
    args = ["--actor_model_name_or_path", sft_model[0], "--reward_model_name_or_path", reward,
            "--cost_model_name_or_path", cost, "--max_steps", 4, "--save_every", 2, "--eval_every", 0,
            "--eval_prompt_data", "", "--judge", "", "--rollout_batch_size", 16, "--per_device_train_batch_size", 8,
            "--save_model", "False"]
    two, one = tmp_path / "two", tmp_path / "one"
    run("ppo_lagrangian.py", "--output_dir", two, *args, nproc=2)
    ck = two / "checkpoints" / "step-00000002"
    state = json.load(open(ck / "trainer_state.json"))
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and len(state["cost_window"]) == 32
    code, out, err = main_inprocess("ppo_lagrangian.py", "--output_dir", one, *args, "--resume", ck)
    assert code == 0, err[-2000:]
    assert "resuming on 1" in out and "random streams are reseeded" in out
    lam = json.load(open(one / "lambda.json"))
    assert lam["per_rank_history"][0][:2] == state["lambda_history"][0]  # the history continues from rank 0's
    assert len(lam["per_rank_history"][0]) == 4 and len(lam["episode_cost_window"]) == 64
    assert [r["step"] for r in metrics(one) if "train/lambda" in r] == [3, 4]
    # another threshold, KL coefficient or length would continue another run's optimisation: refused in one line,
    # before any weights are read; a checkpoint written before these keys existed resumes as before
    for flag, value, msg in (("--threshold", -1.0, "thresholds=[-4.5] but this run has [-1.0]"),
                             ("--kl_coeff", 0.1, "kl_coeff=0.05 but this run has 0.1"),
                             ("--max_steps", 6, "total_steps=4 but this run has 6")):
        changed = [value if a == 4 else a for a in args] if flag == "--max_steps" else [*args, flag, value]
        code, out, err = main_inprocess("ppo_lagrangian.py", "--output_dir", tmp_path / "x", *changed, "--resume", ck)
        assert code != 0 and msg in err.strip().splitlines()[-1], (flag, err[-2000:])
        assert not (tmp_path / "x" / "config.json").exists()
    for k in ("total_steps",) + common.OBJECTIVE_KEYS:
        state.pop(k, None)
    json.dump(state, open(ck / "trainer_state.json", "w"))
    code, out, err = main_inprocess("ppo_lagrangian.py", "--output_dir", tmp_path / "old", *args, "--resume", ck)
    assert code == 0, err[-2000:]
