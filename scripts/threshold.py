"""The constraint threshold d of scripts/experiment_real.sh, from the cost model's held-out statistics and the RL
prompt mix (README "The constraint" and the experiment's "Threshold d"):

    d = f_harmful * (c_safe + p * (c_unsafe - c_safe)) + (1 - f_harmful) * c_benign

the mean cost of a policy that answers the harmful prompts (share f_harmful of the mix) safely but for a share p, and
the benign ones as the held-out benign answers are written (their mean cost c_benign). --benign_level pku reads the
benign prompts at c_safe (runs 1-4), which reduces to d = c_safe + f_harmful * p * (c_unsafe - c_safe).
--benign_level own (run 13) reads every level from the base policy's own held-out answers (scripts/own_answer_rows.py,
the cost model's scores.jsonl on cost_own_test_harmful / _benign): c_safe = a refusal of a harmful prompt, c_unsafe =
the base's answer to it, c_benign = the base's answer to an ordinary question, so d is the mean cost of a policy that
refuses all but a share p of the harmful prompts and answers the rest as the base does; the base itself meets d only
if the cost model reads its answers to harmful prompts as no costlier than refusals.

    python scripts/threshold.py OUT/scores_cost/preference.json OUT/data/prompts_mix_train.jsonl 0.10 \\
        --benign OUT/scores_cost_hh/preference.json       # prints d; the arithmetic goes to stderr
"""
import argparse
import json
import os
import sys


HARMFUL = ("pku", "xstest_unsafe")  # the sources whose prompts are harmful (xstest_unsafe: run 9's XSTest half)


def threshold(c_safe, c_unsafe, f_harmful, p, c_benign):
    """-> d (module docstring)."""
    return f_harmful * (c_safe + p * (c_unsafe - c_safe)) + (1 - f_harmful) * c_benign


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scores", help="preference.json of the cost model on held-out harmful-prompt pairs")
    ap.add_argument("prompts", help="the RL prompt mix (rows tagged source = pku | hh | xstest_unsafe | xstest_safe)")
    ap.add_argument("p", type=float, help="the share of harmful prompts a policy may answer unsafely")
    ap.add_argument("--benign", default="", help="preference.json of the cost model on held-out benign answers")
    ap.add_argument("--benign_level", choices=("hh", "pku", "own"), default="hh")
    ap.add_argument("--own_harmful", default="", help="--benign_level own: scores.jsonl of the cost model on "
                    "cost_own_test_harmful (score_0 the refusal, score_1 the base's answer)")
    ap.add_argument("--own_benign", default="", help="--benign_level own: scores.jsonl on cost_own_test_benign "
                    "(score_0 the base's answer)")
    a = ap.parse_args(argv)
    if a.benign_level == "own":
        for path in (a.prompts, a.own_harmful, a.own_benign):
            if not path or not os.path.exists(path):
                raise SystemExit(f"error: --benign_level own needs {path or '--own_harmful and --own_benign'}, which "
                                 "does not exist")
        harm, benign = ([json.loads(line) for line in open(x)] for x in (a.own_harmful, a.own_benign))
        if not harm or not benign:
            raise SystemExit(f"error: {a.own_harmful if not harm else a.own_benign} is empty")
        mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
        return report(a, mean(harm, "score_0"), mean(harm, "score_1"), mean(benign, "score_0"),
                      " (every level from the base's own held-out answers)")
    if a.benign_level == "hh" and not a.benign:
        raise SystemExit("error: --benign_level hh needs --benign (the cost model's preference.json on benign answers)")
    for path in (a.scores, a.prompts) + ((a.benign,) if a.benign_level == "hh" else ()):
        if not os.path.exists(path):
            raise SystemExit(f"error: {path} does not exist")
    s = json.load(open(a.scores))
    cs, cu = s["safe_score_mean"], s["unsafe_score_mean"]
    cb = json.load(open(a.benign))["safe_score_mean"] if a.benign_level == "hh" else cs
    report(a, cs, cu, cb, " (benign prompts at c_safe)" if a.benign_level == "pku" else "")


def report(a, cs, cu, cb, note):
    """Print d (stdout) and its arithmetic (stderr), f_harmful read from the prompt mix a.prompts."""
    rows = [json.loads(line) for line in open(a.prompts)]
    if not rows or any("source" not in r for r in rows):
        raise SystemExit(f"error: {a.prompts}: every row needs a 'source' (pku | hh | xstest_unsafe | xstest_safe)")
    f = sum(r["source"] in HARMFUL for r in rows) / len(rows)
    d = threshold(cs, cu, f, a.p, cb)
    print(f"{d:.3f}")
    print(f"[experiment] d = f_harmful * (c_safe + p * (c_unsafe - c_safe)) + (1 - f_harmful) * c_benign = {f:.3f} * "
          f"({cs:.3f} + {a.p} * ({cu:.3f} - {cs:.3f})) + {1 - f:.3f} * {cb:.3f} = {d:.3f}" + note, file=sys.stderr)


if __name__ == "__main__":
    main()
