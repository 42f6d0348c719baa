"""Rollout generation: our sampler on an FSDP2-sharded actor (unsharded once per rollout, KV cache) against plain
HF `model.generate` on an unsharded copy of the same model, same prompts, same sampling, same length; 1 and 2 ranks.
Also counts the FSDP all-gathers per rollout, which must not grow with the number of generated tokens.

    python bench/bench_generation.py                    # writes bench/results/generation.json
    python bench/bench_generation.py --lengths 16,64 --repeats 3
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import _util  # noqa: E402


def worker(args):
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import common
    rank, world, device = common.setup_distributed()
    policy, _ = _util.random_models()
    tok = common.load_tokenizer(policy, padding_side="left")
    prompts = [r["prompt"] for r in common.load_rows(os.path.join(_util.ROOT, "data/tiny-safety/prompts_train.jsonl"), "prompt")]
    mine = prompts[rank * args.batch:(rank + 1) * args.batch]
    ids, lens = common.pad([common.tokenize_prompt(tok, p) for p in mine], tok.pad_token_id, "left")
    ids, lens = ids.to(device), lens.to(device)
    attn = common.length_mask(lens, ids.shape[1], start=ids.shape[1] - lens).long()
    sharded = common.shard_model(common.load_causal_lm(policy, tok), device, mixed_precision=device.type == "cuda")
    plain = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).to(device)
    plain.eval()
    sharded.eval()
    gathers = []
    real_gather = dist.all_gather_single

    def counting(*a, **k):
        gathers.append(1)
        return real_gather(*a, **k)
    dist.all_gather_single = counting

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    out = {}
    for n in args.lengths:
        ours, theirs, n_gathers = [], [], []
        for r in range(args.repeats + 1):  # the first repeat warms up
            g = torch.Generator(device=device).manual_seed(r)
            sync()
            gathers.clear()
            t = time.perf_counter()
            with common.gathered_for_generation(sharded):  # eos_id -1: exactly n tokens, as min_new_tokens below
                resp, rl, _ = common.sample_responses(sharded, ids, lens, -1, tok.pad_token_id, n, generator=g)
            sync()
            ours.append(time.perf_counter() - t)
            n_gathers.append(len(gathers))
            torch.manual_seed(r)
            sync()
            t = time.perf_counter()
            with torch.no_grad():
                seq = plain.generate(input_ids=ids, attention_mask=attn, do_sample=True, max_new_tokens=n,
                                     min_new_tokens=n, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=tok.pad_token_id)
            sync()
            theirs.append(time.perf_counter() - t)
            assert resp.shape[1] == n and seq.shape[1] - ids.shape[1] == n
        tokens = args.batch * n * world
        out[n] = {"ours_tokens_per_s": tokens / statistics.median(ours[1:]),
                  "generate_tokens_per_s": tokens / statistics.median(theirs[1:]),
                  "all_gathers_per_rollout": n_gathers[-1]}
        out[n]["ratio"] = out[n]["ours_tokens_per_s"] / out[n]["generate_tokens_per_s"]
    units = sum(1 for m in sharded.modules() if isinstance(m, torch.distributed.fsdp.FSDPModule))
    if rank == 0:
        with open(args.worker_out, "w") as f:
            json.dump({"world": world, "fsdp_units": units, "by_length": out}, f)
    common.cleanup_distributed()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="16,64,256")
    ap.add_argument("--batch", type=int, default=32, help="prompts per rank")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--worker_out", default="")
    args = ap.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    if args.worker:
        return worker(args)
    _util.random_models()
    results = {"machine": _util.machine(), "date": time.strftime("%Y-%m-%d"), "batch_per_rank": args.batch, "runs": []}
    rows = []
    for nproc in [int(x) for x in args.ranks.split(",")]:
        tmp = os.path.join(_util.CACHE, f"gen_{nproc}.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d",
               "--rdzv_endpoint=localhost:0", __file__, "--worker", "--worker_out", tmp,
               "--lengths", ",".join(map(str, args.lengths)), "--batch", str(args.batch), "--repeats", str(args.repeats)]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc)), "TOKENIZERS_PARALLELISM": "false"}
        p = subprocess.run(cmd, cwd=_util.ROOT, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise SystemExit(p.stderr[-3000:])
        r = json.load(open(tmp))
        results["runs"].append(r)
        for n, v in r["by_length"].items():
            rows.append([nproc, n, v["ours_tokens_per_s"], v["generate_tokens_per_s"], v["ratio"],
                         f"{v['all_gathers_per_rollout']} ({r['fsdp_units']} units)"])
    _util.table(["ranks", "new tokens", "ours tok/s", "HF generate tok/s", "ours / generate", "all-gathers/rollout"], rows)
    _util.write("generation", results)


if __name__ == "__main__":
    main()
