"""Real PKU-SafeRLHF rows for the real-model pipeline, in the project's schema, from the offline copy in
../shared/data/real (CC BY-NC 4.0: read from there at run time and written only under output/, never into the repo).

That copy is `{"prompt", "response": [safer, other]}` with exactly one safe answer per row (its README), so in the
PKU-SafeRLHF schema: response_0 = the safe answer, is_response_0_safe = true, is_response_1_safe = false,
safer_response_id = 0. Its helpfulness label (better_response_id) was not recorded, so these rows train the cost
model only; the reward model of the real pipeline reads HH-RLHF chosen/rejected rows instead (see
scripts/pipeline_real.sh). Rows are split by prompt (every 10th prompt is held out), so no held-out prompt was seen.

    python scripts/prepare_real_data.py                      # -> output/real-data/*.jsonl
"""
import argparse
import json
import os
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.path.join(ROOT, "..", "shared", "data", "real")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=os.path.join(REAL, "pku_saferlhf_safe-vs-unsafe_5k.json"),
                    help="the PKU-SafeRLHF safe-vs-unsafe file (default: %(default)s)")
    ap.add_argument("--output_dir", default=os.path.join(ROOT, "output", "real-data"), help="(default: %(default)s)")
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


if __name__ == "__main__":
    main()
