"""Speed-relevant behaviour, asserted without timing anything (times live in bench/): the rollout all-gathers each
FSDP unit once however many tokens it generates, and detaching FSDP's hooks while generating changes no token."""
import json

from conftest import run


def test_rollout_all_gathers_once_per_unit_not_per_token(tmp_path):
    run("tests/helpers/rollout_collectives.py", tmp_path / "r.json", nproc=2)
    r = json.load(open(tmp_path / "r.json"))
    assert r["inside_4"] == r["inside_16"] == r["units"], r  # one all-gather per unit per rollout
    # without the context every decode step all-gathers every block again: 12 more steps, 12 x 4 more gathers
    assert r["outside_16"] - r["outside_4"] == 12 * (r["units"] - 1), r
    assert r["same_tokens_4"] and r["same_tokens_16"], r
    assert r["hooks_restored"] and r["resharded"], r
