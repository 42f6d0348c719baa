"""Run ppo_lagrangian.main() (python or torchrun) with recording wrappers around three of its functions, and write per
rank OUT.rank<R>.json: each training rollout's prompt texts in batch order, the KL and scores score_rollout gave, and
the sequence sum of every per-token signal main() handed to stream_advantages (per rollout: the reward stream first,
then one cost stream per constraint). tests/test_critic_free.py checks main()'s wiring with it: groups of G responses
to one prompt, consecutive and on one rank; +β·kl in every cost stream and −β·kl in the reward stream."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import common  # noqa: E402
import ppo_lagrangian as ppo  # noqa: E402

out, argv = sys.argv[1], sys.argv[2:]
rec = {"prompts": [], "kl_sum": [], "reward": [], "cost": [], "signals": []}
rollout, score_rollout, stream_advantages = ppo.rollout, ppo.score_rollout, ppo.stream_advantages


def recorded_rollout(*a, **k):
    batch = rollout(*a, **k)
    rec["prompts"].append(batch.prompt_texts)
    return batch


def recorded_score(batch, *a, **k):
    s = score_rollout(batch, *a, **k)
    rec["kl_sum"].append(((s.old_logp - s.ref_logp) * batch.mask).sum(-1).tolist())
    rec["reward"].append(s.reward.tolist())
    rec["cost"].append(s.costs.tolist() if s.cost is not None else [])
    return s


def recorded_stream(signal_t, *a, **k):
    rec["signals"].append(signal_t.sum(-1).tolist())
    return stream_advantages(signal_t, *a, **k)


ppo.rollout, ppo.score_rollout, ppo.stream_advantages = recorded_rollout, recorded_score, recorded_stream


def main():
    ppo.main(argv)
    with open(f"{out}.rank{os.environ.get('RANK', '0')}.json", "w") as f:
        json.dump(rec, f)


if __name__ == "__main__":
    common.entrypoint(main)
