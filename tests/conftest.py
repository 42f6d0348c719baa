"""Shared test helpers: run a stage as a subprocess (python or torchrun), read its metrics, and build the
tiny SFT model once per session for the stages that start from it."""
import json
import os
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.path.join(ROOT, "..", "shared", "data", "real")
TINY = os.path.join(ROOT, "assets", "tiny-llama")  # the bundled tiny model (a local folder, never the hub)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "data"))
TIMEOUT = 900  # generous: this machine can be many times slower for minutes


def _command(script, args, nproc, env):
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=0",
               "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", script, *map(str, args)]
    else:
        cmd = [sys.executable, script, *map(str, args)]
    e = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
         "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline", **(env or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return cmd, e


def run(script, *args, nproc=1, check=True, timeout=TIMEOUT, env=None):
    """Run `script` with flags; nproc > 1 goes through torchrun (gloo on CPU)."""
    cmd, e = _command(script, args, nproc, env)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=e)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def start(script, *args, nproc=1, env=None):
    """Start `script` in the background (for kill/SIGTERM tests) -> Popen; output goes to a temp file."""
    cmd, e = _command(script, args, nproc, env)
    log = tempfile.TemporaryFile(mode="w+")
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, env=e)
    p.log = log
    return p


def run_parallel(*jobs, timeout=TIMEOUT, threads=None):
    """Run independent 1-rank jobs [(script, *args), ...] at the same time, one thread each (the fixtures' reward
    and cost models, PPO and PPO-Lagrangian): on 2 cores this is ~1.6x faster than one after the other.
    threads: threads per job (default 1 each); a job much longer than the others can use the cores they free."""
    threads = threads or [1] * len(jobs)
    procs = [start(script, *args, env={"OMP_NUM_THREADS": str(n)}) for (script, *args), n in zip(jobs, threads)]
    for p, (script, *args) in zip(procs, jobs):
        code = p.wait(timeout=timeout)
        if code != 0:
            raise AssertionError(f"{script} {args} failed ({code}):\n{output_of(p)[-5000:]}")


def output_of(p):
    p.log.seek(0)
    return p.log.read()


def load_script(script):
    """A stage module by name ("sft.py"), or a script outside the top level by path ("scripts/export_checkpoint.py")."""
    import importlib
    import importlib.util
    if "/" not in script:
        return importlib.import_module(script.removesuffix(".py"))
    spec = importlib.util.spec_from_file_location(os.path.basename(script).removesuffix(".py"), os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main_inprocess(script, *args):
    """Run a stage's main() inside the test process exactly as its `__main__` does (common.entrypoint), without
    the few seconds of a new interpreter -> (exit code, stdout, stderr). The process environment and the SIGTERM
    handler are restored afterwards."""
    import contextlib
    import io
    import signal
    import common
    import torch.distributed as dist
    module = load_script(script)
    env, handler = dict(os.environ), signal.getsignal(signal.SIGTERM)
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            common.entrypoint(lambda: module.main([str(a) for a in args]))
    except SystemExit as e:
        code = e.code
    finally:
        os.environ.clear()
        os.environ.update(env)
        signal.signal(signal.SIGTERM, handler)
        if dist.is_initialized():
            dist.destroy_process_group()
    return code, out.getvalue(), err.getvalue()


def nan_score_at_call(monkeypatch, n):
    """Make ppo_lagrangian.end_scores return NaN on its n-th call (calls 1-2: rollout 1's reward and cost)."""
    import ppo_lagrangian
    scores, calls = ppo_lagrangian.end_scores, []

    def nan_at_n(*a, **kw):
        calls.append(1)
        out = scores(*a, **kw)
        return out * float("nan") if len(calls) == n else out

    monkeypatch.setattr(ppo_lagrangian, "end_scores", nan_at_n)


def metrics(output_dir, key=None):
    rows = [json.loads(l) for l in open(os.path.join(output_dir, "metrics.jsonl"))]
    return [r[key] for r in rows if key in r] if key else rows


@pytest.fixture(scope="session")
def sft_model(tmp_path_factory):
    """The tiny SFT policy trained by the default command (shared by the later stages' tests)."""
    out = tmp_path_factory.mktemp("sft") / "model"
    p = run("sft.py", "--output_dir", out)
    return str(out), p


@pytest.fixture(scope="session")
def score_models(sft_model, tmp_path_factory):
    sft, _ = sft_model
    base = tmp_path_factory.mktemp("score")
    import tiny_safety  # the grouped cost model (one head per harm group) trains alongside: cost_groups_model
    run_parallel(("train_preference.py", "--objective", "reward", "--model_name_or_path", sft, "--output_dir", base / "reward"),
                 ("train_preference.py", "--objective", "cost", "--model_name_or_path", sft, "--output_dir", base / "cost"),
                 ("train_preference.py", "--objective", "cost", "--model_name_or_path", sft, "--output_dir",
                  base / "cost_groups", "--cost_categories", tiny_safety.GROUPS))
    return str(base / "reward"), str(base / "cost")


@pytest.fixture(scope="session")
def cost_groups_model(score_models):
    """The tiny task's cost model with one head per harm group (violence, theft, privacy, cheating)."""
    return os.path.join(os.path.dirname(score_models[1]), "cost_groups")


# `pytest -m "not slow"`: the fast part (math, validation, CLI, short runs from the bundled config) in a few minutes.
# A test is slow when it needs a trained model or a long run: it asks for one of these fixtures.
SLOW_FIXTURES = {"sft_model", "score_models", "cost_groups_model", "pipeline", "smollm2", "sft_reference", "foreign",
                 "fresh_clone"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
