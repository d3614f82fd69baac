"""overlap_decode and overlap_encode through the user's doors: `sdbridge run --overlap-decode
--overlap-encode` (and the TOML keys), `sdbridge bench`. What they compute is checked in
test_stream_batch.py (the plain stream's frames a call later) and test_step_graph.py (the same
frames through the step graph)."""

import json

from test_cli import sdbridge

RUN = ["run", "--source", "testpattern", "--sink", "null", "--model", "random:tiny", "--width", "64", "--height", "64",
       "--device", "cpu", "--no-status", "--no-osc", "--frames", "3"]


def test_sdbridge_run_with_the_vae_overlapped_runs_the_show_and_says_so(tmp_path):
    config = tmp_path / "show.toml"
    config.write_text("overlap_decode = true\noverlap_encode = true\n")
    for extra, label in ((["--overlap-decode"], "eager+overlap decode"), (["--overlap-encode"], "eager+overlap encode"),
                         (["--config", str(config)], "eager+overlap decode+overlap encode")):
        result = sdbridge(*RUN, *extra, timeout=120)
        assert result.returncode == 0, result.stderr
        assert f"(64x64, {label})" in result.stderr
        assert "3 processed" in result.stdout


def test_sdbridge_run_refuses_overlap_decode_of_the_wrong_type(tmp_path):
    config = tmp_path / "show.toml"
    config.write_text('overlap_decode = "yes"\n')
    result = sdbridge(*RUN, "--config", str(config), timeout=60)
    assert result.returncode == 2
    assert "overlap_decode" in result.stderr


def test_bench_overlapped_vae_is_in_the_result_and_the_table(tmp_path):
    out = tmp_path / "bench.json"
    result = sdbridge("bench", "--arch", "tiny", "--steps", "2", "--width", "64", "--height", "64", "--frames", "4",
                      "--warmup", "1", "--device", "cpu", "--overlap-decode", "--overlap-encode", "--json", str(out),
                      timeout=300)
    assert result.returncode == 0, result.stderr
    [run] = json.loads(out.read_text())
    assert run["overlap_decode"] is True and run["overlap_encode"] is True and run["frames_measured"] == 4
    assert "eager/overlap-dec/overlap-enc" in result.stdout
