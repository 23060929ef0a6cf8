"""Smoke test of tools/bench_attention.py (tiny sizes; checks the JSON record format and the plot)."""
from __future__ import annotations

import json

import tools.bench_attention as bench


def test_bench_smoke(tmp_path, capsys):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    rc = bench.main(["--n", "64", "--m", "0", "16", "--rank", "4", "--dim", "16", "--heads", "2",
                     "--batch", "1", "--methods", "svd", "sdpa", "linear", "truncate", "oracle",
                     "--svd-methods", "randomized", "gram", "--passes", "fwdbwd", "--repeats", "1",
                     "--warmup", "0", "--truncate-k", "8", "--quiet", "--no-memory", "--json", str(out),
                     "--plot", str(png)])
    assert rc == 0
    recs = json.loads(out.read_text())
    assert {r["method"] for r in recs} == {"svd", "sdpa", "linear", "truncate", "oracle"}
    for r in recs:
        assert {"method", "svd_method", "n", "m", "rank", "pass", "seconds", "peak_bytes"} <= set(r)
        assert r["pass"] == "fwdbwd" and r["seconds"] > 0
    assert {r["m"] for r in recs if r["self_attention"]} == {64}
    assert png.stat().st_size > 0
    assert "speed-up" in capsys.readouterr().out


def test_bench_parser_defaults():
    args = bench.build_parser().parse_args([])
    assert args.n == [1000, 2000, 5000, 10000, 20000] and args.rank == [8, 16, 32] and args.passes == ["fwd", "fwdbwd"]
    assert bench._parse_m(["self", "0", "1000"]) == [0, 0, 1000]


def test_bench_peak_bytes():
    import torch

    from solar_dist.ops import make_attention

    q, mem, mask = bench._make_inputs(1, 64, 16, 16, torch.float32, torch.device("cpu"), 0, True)
    m = make_attention("sdpa", 16, 2, 4)
    assert bench._peak_bytes(m, q, mem, mask, True, torch.device("cpu")) > 16 * 64 * 4
