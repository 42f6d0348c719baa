"""A policy as it was at a resume checkpoint, as an HF folder that evaluate.py (or any stage) loads.

Resume checkpoints (output_dir/checkpoints/step-N, README "Resuming and failures") hold the trained models sharded by
torch.distributed.checkpoint, not as HF folders. A researcher who wants the policy *along* training (the XSTest
trade-off as λ rises, an early stop read on a validation set) runs PPO with `--save_every K --keep_last 0` and
exports the checkpoints it wants:

    python scripts/export_checkpoint.py output/run/ppo_lag/checkpoints/step-00000008 \\
        --base models/SmolLM2-135M-Instruct --output_dir output/run/ppo_lag_step8

The architecture, tokenizer and chat template come from --base (the model the run started from: PPO's
--actor_model_name_or_path, SFT's --model_name_or_path); the weights from the checkpoint's causal LM ("actor" of a PPO
checkpoint, "model" of an SFT or DPO one). Reading goes through common.load_checkpoint (the metadata unpickled safely; any
number of ranks wrote it), writing through common.save_hf (config.json last: a folder with it is complete).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import common  # noqa: E402

POLICY_STAGES = {"ppo": "actor", "ppo_lag": "actor", "reward_shaping": "actor", "sft": "model"}  # stage -> its LM


def policy_key(stage):
    """The name a checkpoint of `stage` stores its causal LM under, or None for a stage without one (a score model).
    dpo.py's stages are "dpo/<loss>/<preference>" and store the policy as SFT does."""
    return "model" if str(stage).startswith("dpo/") else POLICY_STAGES.get(stage)


def export(checkpoint, base, output_dir, trust_remote_code=False):
    """Load the causal LM of `checkpoint` into `base`'s architecture and save it as an HF folder at `output_dir`."""
    state = common.checkpoint_state(checkpoint)  # one clear line for a missing or unreadable checkpoint
    name = policy_key(state.get("stage"))
    if name is None:
        raise common.UserError(f"{checkpoint}: a checkpoint of stage {state.get('stage')!r}; only policy checkpoints "
                               f"({', '.join(POLICY_STAGES)}, dpo) export as a causal LM")
    tokenizer = common.load_tokenizer(base, trust_remote_code=trust_remote_code)
    model = common.load_causal_lm(base, tokenizer, trust_remote_code=trust_remote_code)
    common.load_checkpoint(checkpoint, {name: (model, None)})  # the optimiser state is not read
    common.save_hf(model, tokenizer, output_dir, extra_config={"exported_from": os.path.abspath(checkpoint)})
    return state


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a resume checkpoint folder (.../checkpoints/step-N)")
    ap.add_argument("--base", required=True, help="the model the run started from (architecture, tokenizer)")
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--trust_remote_code", action="store_true")
    a = ap.parse_args(argv)
    common.check_output_dir(a.output_dir)  # neither a finished model nor an unfinished run's folder is written into
    common.setup_distributed()  # a 1-rank group: load_checkpoint reads with torch.distributed.checkpoint
    try:
        state = export(a.checkpoint, a.base, a.output_dir, a.trust_remote_code)
        common.print0(json.dumps({"exported": a.output_dir, "stage": state["stage"], "step": state["step"]}))
    finally:
        common.cleanup_distributed()


if __name__ == "__main__":
    common.entrypoint(main)
