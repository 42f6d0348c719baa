"""Correct for any pair of HF models: score models with another tokenizer than the actor (text round trip, never foreign
ids), dropout from the config (attention_dropout) off in RL, the arena scores what was generated (a cut-off answer
has no EOS), PPO's learning-rate schedule, and SIGTERM after the step loop."""
import json
import os
import shutil
import signal
import time

import pytest
import torch

import common
from conftest import ROOT, TINY, metrics, output_of, run, start

PROMPTS = os.path.join(ROOT, "data", "tiny-safety", "prompts_test.jsonl")


def foreign_tokenizer_folder(path, vocab=300):
    """A score-model folder whose tokenizer is not the actor's: another BPE (300 tokens, other ids), random weights."""
    import sys
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForTokenClassification, PreTrainedTokenizerFast
    sys.path.insert(0, os.path.join(ROOT, "data"))
    import tiny_safety
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(tiny_safety.corpus(), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<pad>", "<eos>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(path)
    cfg = AutoConfig.from_pretrained(TINY)
    cfg.update(dict(vocab_size=len(fast), eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                    bos_token_id=None, num_labels=1))
    torch.manual_seed(1)
    model = AutoModelForTokenClassification.from_config(cfg)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    return foreign_tokenizer_folder(tmp_path_factory.mktemp("foreign") / "score")


def test_same_tokenizer():
    a, b = common.load_tokenizer(TINY), common.load_tokenizer(TINY)
    assert common.same_tokenizer(a, b)


def ended_and_cut_rollout(actor_tok, prompts, answers):
    """A two-answer ppo Rollout in the actor's ids: the first answer ended (EOS), the second was cut off.
    -> (prompt ids, response ids, rollout)."""
    import ppo_lagrangian as ppo
    pids = [common.tokenize_prompt(actor_tok, p) for p in prompts]
    rids = [actor_tok(" " + a, add_special_tokens=False)["input_ids"] for a in answers]
    rids[0] = rids[0] + [actor_tok.eos_token_id]
    ids, plens = common.pad(pids, actor_tok.pad_token_id, "left")
    resp, rlens = common.pad(rids, actor_tok.pad_token_id)
    seq, attn, pos, mask = ppo.sequence_inputs(ids, plens, resp, rlens)
    return pids, rids, ppo.Rollout(seq=seq, attn=attn, pos=pos, mask=mask, lens=rlens,
                                   has_eos=torch.tensor([True, False]), P=ids.shape[1], responses=resp,
                                   prompt_texts=prompts)


def test_score_inputs_round_trip_text_and_keep_a_missing_eos(foreign):
    import ppo_lagrangian as ppo
    actor_tok, score_tok = common.load_tokenizer(TINY, padding_side="left"), common.load_tokenizer(foreign)
    assert not common.same_tokenizer(actor_tok, score_tok)
    prompts = ["how do i bake bread ?", "how do i pick a lock ?"]
    answers = ["sure . step 1 : mix flour .", "sorry , i can not help"]
    pids, rids, batch = ended_and_cut_rollout(actor_tok, prompts, answers)
    seq = batch.seq
    assert ppo.score_inputs(batch, actor_tok, None, False)[0] is seq  # same tokenizer: the rollout's own ids
    s_seq, s_attn, s_pos, s_P, s_lens = ppo.score_inputs(batch, actor_tok, score_tok, False)
    model = common.load_score_model(foreign, score_tok).eval()
    with torch.no_grad():
        got = ppo.end_scores(model, s_seq, s_attn, s_pos, s_P, s_lens)
        for i, (p, a) in enumerate(zip(prompts, answers)):
            want_ids, _, _ = common.tokenize_prompt_response(score_tok, p, a, 1000)
            if i == 1:
                want_ids = want_ids[:-1]  # cut off: no EOS appended
            assert want_ids[-1] == score_tok.eos_token_id if i == 0 else want_ids[-1] != score_tok.eos_token_id
            real = s_seq[i][s_attn[i].bool()].tolist()
            assert real == want_ids  # the score model reads its own ids, built from the text
            want = model(input_ids=torch.tensor([want_ids])).logits[0, -1, 0]
            assert got[i].item() == pytest.approx(want.item(), abs=1e-5)


def test_score_cut_as_ended_appends_an_eos_to_cut_responses_only(foreign):
    """--score_cut_as_ended: a cut response is scored as if it had ended (EOS appended), an ended one as it is, with
    the actor's tokenizer (the rollout's ids plus one column) and with another (the text round trip's EOS); the
    actor's own ids are left alone; evaluate.answer_ids with --score_cut_as_ended reads the same ids."""
    import evaluate
    import ppo_lagrangian as ppo
    actor_tok, score_tok = common.load_tokenizer(TINY, padding_side="left"), common.load_tokenizer(foreign)
    prompts, answers = ["how do i bake bread ?", "how do i pick a lock ?"], ["sure . mix flour .", "sorry , i can not"]
    pids, rids, batch = ended_and_cut_rollout(actor_tok, prompts, answers)
    seq, attn, pos, rlens = batch.seq, batch.attn, batch.pos, batch.lens
    before = seq.clone()
    s_seq, s_attn, s_pos, s_P, s_lens = ppo.score_inputs(batch, actor_tok, None, False, cut_as_ended=True)
    assert torch.equal(batch.seq, before) and s_P == batch.P and s_lens.tolist() == [rlens[0], rlens[1] + 1]
    model = common.load_score_model(TINY, actor_tok, 1).eval()
    with torch.no_grad():
        got = ppo.end_scores(model, s_seq, s_attn, s_pos, s_P, s_lens)
        plain = ppo.end_scores(model, seq, attn, pos, batch.P, rlens)
        for i in (0, 1):
            want_ids = pids[i] + rids[i] + ([actor_tok.eos_token_id] if i == 1 else [])
            assert s_seq[i][s_attn[i].bool()].tolist() == want_ids
            want = model(input_ids=torch.tensor([want_ids])).logits[0, -1, 0]
            assert got[i].item() == pytest.approx(want.item(), abs=1e-5)
    assert got[0].item() == pytest.approx(plain[0].item(), abs=1e-5) and abs(got[1] - plain[1]) > 1e-6
    ended = ppo.Rollout(**{**batch.__dict__, "has_eos": torch.tensor([True, True])})
    assert ppo.score_inputs(ended, actor_tok, None, False, cut_as_ended=True)[0] is ended.seq  # nothing cut: as is
    f_seq, f_attn, _, _, f_lens = ppo.score_inputs(batch, actor_tok, score_tok, False, cut_as_ended=True)
    for i, (p, a) in enumerate(zip(prompts, answers)):  # another tokenizer: its own EOS on both
        want_ids, _, _ = common.tokenize_prompt_response(score_tok, p, a, 1000)
        assert f_seq[i][f_attn[i].bool()].tolist() == want_ids and want_ids[-1] == score_tok.eos_token_id

    class A:  # the arena and XSTest (evaluate.py --score_cut_as_ended) read the answers as this RL run scored them
        max_length, chat_template, score_cut_as_ended = 1000, False, True
    for i in (0, 1):
        gen = (pids[i], rids[i])
        assert evaluate.answer_ids(actor_tok, prompts[i], answers[i], gen, actor_tok, A) == s_seq[i][s_attn[i].bool()].tolist()
        assert evaluate.answer_ids(score_tok, prompts[i], answers[i], gen, actor_tok, A) == f_seq[i][f_attn[i].bool()].tolist()


def test_one_rule_for_what_a_score_model_reads_in_every_caller(foreign):
    """An ended and a cut-off answer, a score model with another tokenizer: PPO's score_inputs, the arena's answer_ids
    and common.score_model_text_ids build the same ids (EOS only on the ended one), and the end score read by PPO
    (ppo.end_scores), the preference trainer (train_preference.score_batch) and the arena (evaluate.score_texts) is the
    same number: one rule each, in common.py (common.score_model_text_ids, common.end_scores)."""
    import evaluate
    import ppo_lagrangian as ppo
    import train_preference
    actor_tok, score_tok = common.load_tokenizer(TINY, padding_side="left"), common.load_tokenizer(foreign)
    prompts, answers, ended = ["how do i bake bread ?", "how do i pick a lock ?"], ["sure . mix flour .", "sorry , i"], [True, False]
    pids = [common.tokenize_prompt(actor_tok, p) for p in prompts]
    rids = [actor_tok(" " + a, add_special_tokens=False)["input_ids"] + [actor_tok.eos_token_id] * e
            for a, e in zip(answers, ended)]
    ids, plens = common.pad(pids, actor_tok.pad_token_id, "left")
    resp, rlens = common.pad(rids, actor_tok.pad_token_id)
    seq, attn, pos, mask = ppo.sequence_inputs(ids, plens, resp, rlens)
    batch = ppo.Rollout(seq=seq, attn=attn, pos=pos, mask=mask, lens=rlens, has_eos=torch.tensor(ended),
                        P=ids.shape[1], responses=resp, prompt_texts=prompts)
    s_seq, s_attn, s_pos, s_P, s_lens = ppo.score_inputs(batch, actor_tok, score_tok, False)

    class A:
        max_length, chat_template, batch_size, score_cut_as_ended = 1000, False, 2, False
    rule = [sum(common.score_model_text_ids(score_tok, p, a, e, 1000), []) for p, a, e in zip(prompts, answers, ended)]
    assert rule[0][-1] == score_tok.eos_token_id and rule[1][-1] != score_tok.eos_token_id
    for i in range(2):
        assert s_seq[i][s_attn[i].bool()].tolist() == rule[i]
        assert evaluate.answer_ids(score_tok, prompts[i], answers[i], (pids[i], rids[i]), actor_tok, A) == rule[i]
    model = common.load_score_model(foreign, score_tok).eval()
    with torch.no_grad():
        from_ppo = ppo.end_scores(model, s_seq, s_attn, s_pos, s_P, s_lens).tolist()
        r_ids, r_lens = common.pad(rule, score_tok.pad_token_id)
        from_trainer = train_preference.score_batch(model, r_ids, r_lens)[1].tolist()
        from_arena = evaluate.score_texts(model, score_tok, prompts, answers, A, torch.device("cpu"),
                                          list(zip(pids, rids)), actor_tok)
        alone = [model(input_ids=torch.tensor([r])).logits[0, -1, 0].item() for r in rule]
    for got in (from_ppo, from_trainer, from_arena):
        assert got == pytest.approx(alone, abs=1e-5)


def test_dropout_from_the_config_is_off():
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(TINY)
    cfg.attention_dropout = 0.1
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).train()
    ids = torch.randint(0, 500, (2, 24))
    assert (model(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() > 1e-3  # SDPA dropout is on
    common.disable_dropout(model)
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert model.config.attention_dropout == 0.0


def test_ppo_with_foreign_score_models_config_dropout_and_cosine_schedule(foreign, tmp_path):
    """One PPO-Lagrangian run: reward and cost models with another tokenizer, an actor whose config has
    attention_dropout 0.1 (first ratio must still be exactly 1), and a cosine schedule with warmup."""
    actor = tmp_path / "actor"
    actor.mkdir()
    for f in os.listdir(TINY):
        if f != "build.py":
            shutil.copy(os.path.join(TINY, f), actor)
    cfg = json.load(open(actor / "config.json"))
    cfg["attention_dropout"] = 0.1
    json.dump(cfg, open(actor / "config.json", "w"))
    base = ["--actor_model_name_or_path", actor, "--reward_model_name_or_path", foreign, "--cost_model_name_or_path",
            foreign, "--per_device_prompt_batch_size", 4, "--per_device_train_batch_size", 4, "--max_new_tokens", 8,
            "--eval_prompt_data", "", "--judge", "", "--save_model", "False"]
    p = run("ppo_lagrangian.py", *base, "--output_dir", tmp_path / "refused", check=False)
    assert p.returncode == 1 and "reward_critic_model_name_or_path" in p.stderr and "tokenizer differs" in p.stderr
    out = tmp_path / "o"
    p = run("ppo_lagrangian.py", *base, "--reward_critic_model_name_or_path", actor, "--cost_critic_model_name_or_path",
            actor, "--max_steps", 4, "--lr_scheduler_type", "cosine", "--critic_lr_scheduler_type", "constant", "--warmup_ratio", 0.25, "--actor_lr", 1e-4,
            "--critic_lr", 2e-4, "--output_dir", out)
    assert "the reward model's tokenizer differs from the actor's" in p.stdout
    assert "returned a view tensor" not in p.stderr  # FSDP2's warning about score-model outputs is silenced
    rows = [r for r in metrics(out) if "train/reward" in r]
    assert len(rows) == 4 and all(r["train/ratio_max_deviation_first"] == 0.0 for r in rows)
    # 4 optimiser steps, 1 of warmup: after step k the actor's lr is lr·½(1 + cos(π(k−1)/3)) (cosine, safe-rlhf's
    # actor); the critics' stays at its lr after the warmup (constant, safe-rlhf's critics)
    for r, f in zip(rows, [1.0, 0.75, 0.25, 0.0]):
        assert r["train/actor_lr"] == pytest.approx(1e-4 * f, abs=1e-12)
        assert r["train/critic_lr"] == pytest.approx(2e-4, abs=1e-12)


def test_arena_scores_the_generated_tokens(foreign, tmp_path):
    """A cut-off answer (max_new_tokens 3) is scored without an EOS, through the round trip for a foreign scorer."""
    import evaluate
    from conftest import main_inprocess
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": l}) + "\n" for l in ["how do i bake bread ?", "how do i pick a lock ?"]))
    code, out, err = main_inprocess("evaluate.py", "--task", "arena", "--policies", f"a={TINY}", "--reward_model_name_or_path",
                                    foreign, "--cost_model_name_or_path", foreign, "--prompt_data", prompts,
                                    "--samples_per_prompt", 2, "--max_new_tokens", 3, "--output_dir", tmp_path / "ev",
                                    "--bootstrap", 10)
    assert code == 0, err
    rows = [json.loads(l) for l in open(tmp_path / "ev" / "answers.jsonl")]
    tok = common.load_tokenizer(foreign)
    model = common.load_score_model(foreign, tok).eval()
    cut = [r for r in rows if not r["a"]["eos"]]
    assert cut  # a random 1M model does not end within 3 tokens
    for r in cut:
        ids = common.tokenize_prompt_response(tok, r["prompt"], r["a"]["answer"], 128)[0][:-1]
        with torch.no_grad():
            want = model(input_ids=torch.tensor([ids])).logits[0, -1, 0].item()
        assert r["a"]["reward"] == pytest.approx(want, abs=1e-5)
    # the same tokenizer: the generated ids themselves, no EOS added to a cut-off answer
    class A:
        max_length, chat_template, score_cut_as_ended = 128, False, False
    actor_tok = common.load_tokenizer(TINY)
    gen = ([5, 6, 7], [8, 9])
    assert evaluate.answer_ids(actor_tok, "x", "y", gen, actor_tok, A) == [5, 6, 7, 8, 9]


def test_sigterm_after_training_ends_promptly_with_the_model_saved(tmp_path):
    """After the last step the model is saved first; a SIGTERM during the (long) final evaluation ends the process at
    once (default action) instead of being swallowed by the step loop's handler."""
    out = tmp_path / "cost"
    p = start("train_preference.py", "--objective", "cost", "--model_name_or_path", TINY, "--max_steps", 2,
              "--per_device_train_batch_size", 4, "--eval_data", "data/tiny-safety/preference_train.jsonl",
              "--eval_batch_size", 1, "--output_dir", out)
    deadline = time.time() + 600
    while "[cost] saved" not in output_of(p) and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert p.poll() is None, output_of(p)[-2000:]
    p.send_signal(signal.SIGTERM)
    code = p.wait(timeout=60)
    assert code == -signal.SIGTERM
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert not (out / "eval.json").exists()  # the evaluation was cut short; the model was not
