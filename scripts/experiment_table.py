"""The result table of scripts/experiment_real.sh, from the files its stages wrote under OUT (markdown on stdout).

Per policy: XSTest unsafe compliance and over-refusal (evaluate.is_refusal), the cost model's unsafe rate and mean
cost on held-out PKU prompts, the reward model's mean reward and the win rate against the base policy on held-out
HH-helpful prompts and the share of those answers that refuse (evaluate.is_refusal: over-refusal of ordinary
questions), the mean answer length (words) and the fraction of answers that ended with EOS; all with 95%
bootstrap CIs. Then the score models' held-out accuracy (and on the XSTest refusal-vs-compliance pairs), the threshold d, the RL runs' last-rollout monitors (reward
hacking shows here: length, EOS fraction, KL) and each stage's wall time.

    python scripts/experiment_table.py output/experiment > output/experiment/results.md
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from evaluate import bootstrap_ci, is_refusal  # noqa: E402


# the checks on answers the RL never scores: benign HH answers, and the XSTest refusal-vs-compliance pairs
# (scripts/prepare_real_data.py): what "pairwise accuracy" counts on each
CHECK_SCORES = (("cost_hh", "cost, held-out benign HH answers (both safe: sign = share read as safe)"),
                ("cost_harmless", "cost, held-out HH harmless-base pairs (less harmful cheaper; no safety labels)"),
                ("cost_hedged", "cost, held-out PKU pairs, run 5's hedged opening before each unsafe answer"),
                ("cost_hhref", "cost, held-out HH questions: answering no costlier than refusing (both safe)"),
                ("cost_pkuref", "cost, held-out PKU prompts: a refusal cheaper than the unsafe answer"),
                ("reward_refusal", "reward, held-out HH questions: the answer > a refusal (wordings never trained on)"),
                ("xstest_reward_safe", "reward, XSTest safe prompts (compliance > refusal)"),
                ("xstest_reward_unsafe", "reward, XSTest unsafe prompts (compliance > refusal: helpfulness alone)"),
                ("xstest_cost_unsafe", "cost, XSTest unsafe prompts (refusal cheaper than compliance)"),
                ("xstest_cost_safe", "cost, XSTest safe prompts (compliance cheaper; both safe)"),
                ("own_cost_harmful", "cost, held-out PKU prompts: a refusal cheaper than the base's own answer (run 13)"),
                ("own_cost_benign", "cost, held-out HH questions: the base's own answer no costlier than a refusal"))


def load(path):
    return json.load(open(path)) if os.path.exists(path) else None


def pct(ci):
    return "—" if ci is None else f"{ci[0]:.1%} [{ci[1]:.1%}, {ci[2]:.1%}]"


def num(ci):
    return "—" if ci is None else f"{ci[0]:.2f} [{ci[1]:.2f}, {ci[2]:.2f}]"


def answers(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def hedge_probe(out):
    """The cost model's reading of run 5's hedged opening (scripts/prepare_real_data.py HEDGE): per held-out PKU pair
    k of scores_cost_hedged (the first n pairs of cost_test, the opening put before the unsafe answer, response_1),
    the unsafe answer's cost with the opening minus without (scores_cost), with a bootstrap CI, and the share of those
    answers read unsafe (cost > 0) without and with it. None if either score file is missing."""
    paths = [os.path.join(out, d, "scores.jsonl") for d in ("scores_cost", "scores_cost_hedged")]
    if not all(os.path.exists(p) for p in paths):
        return None
    plain, hedged = (answers(p) for p in paths)
    if len(hedged) > len(plain) or any(a["prompt"] != b["prompt"] for a, b in zip(plain, hedged)):
        raise SystemExit(f"{paths[1]}: its pairs are not the first {len(hedged)} of {paths[0]}")
    plain = plain[:len(hedged)]
    return {"n": len(hedged), "shift": bootstrap_ci([b["score_1"] - a["score_1"] for a, b in zip(plain, hedged)]),
            "unsafe_plain": bootstrap_ci([float(a["score_1"] > 0) for a in plain]),
            "unsafe_hedged": bootstrap_ci([float(b["score_1"] > 0) for b in hedged])}


LAMBDAS = (0.0, 0.5, 1.0, 2.0, 5.0)  # λ = 5 is the RL runs' cap (ppo_lagrangian.py --lambda_max)


# the pairs lagrangian_preference reads: per side (refusal should win | should lose), the reward and cost models'
# scores and the pairs file (better_response_id = the compliance). XSTest's human-labelled answers are a diagnostic
# (they are the test); the held-out pairs of the training sources are a gate a model may be chosen by.
XSTEST_PAIRS = {lab: (f"scores_xstest_reward_{lab}", f"scores_xstest_cost_{lab}", f"xstest_pairs_{lab}_eval")
                for lab in ("unsafe", "safe")}
SOURCE_PAIRS = {"unsafe": ("scores_reward_pkuref", "scores_cost_pkuref", "cost_pkuref_test_eval"),
                "safe": ("scores_reward_hhref", "scores_cost_hhref", "cost_hhref_test_eval")}
# run 10: the cost model's own XSTest training rows (XSTEST_HALF), split by the prompt's label: is it fitted at all?
# run 13 (OWN_ROWS): held-out PKU and HH prompts, the base policy's own answer against a refusal (own_answer_rows.py)
OWN_PAIRS = {"unsafe": ("scores_own_reward_harmful", "scores_own_cost_harmful", "cost_own_test_harmful_eval"),
             "safe": ("scores_own_reward_benign", "scores_own_cost_benign", "cost_own_test_benign_eval")}
FIT_PAIRS = {lab: (f"scores_fit_reward_{lab}", f"scores_fit_cost_{lab}", f"cost_xstest_train_{lab}_eval")
             for lab in ("unsafe", "safe")}


def lagrangian_preference(out, sets=XSTEST_PAIRS, lambdas=LAMBDAS):
    """What the RL objective prefers on refusal-vs-compliance pairs (run 8), before any RL: per pair, the refusal wins
    at multiplier λ when R(refusal) − λ·C(refusal) > R(compliance) − λ·C(compliance) (the per-answer score
    PPO-Lagrangian maximises, Safe RLHF eq. 10-11, without the KL term), from the reward and cost models' scores
    (OUT/<scores dir>/scores.jsonl, in the order of OUT/data/<pairs>.jsonl, whose better_response_id is the
    compliance). sets: {"unsafe" | "safe": (reward scores dir, cost scores dir, pairs file)}: XSTEST_PAIRS (XSTest's
    prompts, a diagnostic) or SOURCE_PAIRS (held-out PKU prompts refused vs complied unsafely, held-out HH questions
    answered vs refused: a gate on the training sources). -> {label: [(λ, share of pairs where the refusal wins, CI)],
    "n": {label: pairs}}, or None if a file is missing. A policy can only learn to refuse selectively if, at the λ
    it reaches, the refusal wins on most unsafe pairs and on few safe ones."""
    res = {"n": {}}
    for lab in ("unsafe", "safe"):
        r_dir, c_dir, pairs_name = sets[lab]
        paths = [os.path.join(out, d, "scores.jsonl") for d in (r_dir, c_dir)]
        paths.append(os.path.join(out, "data", f"{pairs_name}.jsonl"))
        if not all(os.path.exists(p) for p in paths):
            return None
        rew, cost, pairs = (answers(p) for p in paths)
        if not len(rew) == len(cost) == len(pairs) or any(a["prompt"] != b["prompt"] or a["prompt"] != c["prompt"]
                                                          for a, b, c in zip(rew, cost, pairs)):
            raise SystemExit(f"{paths[0]}, {paths[1]}: their rows are not the pairs of {paths[2]}")
        rows = []
        for lam in lambdas:
            wins = []
            for r, c, p in zip(rew, cost, pairs):
                comply = p["better_response_id"]
                score = [r[f"score_{i}"] - lam * c[f"score_{i}"] for i in (0, 1)]
                wins.append(float(score[1 - comply] > score[comply]))
            rows.append((lam, bootstrap_ci(wins)))
        res[lab], res["n"][lab] = rows, len(pairs)
    return res


def main(out):
    xs, pku, hh = (load(os.path.join(out, d, f)) for d, f in
                   (("xstest", "xstest.json"), ("arena_pku", "arena.json"), ("arena_hh", "arena.json")))
    names = list((xs or pku or hh or {"policies": {}})["policies"])
    rows_pku = answers(os.path.join(out, "arena_pku", "answers.jsonl"))
    rows_hh = answers(os.path.join(out, "arena_hh", "answers.jsonl"))
    lines = ["| policy | XSTest unsafe compliance ↓ | XSTest over-refusal ↓ | PKU unsafe (cost > 0) ↓ | PKU mean cost ↓ | "
             "HH reward ↑ | HH win rate vs base ↑ | HH answers refused ↓ | answer words | ends with EOS |", "|---" * 10 + "|"]
    for n in names:
        x = xs["policies"].get(n) if xs else None
        p = pku["policies"].get(n) if pku else None
        h = hh["policies"].get(n) if hh else None
        if hh and n != names[0]:
            w = hh["pairs"][f"{names[0]}_vs_{n}"]["reward_win_rate"]  # base beats n -> n beats base = 1 − that
            win = (1 - w[0], 1 - w[2], 1 - w[1])
        else:
            win = None
        refused = bootstrap_ci([float(is_refusal(r[n]["answer"])) for r in rows_hh]) if rows_hh else None
        both = rows_pku + rows_hh
        words = bootstrap_ci([len(r[n]["answer"].split()) for r in both]) if both else None
        eos = bootstrap_ci([float(r[n]["eos"]) for r in both]) if both else None
        lines.append(f"| {n} | {pct(x and x['compliance_rate_unsafe'])} | {pct(x and x['refusal_rate_safe'])} | "
                     f"{pct(p and p['unsafe_rate'])} | {num(p and p['cost'])} | {num(h and h['reward'])} | "
                     f"{pct(win) if win else '(base)'} | {pct(refused)} | {num(words)} | {pct(eos)} |")
    lines += ["", "| score model | held-out pairs | pairwise accuracy | sign accuracy (cost > 0 = unsafe) | "
              "safe / unsafe mean score |", "|---|---|---|---|---|"]
    for kind, name in (("reward", "reward"), ("cost", "cost")) + CHECK_SCORES:
        s = load(os.path.join(out, f"scores_{kind}", "preference.json"))
        if s:
            means = " / ".join(f"{s[k]:.2f}" if k in s else "—" for k in ("safe_score_mean", "unsafe_score_mean"))
            lines.append(f"| {name} | {s['n_pairs']} | {pct(s['accuracy'])} | {pct(s.get('sign_accuracy'))} | {means} |")
    probe = hedge_probe(out)
    if probe:
        lines.append(f"| cost, the hedged opening's effect on the {probe['n']} unsafe answers (hedged − plain; share "
                     f"read unsafe plain → hedged) | {probe['n']} | {num(probe['shift'])} | "
                     f"{pct(probe['unsafe_plain'])} → {pct(probe['unsafe_hedged'])} | |")
    for kind in ("reward", "cost"):  # the learning curve: held-out rows logged during training (--eval_every)
        path = os.path.join(out, kind, "metrics.jsonl")
        rows = [r for r in (json.loads(line) for line in open(path)) if "eval/accuracy" in r] if os.path.exists(path) else []
        if rows:
            lines.append(f"| {kind} learning curve (step: pairwise{' / sign' if kind == 'cost' else ''}, n held-out) | " + ", ".join(
                f"{r['step']}: {r['eval/accuracy']:.1%}" + (f" / {r['eval/sign_accuracy']:.1%}" if "eval/sign_accuracy" in r else "")
                + f" (n={int(r['eval/n_pairs'])})" for r in rows) + " | | | |")
    for sets, what, sides in ((XSTEST_PAIRS, "XSTest's refusal-vs-compliance pairs", ("unsafe", "safe")),
                              (SOURCE_PAIRS, "held-out pairs of the training sources (the gate)",
                               ("PKU prompts, refusal vs unsafe answer", "HH questions, answer vs refusal")),
                              (FIT_PAIRS, "the cost model's own XSTest training rows (in-sample fit)",
                               ("unsafe", "safe")),
                              (OWN_PAIRS, "held-out prompts answered by the base policy itself (the gate of run 13)",
                               ("PKU prompts, refusal vs the base's answer", "HH questions, the base's answer vs refusal"))):
        pref = lagrangian_preference(out, sets)
        if pref:
            lines += ["", f"What R − λ·C prefers on {what} (before RL; {pref['n']['unsafe']} / {pref['n']['safe']} "
                      "prompts): the share where the refusal scores higher",
                      "", f"| λ | {sides[0]}: refusal wins ↑ | {sides[1]}: refusal wins ↓ |", "|---|---|---|"]
            lines += [f"| {u[0]:g} | {pct(u[1])} | {pct(s[1])} |" for u, s in zip(pref["unsafe"], pref["safe"])]
    if os.path.exists(os.path.join(out, "threshold.txt")):
        lines += ["", f"Threshold d = {open(os.path.join(out, 'threshold.txt')).read().strip()}"]
    keys = ["train/reward", "train/cost", "train/unsafe_rate", "train/episode_cost", "train/lambda",
            "train/kl_divergence", "train/mean_generated_length", "train/eos_fraction"]
    lines += ["", "| RL run | rollouts | " + " | ".join(k.removeprefix("train/") + " (first → last)" for k in keys) + " |",
              "|---" * (len(keys) + 2) + "|"]
    for run in ("ppo", "ppo_lag", "shaping"):
        path = os.path.join(out, run, "metrics.jsonl")
        if not os.path.exists(path):
            continue
        m = [r for r in (json.loads(line) for line in open(path)) if "train/reward" in r]
        cell = lambda k: f"{m[0][k]:.2f} → {m[-1][k]:.2f}" if m and k in m[-1] else "—"  # noqa: E731
        lines.append(f"| {run} | {m[-1]['step'] if m else 0} | " + " | ".join(cell(k) for k in keys) + " |")
    wt = os.path.join(out, "wall_times.tsv")
    if os.path.exists(wt):
        lines += ["", "| stage | wall time (s) |", "|---|---|"]
        lines += [f"| {a} | {b} |" for a, b in (line.split("\t") for line in open(wt).read().split("\n") if line)]
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        raise SystemExit("usage: python scripts/experiment_table.py OUT (the folder experiment_real.sh wrote)")
    main(sys.argv[1])
