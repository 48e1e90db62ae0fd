"""`mt-inspect` (doors/inspect.py) against Table 6 of the paper (base size, image 384, text 50)."""
from __future__ import annotations

import json

import pytest

from doors.inspect import main
from managertower.inspect import PAPER_TABLE6

FUSED_MANAGERS_M = 12.06  # both modalities: the paper, Table 6, 338.64 - 326.58 (docs/recipe.md §1.2)


@pytest.fixture(scope="module")
def base_rows():
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--size", "base", "--image-size", "384", "--text-len", "50", "--json"])
    assert code == 0
    return {row["manager"]: row for row in json.loads(out.getvalue())}


def test_every_kind_is_reported(base_rows):
    assert set(base_rows) == {"meter", "bridgetower", "sae", "saue", "aaue", "aaue_fused", "concat_attention",
                              "cross_attention"}


@pytest.mark.parametrize("kind", ["bridgetower", "saue", "aaue", "aaue_fused"])
def test_matches_table6(base_rows, kind):
    params_m, gflops = PAPER_TABLE6[kind]
    row = base_rows[kind]
    assert abs(row["params"] / 1e6 - params_m) / params_m < 0.003, row
    assert abs(row["gmacs"] - gflops) / gflops < 0.03, row


def test_table6_values_are_the_papers():
    assert PAPER_TABLE6 == {"bridgetower": (326.58, 101.25), "saue": (326.77, 101.34), "aaue": (326.77, 101.35),
                            "aaue_fused": (338.64, 105.52)}


def test_fused_query_overhead(base_rows):
    ratio = base_rows["aaue_fused"]["gmacs"] / base_rows["bridgetower"]["gmacs"]
    assert abs(ratio / (105.52 / 101.25) - 1) < 0.01, ratio
    assert abs(base_rows["aaue_fused"]["manager_params"] / 1e6 - FUSED_MANAGERS_M) / FUSED_MANAGERS_M < 0.01
    # SAUE and AAUE with query C add almost nothing over BridgeTower (Table 6: +0.19 M)
    for kind in ("saue", "aaue"):
        extra = (base_rows[kind]["params"] - base_rows["bridgetower"]["params"]) / 1e6
        assert 0.1 < extra < 0.3, (kind, extra)
    # ordering of the compute: BT <= SAUE <= AAUE(C) < AAUE(fused)
    g = {k: base_rows[k]["gmacs"] for k in base_rows}
    assert g["bridgetower"] <= g["saue"] <= g["aaue"] < g["aaue_fused"]


def test_table_output_and_tiny(capsys):
    assert main(["--size", "tiny", "--image-size", "64", "--text-len", "24", "--manager", "saue",
                 "--manager", "aaue_fused"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].split()[:2] == ["manager", "params"] and len(lines) == 3
    assert lines[1].startswith("saue") and lines[2].startswith("aaue_fused")


def test_config_error_is_one_line(capsys):
    assert main(["--size", "tiny", "--image-size", "60"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.image_size=60 is not a multiple") and err.count("\n") == 1
