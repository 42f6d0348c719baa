"""Real PKU-SafeRLHF rows for the real-model pipeline, in the project's schema, from the offline copy in
../shared/data/real (CC BY-NC 4.0: read from there at run time and written only under output/, never into the repo).

That copy is `{"prompt", "response": [safer, other]}` with exactly one safe answer per row (its README), so in the
PKU-SafeRLHF schema: response_0 = the safe answer, is_response_0_safe = true, is_response_1_safe = false,
safer_response_id = 0. Its helpfulness label (better_response_id) was not recorded, so these rows train the cost
model only. The reward model (helpfulness) reads Anthropic HH-RLHF helpful-base instead: its `chosen` dialogue is
the more helpful one (MIT), written unchanged to reward_{train,test}.jsonl (the 2 rows with chosen == rejected are
skipped there with a count). Every split is by prompt (crc32 of the prompt, or of a dialogue's first Human turn,
% 10 == 0 is held out), so no held-out prompt, nor a dialogue opening with it, was trained on.

The RL prompts mix the two as the paper mixes safety-related and ordinary prompts (§4.1): prompts_mix_{train,test}
= the harmful-leaning PKU prompts + the single-turn HH-helpful questions, each row tagged `"source": "pku" | "hh"`.

Benign answers for the cost model (run 5): every PKU row has an unsafe answer, so a cost model trained on them alone
never sees a harmless answer to an ordinary question, and calls 78% of the shipped model's answers to held-out HH
questions unsafe (run 4) -- the constraint then pays for refusing everything. cost_hh_{train,test}.jsonl are the
single-turn HH helpful-base pairs with both answers labelled safe (helpful-base asked crowdworkers for help, not for
harm: Bai et al. 2022, §2), each written twice, once per order (safer_response_id 0 and 1): eq. 6's pairwise terms of
the two copies cancel at C(y_0) = C(y_1), a tie (no harmlessness order is invented), and its classification terms push
both below 0. cost_mix_train.jsonl = cost_train + cost_hh_train. The test file has each pair once (its sign accuracy
is the share of benign answers read as safe; its pairwise accuracy means nothing).

Harmful answers in HH's register (run 6): run 5's benign rows are all HH-register and all safe, and its policy wrote
harm in that register; run 6 tested whether that style is what the cost model reads as safe (it was not: README). cost_harmless_{train,test}.jsonl are the single-turn HH-RLHF harmless-base
pairs (the same Anthropic assistants answering red-team requests; `chosen` is the less harmful answer, MIT), split
by first Human turn, as cost rows ordered by that label with both safety flags null: HH never labelled an answer
safe or unsafe, only which of two is less harmful, so eq. 6 keeps their pairwise term and no classification term
(common.UNLABELLED_OK). cost_mix2_train.jsonl = cost_mix_train + cost_harmless_train. cost_test_hedged.jsonl is the
held-out PKU pairs with run 5's policy's opening (HEDGE) put before each unsafe answer: a cost model that reads the
content scores those answers as it scores them without it.

Refusals as unhelpful answers (run 7): the HH-helpful pairs compare two attempts to help, so the reward model never
sees a refusal of an ordinary request and barely tells one from an answer (run 4: its policy's capability disclaimers
on benign HH questions cost it no reward). reward_refusal_{train,test}.jsonl pair each single-turn HH-helpful
dialogue of the split, chosen = its `chosen` dialogue unchanged, rejected = the same dialogue with the last Assistant
turn replaced by a refusal (a refusal of a request people make for help is the less helpful answer: the helpfulness
axis of Safe RLHF's annotation, §3.1 / App. D, which asks how well a response addresses the request, whatever its
harm). The refusals are our own sentences, REFUSALS_TRAIN for training and REFUSALS_TEST (other wordings) for the
held-out check, chosen per dialogue by a crc32 of its first turn. reward_refmix_train.jsonl = reward_train +
reward_refusal_train. No PKU prompt is used (its helpfulness was not recorded), no XSTest prompt either.

An independent check of both score models (never trained on): xstest_pairs_{unsafe,safe}.jsonl pair, per XSTest v2
prompt, Llama-2-70b-chat's and Mistral-7B-Instruct's answers where the human labels say one refused and the other
fully complied (CC BY 4.0). On an unsafe prompt the refusal is the safe answer (is_response_*_safe from the labels);
on a safe prompt both are safe. On both, better_response_id = the compliance (helpfulness alone) and
safer_response_id = the refusal on unsafe prompts, the compliance on safe ones (nothing to avoid there).

    python scripts/prepare_real_data.py                      # -> output/real-data/*.jsonl
"""
import argparse
import csv
import gzip
import json
import os
import sys
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.path.join(ROOT, "..", "shared", "data", "real")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=os.path.join(REAL, "pku_saferlhf_safe-vs-unsafe_5k.json"),
                    help="the PKU-SafeRLHF safe-vs-unsafe file (default: %(default)s)")
    ap.add_argument("--output_dir", default=os.path.join(ROOT, "output", "real-data"), help="(default: %(default)s)")
    ap.add_argument("--helpful", default=os.path.join(REAL, "hh-rlhf_helpful-base_test.jsonl.gz"),
                    help="HH-RLHF helpful-base dialogues (default: %(default)s)")
    ap.add_argument("--harmless", default=os.path.join(REAL, "hh-rlhf_harmless-base_test.jsonl.gz"),
                    help="HH-RLHF harmless-base dialogues (default: %(default)s)")
    ap.add_argument("--xstest_dir", default=REAL, help="folder of XSTest v2's prompts and two labelled completion files "
                    "(default: %(default)s)")
    a = ap.parse_args()
    if not os.path.exists(a.source):
        raise SystemExit(f"error: {a.source} does not exist (the real rows live in ../shared/data/real)")
    rows = json.load(open(a.source))
    split = {"train": [], "test": []}
    for r in rows:  # a stable split by prompt (crc32 is the same on every machine, unlike hash())
        split["test" if zlib.crc32(r["prompt"].encode()) % 10 == 0 else "train"].append(r)
    os.makedirs(a.output_dir, exist_ok=True)
    for name, part in split.items():
        pairs = [{"prompt": r["prompt"], "response_0": r["response"][0], "response_1": r["response"][1],
                  "is_response_0_safe": True, "is_response_1_safe": False, "safer_response_id": 0} for r in part]
        prompts = list(dict.fromkeys(r["prompt"] for r in part))
        files = {f"cost_{name}.jsonl": pairs,
                 f"sft_{name}.jsonl": [{"prompt": r["prompt"], "response": r["response"][0]} for r in part],
                 f"prompts_{name}.jsonl": [{"prompt": p} for p in prompts]}
        for fname, out in files.items():
            with open(os.path.join(a.output_dir, fname), "w") as f:
                f.writelines(json.dumps(x) + "\n" for x in out)
        print(f"[real-data] {name}: {len(pairs)} pairs over {len(prompts)} prompts -> {a.output_dir}")
    write_helpful(a.helpful, a.output_dir, {n: list(dict.fromkeys(r["prompt"] for r in p)) for n, p in split.items()})
    write_harmless(a.harmless, a.output_dir)
    with open(os.path.join(a.output_dir, "cost_test_hedged.jsonl"), "w") as f:
        f.writelines(json.dumps({**r, "response_1": HEDGE + r["response_1"]}) + "\n" for r in
                     (json.loads(line) for line in open(os.path.join(a.output_dir, "cost_test.jsonl"))))
    write_xstest_pairs(a.xstest_dir, a.output_dir)
    write_pku_refusal_check(a.output_dir)
    write_xstest_split(a.xstest_dir, a.output_dir)


def first_turn(dialogue):
    """The first Human turn of an HH-RLHF dialogue "\n\nHuman: ...\n\nAssistant: ..."."""
    return dialogue.split("\n\nAssistant:")[0].removeprefix("\n\nHuman:").strip()


def write_helpful(path, out_dir, pku_prompts):
    """reward_{train,test}.jsonl (HH helpful-base rows, split by first Human turn) and prompts_mix_{train,test}.jsonl
    (the PKU prompts of that split, then the split's single-turn HH questions), prompts_hh_test.jsonl."""
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} does not exist (the real rows live in ../shared/data/real)")
    rows = [json.loads(line) for line in gzip.open(path, "rt")]
    same = sum(r["chosen"] == r["rejected"] for r in rows)
    rows = [r for r in rows if r["chosen"] != r["rejected"]]
    sys.path.insert(0, ROOT)
    import common  # the rule every stage applies to an HH dialogue pair: one dialogue, differing in its last turn
    valid = [r for r in rows if common.from_chosen_rejected(r)[0] is not None]
    bad, rows = len(rows) - len(valid), valid
    for name in ("train", "test"):
        part = [r for r in rows if (zlib.crc32(first_turn(r["chosen"]).encode()) % 10 == 0) == (name == "test")]
        with open(os.path.join(out_dir, f"reward_{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
        hh = list(dict.fromkeys(first_turn(r["chosen"]) for r in part if r["chosen"].count("\n\nHuman:") == 1))
        mix = [{"prompt": p, "source": "pku"} for p in pku_prompts[name]] + [{"prompt": p, "source": "hh"} for p in hh]
        with open(os.path.join(out_dir, f"prompts_mix_{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in mix)
        if name == "test":
            with open(os.path.join(out_dir, "prompts_hh_test.jsonl"), "w") as f:
                f.writelines(json.dumps({"prompt": p}) + "\n" for p in hh)
        benign = write_benign_cost(part, out_dir, name)
        refusals = write_refusal_pairs(part, out_dir, name)
        write_refusal_cost(out_dir, name)
        print(f"[real-data] helpful {name}: {len(part)} pairs; RL prompts {len(pku_prompts[name])} PKU + {len(hh)} HH"
              + (f" ({same} rows with chosen == rejected, {bad} that are not one dialogue skipped)" if name == "train" else "")
              + f"; benign cost rows {benign}; refusal pairs {refusals}")
    concat(out_dir, "cost_mix_train", ("cost_train", "cost_hh_train"))
    concat(out_dir, "reward_refmix_train", ("reward_train", "reward_refusal_train"))
    concat(out_dir, "cost_mix3_train", ("cost_mix_train", "cost_hhref_train"))


def concat(out_dir, target, names):
    """out_dir/target.jsonl = the files out_dir/<name>.jsonl one after another (a mixed training set)."""
    with open(os.path.join(out_dir, f"{target}.jsonl"), "w") as f:
        for name in names:
            f.writelines(open(os.path.join(out_dir, f"{name}.jsonl")))


# run 7's refusals (module docstring): plain apologies, "I cannot", AI-identity and capability disclaimers, the forms
# run 4's policy and the XSTest refusals take; the held-out check reads wordings the reward model never trained on
REFUSALS_TRAIN = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, I cannot assist with that request.",
    "I can't provide that information.",
    "As an AI, I'm not able to help with this.",
    "I do not have the ability to help with that.",
    "I'm not able to answer that question.",
    "Sorry, but that's not something I can help with.",
    "I apologize, but I must decline this request.",
    "I am not equipped to provide advice on this topic.",
    "Unfortunately, I can't assist with this. Is there anything else I can do for you?",
    "I won't be able to help you with that.",
    "That is not something I can discuss.",
    "I'm afraid I can't do that.",
    "As a language model, I cannot provide this kind of information.",
    "I'm unable to assist with that request.",
    "I must refuse to answer this question.",
)
REFUSALS_TEST = (
    "Sorry, I can't answer that.",
    "I'm not able to provide help with this request.",
    "As an AI assistant, I cannot help with that.",
    "I do not have the authority to advise on this.",
    "I'd rather not help with that.",
    "Apologies, but I cannot provide an answer to this.",
)


def refusal_for(key, refusals):
    """The refusal a prompt gets: refusals[crc32("refusal " + key) % their number] (a hash of its own: crc32(key) % 10
    is the split, so its residues mod 6 or 16 are not uniform there)."""
    return refusals[zlib.crc32(("refusal " + key).encode()) % len(refusals)]


def write_refusal_pairs(part, out_dir, name):
    """reward_refusal_{name}.jsonl: per single-turn HH-helpful dialogue of the split whose chosen answer is not empty,
    {"chosen": that dialogue, "rejected": the same with a refusal as the answer} (module docstring); the refusal is
    REFUSALS_TRAIN or REFUSALS_TEST[crc32("refusal " + first turn) % their number]. -> the number of pairs written."""
    import common
    refusals = REFUSALS_TRAIN if name == "train" else REFUSALS_TEST
    out = []
    for r in part:
        pair, err = common.from_chosen_rejected(r)
        if r["chosen"].count("\n\nHuman:") != 1 or err or not pair["response_0"].strip():
            continue
        i = r["chosen"].rfind(common.HH_TURN) + len(common.HH_TURN)
        refusal = refusal_for(first_turn(r["chosen"]), refusals)
        out.append({"chosen": r["chosen"], "rejected": r["chosen"][:i] + " " + refusal})
    with open(os.path.join(out_dir, f"reward_refusal_{name}.jsonl"), "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in out)
    return len(out)


def write_refusal_cost(out_dir, name):
    """cost_hhref_{name}.jsonl: reward_refusal_{name}'s pairs as cost rows (run 8): the HH answer and the refusal of
    the same ordinary question, both safe; in train each pair twice, once per order (a tie, as cost_hh), in test once
    with the answer as response_0 (pairwise accuracy = the share of questions where answering is read as cheaper than
    refusing; a model that reads refusals as harmless whatever the prompt sits near 0%). Refusing a request people
    make for help avoids no harm (Safe RLHF §3.1: harmlessness is judged against the request), so the cost model
    must not pay for it; only the reward model (run 7) says it is the less helpful answer."""
    dialogues = (json.loads(line) for line in open(os.path.join(out_dir, f"reward_refusal_{name}.jsonl")))
    return write_tied_cost(dialogues, os.path.join(out_dir, f"cost_hhref_{name}.jsonl"), name)


def write_pku_refusal_check(out_dir):
    """cost_pkuref_test.jsonl: per held-out PKU prompt, a refusal (REFUSALS_TEST, by crc32 of the prompt) against the
    prompt's first unsafe answer, the refusal safer (run 8): does the cost model still read a refusal of a harmful
    request as cheaper than complying, once it has learned that refusing an ordinary one is not (cost_hhref)?
    better_response_id = the compliance, so the reward model scores the same rows (experiment_table's gate: what
    R − λC prefers on held-out pairs of the training sources)."""
    out, seen = [], set()
    for r in (json.loads(line) for line in open(os.path.join(out_dir, "cost_test.jsonl"))):
        if r["prompt"] in seen:
            continue
        seen.add(r["prompt"])
        refusal = refusal_for(r["prompt"], REFUSALS_TEST)
        out.append({"prompt": r["prompt"], "response_0": refusal, "response_1": r["response_1"],
                    "is_response_0_safe": True, "is_response_1_safe": False, "safer_response_id": 0,
                    "better_response_id": 1})  # helpfulness alone: the compliance (as in xstest_pairs)
    with open(os.path.join(out_dir, "cost_pkuref_test.jsonl"), "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in out)


def write_benign_cost(part, out_dir, name):
    """cost_hh_{name}.jsonl: the single-turn HH helpful-base pairs of this split as cost rows, both answers safe, each
    pair twice (safer_response_id 0 and 1: a tie) in train, once in test (module docstring). -> the number of rows."""
    single = (r for r in part if r["chosen"].count("\n\nHuman:") == 1)
    return write_tied_cost(single, os.path.join(out_dir, f"cost_hh_{name}.jsonl"), name)


def write_tied_cost(dialogues, path, name):
    """path: each HH dialogue pair {chosen, rejected} as a cost row with both answers safe, twice in train (safer_response_id
    0 and 1: eq. 6's pairwise terms tie them) and once in test (chosen's answer as response_0). A pair that is not one
    dialogue, or has an empty answer, is left out (no cost row may be invalid). -> the number of rows written."""
    import common
    out = []
    for r in dialogues:
        pair, err = common.from_chosen_rejected(r)
        if err:
            continue
        row = {"prompt": pair["prompt"], "response_0": pair["response_0"], "response_1": pair["response_1"],
               "is_response_0_safe": True, "is_response_1_safe": True, "safer_response_id": 0,
               "better_response_id": 0}  # chosen: the more helpful (the reward model reads these rows too)
        if common.validate_row(row, "cost") is not None:
            continue
        out += [row] + ([{**row, "safer_response_id": 1}] if name == "train" else [])
    with open(path, "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in out)
    return len(out)


# run 5's PPO-Lagrangian policy opened 53% of its XSTest answers this way, then complied (README, run 5)
HEDGE = "While there is no one-size-fits-the-box solution, there are various methods. "


def write_harmless(path, out_dir):
    """cost_harmless_{train,test}.jsonl: the single-turn HH harmless-base pairs split by first Human turn (crc32 % 10
    == 0 held out), response_0 = the less harmful answer, both safety flags null (module docstring); a pair that is
    not one valid dialogue pair or not a valid cost row is left out and counted. cost_mix2_train.jsonl at the end."""
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} does not exist (the real rows live in ../shared/data/real)")
    import common
    out, bad = {"train": [], "test": []}, 0
    for line in gzip.open(path, "rt"):
        r = json.loads(line)
        if r["chosen"].count("\n\nHuman:") != 1:
            continue
        pair, err = common.from_chosen_rejected(r)
        row = None if err else {"prompt": pair["prompt"], "response_0": pair["response_0"],
                                "response_1": pair["response_1"], "is_response_0_safe": None,
                                "is_response_1_safe": None, "safer_response_id": 0}
        if row is None or common.validate_row(row, "cost") is not None:
            bad += 1
            continue
        out["test" if zlib.crc32(first_turn(r["chosen"]).encode()) % 10 == 0 else "train"].append(row)
    for name, rows in out.items():
        with open(os.path.join(out_dir, f"cost_harmless_{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in rows)
    concat(out_dir, "cost_mix2_train", ("cost_mix_train", "cost_harmless_train"))
    print(f"[real-data] harmless single-turn pairs: {len(out['train'])} train, {len(out['test'])} test ({bad} invalid "
          f"left out)")


XSTEST_MODELS = ("llama2new", "mistralinstruct")


def read_xstest(folder):
    """-> (the rows of XSTest v2's prompts file, [{prompt: labelled answer row} per XSTEST_MODELS]) from folder."""
    paths = [os.path.join(folder, "xstest_v2_prompts.csv")]
    paths += [os.path.join(folder, f"xstest_v2_completions_{m}_labelled.csv") for m in XSTEST_MODELS]
    for p in paths:
        if not os.path.exists(p):
            raise SystemExit(f"error: {p} does not exist (the real rows live in ../shared/data/real)")
    table = list(csv.DictReader(open(paths[0], newline="")))
    return table, [{r["prompt"]: r for r in csv.DictReader(open(p, newline=""))} for p in paths[1:]]


def xstest_pair(prompt, unsafe, comply, refusal):
    """A compliance and a refusal of an XSTest prompt as a row of the PKU-SafeRLHF schema: the compliance at
    crc32(prompt) % 2, so no reading of a position can pass for a reading of the answers; better_response_id = the
    compliance (helpfulness alone; the cost model does not read it); on an unsafe prompt the compliance is unsafe and the refusal the safer, on a safe
    one both are safe and the compliance the safer (nothing to avoid there)."""
    c = zlib.crc32(prompt.encode()) % 2
    resp = [None, None]
    resp[c], resp[1 - c] = comply, refusal
    return {"prompt": prompt, "response_0": resp[0], "response_1": resp[1],
            "is_response_0_safe": not (unsafe and c == 0), "is_response_1_safe": not (unsafe and c == 1),
            "better_response_id": c, "safer_response_id": 1 - c if unsafe else c}


def write_xstest_pairs(folder, out_dir):
    """xstest_pairs_{unsafe,safe}.jsonl: per XSTest v2 prompt whose two labelled answers (XSTEST_MODELS) are one
    refusal (human final_label 2_full_refusal or 3_partial_refusal) and one full compliance (1_full_compliance), the
    pair in the PKU-SafeRLHF schema (xstest_pair, module docstring) with the prompt's type."""
    table, answers = read_xstest(folder)
    out = {"unsafe": [], "safe": []}
    for row in table:
        prompt, lab = row["prompt"], row["label"]
        if not all(prompt in a for a in answers):
            continue  # a prompt one completion file lacks (1 of 450 in v2)
        pair = [a[prompt] for a in answers]
        kinds = [r["final_label"][:1] for r in pair]  # 1 compliance, 2 full refusal, 3 partial refusal
        if sorted(k == "1" for k in kinds) != [False, True]:
            continue  # both complied or both refused: no contrast
        comply, refuse = (pair[0], pair[1]) if kinds[0] == "1" else (pair[1], pair[0])
        out[lab].append({**xstest_pair(prompt, lab == "unsafe", comply["completion"].strip(),
                                       refuse["completion"].strip()), "type": comply["type"]})
    for lab, rows in out.items():
        with open(os.path.join(out_dir, f"xstest_pairs_{lab}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"[real-data] XSTest refusal-vs-compliance pairs: {len(out['unsafe'])} unsafe prompts, {len(out['safe'])} safe")


XSTEST_REPEAT = 5  # run 9: each XSTest training row this many times in cost_mix9_train (~1,000 of ~8,100 rows)
XSTEST_REPEAT_10 = 15  # run 10: this many times in cost_mix10_train (~2,900 of ~10,000 rows; in run 10's 300 steps of
                       # 4 pairs each row is drawn ~1.8 times, run 9's ~1.5)


def xstest_half(prompt):
    """"train" or "test": run 9's split of XSTest v2 by prompt, a crc32 of its own (the pair files put the compliance
    at crc32(prompt) % 2, so the split must not follow that parity)."""
    return "train" if zlib.crc32(("xstest split " + prompt).encode()) % 2 == 0 else "test"


def write_xstest_split(folder, out_dir):
    """Run 9, a coverage test, not the independent XSTest measure: half of XSTest v2's prompts (xstest_half) train, the
    other half evaluates. Every cost model of runs 2-8 reads answering XSTest's safe prompts as costlier than refusing
    them (69-82% of pairs) because no training row pairs a benign request that sounds harmful with a safe answer;
    run 9 asks whether Safe RLHF on this model refuses selectively once such rows exist. Writes:
    - cost_xstest_train.jsonl: per train-half prompt with a human-labelled full compliance (XSTEST_MODELS' answers),
      that compliance against a refusal (the other model's labelled refusal, else REFUSALS_TRAIN by crc32): on an
      unsafe prompt the refusal is safe and safer, the compliance unsafe; on a safe prompt both are safe and the
      compliance is the safer (the README's "what we would try next": a benign request answered is not to be avoided,
      and refusing it is what XSTest counts as failure; xstest_pair).
    - cost_mix9_train.jsonl = cost_mix3_train (run 8) + cost_xstest_train XSTEST_REPEAT times; cost_mix10_train.jsonl
      the same with XSTEST_REPEAT_10 (run 10).
    - cost_xstest_train_{unsafe,safe}.jsonl: cost_xstest_train by the prompt's label (does a model fit its own rows?).
    - prompts_mix9_train.jsonl = prompts_mix_train + the train-half prompts (source xstest_unsafe | xstest_safe).
    - xstest_heldout.csv (the prompts file of the held-out half, for evaluate.py --task xstest) and
      xstest_pairs_{unsafe,safe}_heldout.jsonl (xstest_pairs_* on the held-out half)."""
    import common
    table, answers = read_xstest(folder)
    rows, prompts, skipped, by_label = [], [], 0, {"unsafe": [], "safe": []}
    for r in table:
        if xstest_half(r["prompt"]) != "train":
            continue
        prompts.append({"prompt": r["prompt"], "source": f"xstest_{r['label']}"})
        got = [a[r["prompt"]] for a in answers if r["prompt"] in a]
        comply = [g["completion"].strip() for g in got if g["final_label"].startswith("1")]
        refuse = [g["completion"].strip() for g in got if g["final_label"][:1] in ("2", "3")]
        if not comply or not comply[0]:
            skipped += 1  # both models refused: no safe compliance to teach (nor an unsafe one on an unsafe prompt)
            continue
        refusal = refuse[0] if refuse and refuse[0] else \
            refusal_for(r["prompt"], REFUSALS_TRAIN)
        row = xstest_pair(r["prompt"], r["label"] == "unsafe", comply[0], refusal)
        err = common.validate_row(row, "cost")
        if err is not None:
            raise SystemExit(f"error: XSTest prompt {r['prompt']!r}: {err}")
        rows.append(row)
        by_label[r["label"]].append(row)
    with open(os.path.join(out_dir, "cost_xstest_train.jsonl"), "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in rows)
    concat(out_dir, "cost_mix9_train", ("cost_mix3_train",) + ("cost_xstest_train",) * XSTEST_REPEAT)
    concat(out_dir, "cost_mix10_train", ("cost_mix3_train",) + ("cost_xstest_train",) * XSTEST_REPEAT_10)
    for lab, got in by_label.items():
        with open(os.path.join(out_dir, f"cost_xstest_train_{lab}.jsonl"), "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in got)
    with open(os.path.join(out_dir, "prompts_xstest_train.jsonl"), "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in prompts)
    concat(out_dir, "prompts_mix9_train", ("prompts_mix_train", "prompts_xstest_train"))
    held = [r for r in table if xstest_half(r["prompt"]) == "test"]
    with open(os.path.join(out_dir, "xstest_heldout.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(held)
    for lab in ("unsafe", "safe"):
        pairs = [json.loads(line) for line in open(os.path.join(out_dir, f"xstest_pairs_{lab}.jsonl"))]
        with open(os.path.join(out_dir, f"xstest_pairs_{lab}_heldout.jsonl"), "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in pairs if xstest_half(p["prompt"]) == "test")
    n_safe = sum(r["source"] == "xstest_safe" for r in prompts)
    print(f"[real-data] XSTest split (run 9): {len(prompts)} train prompts ({n_safe} safe), {len(rows)} cost rows "
          f"({skipped} with no compliance left out); {len(held)} held-out prompts")


if __name__ == "__main__":
    main()
