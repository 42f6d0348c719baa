"""scripts/export_checkpoint.py: a resume checkpoint -> the policy as it was at that step, as an HF folder."""
import os

import torch
from conftest import TINY, load_script, main_inprocess, run

import common


def export_main(*args):
    return main_inprocess("scripts/export_checkpoint.py", *args)


def logits(path):
    tok = common.load_tokenizer(path)
    model = common.load_causal_lm(path, tok).eval()
    ids = torch.tensor([tok("a question and its answer")["input_ids"]])
    with torch.no_grad():
        return model(ids).logits


def test_exported_checkpoint_is_the_model_of_that_step(tmp_path):
    """Step 1 of a 2-step SFT run (no warmup, the cosine at its full lr on step 1) is the model a 1-step run saves:
    the exported checkpoint must give its logits exactly, and differ from the start and from the 2-step end."""
    flags = ["--judge", "", "--eval_data", "", "--learning_rate", "1e-2"]
    code, _, err = main_inprocess("sft.py", "--output_dir", tmp_path / "two", "--max_steps", 2, "--save_every", 1,
                                  "--keep_last", 0, *flags)
    assert code == 0, err[-2000:]
    code, _, err = main_inprocess("sft.py", "--output_dir", tmp_path / "one", "--max_steps", 1, *flags)
    assert code == 0, err[-2000:]
    ckpt = common.checkpoint_dirs(str(tmp_path / "two"))[-1]
    assert ckpt.endswith("step-00000001")
    code, out, err = export_main(ckpt, "--base", TINY, "--output_dir", tmp_path / "step1")
    assert code == 0, err[-2000:]
    assert '"step": 1' in out
    got, want = logits(str(tmp_path / "step1")), logits(str(tmp_path / "one"))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - logits(str(tmp_path / "two"))).abs().max() > 1e-3  # not the end of the run
    assert (got - logits(TINY)).abs().max() > 1e-3  # nor the start: the weights came from the checkpoint
    # the folder must not be overwritten, and only policy checkpoints export (one clear line each)
    code, _, err = export_main(ckpt, "--base", TINY, "--output_dir", tmp_path / "step1")
    assert code == 1 and "already holds a finished run" in err.strip().splitlines()[-1]
    code, _, err = export_main(tmp_path / "nope", "--base", TINY, "--output_dir", tmp_path / "x")
    assert code == 1 and "trainer_state.json" in err.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "x" / "config.json")
    score = tmp_path / "score_ckpt"  # a score model's checkpoint: refused before any weights are read
    score.mkdir()
    (score / "trainer_state.json").write_text('{"stage": "cost", "step": 3}')
    code, _, err = export_main(score, "--base", TINY, "--output_dir", tmp_path / "y")
    assert code == 1 and "only policy checkpoints" in err.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "y")


def test_policy_key_of_every_policy_stage():
    """The key each stage stores its policy under (ppo_lagrangian.py: the algo; sft.py; dpo.py: dpo/<loss>/<pref>)."""
    mod = load_script("scripts/export_checkpoint.py")
    assert [mod.policy_key(s) for s in ("ppo", "ppo_lag", "reward_shaping", "sft", "dpo/safedpo/safer", "cost", None)] \
        == ["actor", "actor", "actor", "model", "model", None, None]


def test_checkpoint_of_two_ranks_exports_on_one(tmp_path):
    """A checkpoint written by 2 ranks (each its own shard) exports in one process to the model the same 2-rank run
    saves after that step."""
    flags = ["--judge", "", "--eval_data", "", "--learning_rate", "1e-2"]
    run("sft.py", "--output_dir", tmp_path / "two", "--max_steps", 2, "--save_every", 1, "--keep_last", 0, *flags, nproc=2)
    run("sft.py", "--output_dir", tmp_path / "one", "--max_steps", 1, *flags, nproc=2)
    ckpt = common.checkpoint_dirs(str(tmp_path / "two"))[-1]
    code, _, err = export_main(ckpt, "--base", TINY, "--output_dir", tmp_path / "step1")
    assert code == 0, err[-2000:]
    torch.testing.assert_close(logits(str(tmp_path / "step1")), logits(str(tmp_path / "one")), rtol=0, atol=1e-5)
