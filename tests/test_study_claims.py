"""The study's verdicts on the paper's claims: gaps of means, standard errors from the seed spreads, and a claim
that holds or is reversed only past two standard errors."""
import math

import pytest

from dearkd_fast import study


def row(method, frac, top1):
    mean = sum(top1) / len(top1)
    std = math.sqrt(sum((x - mean) ** 2 for x in top1) / (len(top1) - 1)) if len(top1) > 1 else 0.0
    return {"method": method, "fraction": frac, "data_free": frac is None, "top1": top1, "top1_mean": mean,
            "top1_std": std}


def table(rows):
    return {"settings": {"fractions": [0.02, 0.1]}, "rows": rows}


def verdicts(t):
    return {(c["claim"], c["fraction"]): c for c in study.claims(t)}


def test_a_gap_past_two_standard_errors_holds_and_one_inside_does_not():
    t = table([row("dearkd", 0.02, [41.0, 40.5, 41.2]), row("deit", 0.02, [41.9, 41.0, 42.4]),
               row("dearkd", 0.1, [55.0, 52.3, 54.7]), row("deit", 0.1, [51.0, 52.4, 50.9])])
    v = verdicts(t)
    small, large = v["DearKD > DeiT-style", 0.02], v["DearKD > DeiT-style", 0.1]
    assert small["gap"] == pytest.approx(40.9 - 41.7667, abs=0.01)
    assert small["verdict"] == "within the seed spread (leans no)"
    se = math.sqrt(t["rows"][2]["top1_std"] ** 2 / 3 + t["rows"][3]["top1_std"] ** 2 / 3)
    assert large["se"] == pytest.approx(se, abs=0.01) and large["gap"] > 2 * se and large["verdict"] == "holds"
    trend = v["DearKD's gain over DeiT-style is largest at the smallest fraction", None]
    assert trend["verdict"] == "reversed" and trend["gap"] == pytest.approx(small["gap"] - large["gap"], abs=0.02)
    assert ("DeiT-style > scratch", 0.02) not in v  # no scratch row: nothing claimed about it


def test_a_one_seed_row_borrows_the_spread_of_the_other_and_data_free_is_one_claim():
    t = table([row("dearkd", 0.1, [54.0, 52.0, 56.0]), row("dearkd-no-stage2", 0.1, [53.0]),
               row("data-free dearkd, BPID", None, [10.0, 11.0, 12.0]),
               row("data-free dearkd, no BPID", None, [20.0, 21.0, 22.0])])
    v = verdicts(t)
    stage2 = v["stage 2 helps", 0.1]
    assert stage2["se"] == pytest.approx(math.sqrt(4 / 3 + 4 / 1), abs=0.01)  # std 2 for both, n 3 and 1
    assert stage2["verdict"] == "within the seed spread (leans yes)"
    assert v["BPID helps data-free", None]["verdict"] == "reversed"
    lines = "\n".join(study.claims_markdown({**t, "claims": study.claims(t)}))
    assert "| BPID helps data-free | data-free | -10.00 ± 0.82 | reversed |" in lines
