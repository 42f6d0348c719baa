"""Helpers shared by the bench/ scripts (not by the stages): run a stage, read its timings, print a table."""
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "bench", ".cache")  # random-weight models made once (gitignored)
RESULTS = os.path.join(ROOT, "bench", "results")


def random_models():
    """The tiny Llama with seeded random weights, saved as a policy folder and as a score-model folder, so every
    stage and TRL load the same weights. Random weights rarely sample EOS (1/512 per token), so rollouts run to
    max_new_tokens: the benchmark's response length is the one asked for."""
    policy, score = os.path.join(CACHE, "policy"), os.path.join(CACHE, "score")
    if not os.path.exists(os.path.join(score, "config.json")):
        sys.path.insert(0, ROOT)
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, "assets/tiny-llama"))
        torch.manual_seed(0)
        cfg = AutoConfig.from_pretrained(os.path.join(ROOT, "assets/tiny-llama"))
        AutoModelForCausalLM.from_config(cfg).save_pretrained(policy)
        tok.save_pretrained(policy)
        cfg.num_labels = 1
        AutoModelForTokenClassification.from_config(cfg).save_pretrained(score)
        tok.save_pretrained(score)
    return policy, score


def run_stage(script, args, nproc=1, env=None):
    """Run a stage (torchrun for nproc > 1) and return its timings.jsonl rows."""
    out = args[args.index("--output_dir") + 1]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d",
               "--rdzv_endpoint=localhost:0", script, *map(str, args)]
    else:
        cmd = [sys.executable, script, *map(str, args)]
    e = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", **(env or {})}
    threads = str(max(1, (os.cpu_count() or 2) // nproc))
    e.setdefault("OMP_NUM_THREADS", threads)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=e)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return [json.loads(l) for l in open(os.path.join(ROOT, out, "timings.jsonl"))]


def median_steps(rows, key, skip=2):
    """Median of a per-step timing over the steps after the first `skip` (warm-up: allocator, caches)."""
    vals = [r[key] for r in rows if "step" in r and key in r][skip:]
    return statistics.median(vals) if vals else float("nan")


def summary(rows):
    return next((r for r in rows if r.get("summary")), {})


def table(headers, rows):
    widths = [max(len(str(h)), *(len(fmt(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = " | ".join(str(h).ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(fmt(v).ljust(w) for v, w in zip(r, widths)))


def fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write(name, data):
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    print(f"wrote {os.path.relpath(path, ROOT)}")


def machine():
    import platform
    import torch
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    cpu, flags = "", ""
    if os.path.exists("/proc/cpuinfo"):  # bf16 speed on a CPU depends on the model (README "Performance")
        info = open("/proc/cpuinfo").read()
        cpu = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "")
        flags = " ".join(f for f in ("avx512_bf16", "amx_bf16") if f in info)
    return {"device": dev, "cpu": cpu, "bf16_flags": flags, "torch": torch.__version__,
            "python": platform.python_version()}
