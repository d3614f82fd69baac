"""overlap_decode through the user's doors: `sdbridge run --overlap-decode` (and the TOML key),
`sdbridge bench --overlap-decode`. What it computes is checked in test_stream_batch.py (the same
frames one call later) and test_step_graph.py (the same frames through the step graph)."""

import json

from test_cli import sdbridge

RUN = ["run", "--source", "testpattern", "--sink", "null", "--model", "random:tiny", "--width", "64", "--height", "64",
       "--device", "cpu", "--no-status", "--no-osc", "--frames", "3"]


def test_sdbridge_run_overlap_decode_runs_the_show_and_says_so(tmp_path):
    config = tmp_path / "show.toml"
    config.write_text("overlap_decode = true\n")
    for extra in (["--overlap-decode"], ["--config", str(config)]):
        result = sdbridge(*RUN, *extra, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "(64x64, eager+overlap decode)" in result.stderr
        assert "3 processed" in result.stdout


def test_sdbridge_run_refuses_overlap_decode_of_the_wrong_type(tmp_path):
    config = tmp_path / "show.toml"
    config.write_text('overlap_decode = "yes"\n')
    result = sdbridge(*RUN, "--config", str(config), timeout=60)
    assert result.returncode == 2
    assert "overlap_decode" in result.stderr


def test_bench_overlap_decode_is_in_the_result_and_the_table(tmp_path):
    out = tmp_path / "bench.json"
    result = sdbridge("bench", "--arch", "tiny", "--steps", "2", "--width", "64", "--height", "64", "--frames", "4",
                      "--warmup", "1", "--device", "cpu", "--overlap-decode", "--json", str(out), timeout=300)
    assert result.returncode == 0, result.stderr
    [run] = json.loads(out.read_text())
    assert run["overlap_decode"] is True and run["frames_measured"] == 4
    assert "eager/overlap" in result.stdout
