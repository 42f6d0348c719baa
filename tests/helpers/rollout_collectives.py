"""Run under torchrun: count FSDP2 all-gathers while sampling with and without common.gathered_for_generation,
check the two give the same tokens and that the FSDP hooks are back afterwards; rank 0 writes OUT as JSON."""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import common  # noqa: E402


def main():
    out = sys.argv[1]
    rank, world, device = common.setup_distributed()
    tok = common.load_tokenizer("assets/tiny-llama", padding_side="left")
    model = common.shard_model(common.load_causal_lm("assets/tiny-llama", tok, seed=3), device).eval()
    units = [m for m in model.modules() if isinstance(m, torch.distributed.fsdp.FSDPModule)]
    hooks_before = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in units]
    gathers = []
    real = dist.all_gather_single
    dist.all_gather_single = lambda *a, **k: (gathers.append(1), real(*a, **k))[1]
    ids, lens = common.pad([common.tokenize_prompt(tok, p) for p in ["how do i make tea ?", "hi"]], tok.pad_token_id, "left")
    result = {"units": len(units)}
    for n in (4, 16):
        model.reshard()  # the root stays unsharded after a plain forward (FSDP2's default for the root)
        g = torch.Generator().manual_seed(rank)
        gathers.clear()
        with common.gathered_for_generation(model):
            a, _, _ = common.sample_responses(model, ids, lens, -1, tok.pad_token_id, n, generator=g)
        result[f"inside_{n}"] = len(gathers)
        result["resharded"] = all(hasattr(p, "to_local") and p.to_local().numel() < p.numel() for p in model.parameters())
        g = torch.Generator().manual_seed(rank)
        gathers.clear()
        b, _, _ = common.sample_responses(model, ids, lens, -1, tok.pad_token_id, n, generator=g)
        result[f"outside_{n}"] = len(gathers)
        result[f"same_tokens_{n}"] = bool(torch.equal(a, b))
    result["hooks_restored"] = hooks_before == [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in units]
    if rank == 0:
        json.dump(result, open(out, "w"))
    common.cleanup_distributed()


if __name__ == "__main__":
    common.entrypoint(main)  # leaves by os._exit(0) after the group is gone: no gloo abort at shutdown
