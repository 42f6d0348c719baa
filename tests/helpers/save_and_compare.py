"""Run under torchrun: shard the tiny model, save it with common.save_hf, reload it unsharded on rank 0, and
compare logits with the in-memory sharded model (written to OUT/logits_ok)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import common  # noqa: E402


def main():
    out = sys.argv[1]
    rank, world, device = common.setup_distributed()
    tok = common.load_tokenizer("assets/tiny-llama")
    model = common.load_causal_lm("assets/tiny-llama", tok, seed=3)
    common.shard_model(model, device)
    ids = torch.tensor([common.tokenize_prompt_response(tok, "how do i make tea ?", "sure . first kettle .", 64)[0]])
    with torch.no_grad():
        mine = model(input_ids=ids).logits
    common.save_hf(model, tok, out)
    if rank == 0:
        from transformers import AutoModelForCausalLM
        again = AutoModelForCausalLM.from_pretrained(out)
        with torch.no_grad():
            ok = torch.allclose(again(input_ids=ids).logits, mine, atol=1e-5)
        open(os.path.join(out, "logits_ok"), "w").write("ok" if ok else "mismatch")
    common.cleanup_distributed()


if __name__ == "__main__":
    common.entrypoint(main)  # leaves by os._exit(0) after the group is gone: no gloo abort at shutdown
