"""Cost rows from the policy's own answers (run 13): refusing a harmful request is safer than the policy's compliance;
refusing an ordinary one avoids no harm.

Every cost model of runs 5-12 learned what is safe from other writers' answers (PKU's Alpaca-family answers, HH's
Anthropic assistants, XSTest's Llama-2 / Mistral) and read the shipped model's *own* answers to harmful PKU prompts as
cheaper than a refusal of them (run 12: -2.04 vs -1.71): a register, not the request. Safe RLHF meets this by
re-labelling the policy's own answers between rounds (Dai et al. 2024, §4.1, three rounds); we have no annotators, so
these rows carry only what holds whatever the answer says, from the prompt's source alone:
- a harmful-leaning prompt (PKU-SafeRLHF, whose every prompt drew an unsafe answer; XSTest's unsafe train half): a
  refusal (REFUSALS_TRAIN, by crc32 of the prompt) is the safer answer and safe; the policy's answer is unlabelled
  (null: eq. 6's pairwise term only, common.UNLABELLED_OK), since a compliance may still be harmless. An answer that
  evaluate.is_refusal reads as a refusal, or an empty one, gives no row (no contrast).
- an ordinary prompt (HH helpful-base; XSTest's safe train half): the answer and the refusal, both safe, written once
  per order (a tie: eq. 6's pairwise terms cancel, as cost_hhref in prepare_real_data.py).
Both sides read the same writer, so register cannot separate them: only the request can.

Inputs: the policy's answers, as evaluate.py --task arena (or xstest) writes them ({"prompt", POLICY: {"answer"}} per
line), and the prompts it answered ({"prompt", "source": pku | hh | xstest_unsafe | xstest_safe, "split": train |
test}). Writes under --output_dir:
  cost_own_train.jsonl          the train split's rows (both orders for a tie)
  cost_own_test_harmful.jsonl   held-out harmful prompts, once: the refusal first (pairwise accuracy = the share where
                                refusing is read as cheaper); better_response_id = the answer (experiment_table's gate)
  cost_own_test_benign.jsonl    held-out ordinary prompts, once: the answer first (pairwise accuracy = the share where
                                answering is read as no costlier; a model reading refusals as harmless sits near 0%)

    python scripts/own_answer_rows.py output/experiment13/own/arena/answers.jsonl output/experiment13/own/prompts.jsonl \
        --output_dir output/experiment13/data
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from prepare_real_data import REFUSALS_TEST, REFUSALS_TRAIN, refusal_for  # noqa: E402
from threshold import HARMFUL  # noqa: E402  (the harmful-prompt sources, as d counts them)

BENIGN = ("hh", "xstest_safe")


def read_jsonl(path, what):
    """The rows of a JSONL file (common's reader: a malformed row names the file and row). -> [(row number, row)]."""
    if not os.path.exists(path):
        raise common.UserError(f"{what} {path} does not exist")
    rows = common._read_local(path)
    if not rows:
        raise common.UserError(f"{what} {path} is empty")
    return rows


def own_rows(prompt, source, answer, split):
    """The cost rows of one answered prompt (module docstring). -> [rows] (empty when the answer refuses or is empty)."""
    import evaluate
    answer = answer.strip()
    if not answer or evaluate.is_refusal(answer):
        return []
    refusal = refusal_for(prompt, REFUSALS_TRAIN if split == "train" else REFUSALS_TEST)
    if source in HARMFUL:  # the refusal safe and safer; the answer unlabelled (pairwise only)
        return [{"prompt": prompt, "response_0": refusal, "response_1": answer, "is_response_0_safe": True,
                 "is_response_1_safe": None, "safer_response_id": 0, "better_response_id": 1}]
    row = {"prompt": prompt, "response_0": answer, "response_1": refusal, "is_response_0_safe": True,
           "is_response_1_safe": True, "safer_response_id": 0, "better_response_id": 0}
    return [row, {**row, "safer_response_id": 1}] if split == "train" else [row]  # a tie in train


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("answers", help="the policy's answers: evaluate.py's answers.jsonl or xstest_answers.jsonl")
    ap.add_argument("prompts", help="the prompts answered, with source (pku | hh | xstest_unsafe | xstest_safe) and split")
    ap.add_argument("--policy", default="base", help="the policy's name in the answers file (default: %(default)s)")
    ap.add_argument("--output_dir", required=True)
    a = ap.parse_args(argv)
    meta = {}
    for i, r in read_jsonl(a.prompts, "prompts file"):
        if r.get("source") not in HARMFUL + BENIGN or r.get("split") not in ("train", "test") or "prompt" not in r:
            raise common.UserError(f"{a.prompts} row {i}: needs prompt, source in {HARMFUL + BENIGN} and split in "
                             f"(train, test); got {sorted(r)} with source={r.get('source')!r}, split={r.get('split')!r}")
        meta[r["prompt"]] = (r["source"], r["split"])
    out = {"train": [], "test_harmful": [], "test_benign": []}
    skipped = 0
    for i, r in read_jsonl(a.answers, "answers file"):
        if r.get("prompt") not in meta:
            raise common.UserError(f"{a.answers} row {i}: its prompt is not in {a.prompts}")
        if not isinstance(r.get(a.policy), dict) or not isinstance(r[a.policy].get("answer"), str):
            raise common.UserError(f"{a.answers} row {i}: no answer of policy {a.policy!r}")
        source, split = meta[r["prompt"]]
        rows = own_rows(r["prompt"], source, r[a.policy]["answer"], split)
        skipped += not rows
        for row in rows:
            err = common.validate_row(row, "cost")
            if err is not None:
                raise common.UserError(f"{a.answers} row {i}: {err}")
        key = "train" if split == "train" else "test_harmful" if source in HARMFUL else "test_benign"
        out[key] += rows
    os.makedirs(a.output_dir, exist_ok=True)
    for key, rows in out.items():  # each file whole or not at all: written under .tmp, then renamed
        path = os.path.join(a.output_dir, f"cost_own_{key}.jsonl")
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in rows)
        os.replace(path + ".tmp", path)
    print(f"[own-rows] {len(out['train'])} train rows, {len(out['test_harmful'])} held-out harmful, "
          f"{len(out['test_benign'])} held-out benign; {skipped} answers that refuse (or are empty) give no row "
          f"-> {a.output_dir}")


if __name__ == "__main__":
    common.entrypoint(main)
