"""Show-safety, promise 7: trusted files only.

- `sdbridge run --model x.ckpt` refuses the file before anything is unpickled (the payload is
  live: unpickling it in the same environment creates its marker), one line, exit status 2.
- The config file cannot name code: no value is ever imported or evaluated. Values that look
  like modules or Python are refused or stay inert strings (a module that marks its import is
  on sys.path throughout), and nothing in bridge/ or pipeline/ imports, evaluates or unpickles by
  name except the fixed, reviewed places listed here.
- TensorRT engines load only from the engine cache, verified (tests/test_engine_cache.py,
  tests/test_tensorrt_backend.py); where TensorRT is missing, `--backend tensorrt` is one line,
  exit status 2.
"""

import ast
import dataclasses
import subprocess
import sys

import pytest

from bridge import cli
from bridge.settings import RunSettings
from test_cli import REPO, TINY, child_env
from test_loading import write_payload

PROBE = "sdbridge_trust_probe"  # a module that creates a marker file when imported


def test_ckpt_is_refused_by_the_cli_before_unpickling(tmp_path):
    env = child_env()
    probe_marker = tmp_path / "probe-ran"
    probe = write_payload(tmp_path / "probe.ckpt", probe_marker)
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(probe)!r}, 'rb'))"], env=env,
                   check=True, timeout=60)
    assert probe_marker.exists()  # the payload is live: unpickling runs it
    marker = tmp_path / "payload-ran"
    model = write_payload(tmp_path / "show-model.ckpt", marker)
    args = [arg for arg in TINY if arg not in ("--model", "random:tiny")]
    result = subprocess.run([sys.executable, "-m", "bridge.cli", "run", "--model", str(model), "--sink", "null",
                             "--no-osc", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "refusing to load" in errors[0] and "show-model.ckpt" in errors[0] and "--allow-pickle" in errors[0]
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".pkl"])
def test_other_pickle_suffixes_are_refused_too(suffix, tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    model = write_payload(tmp_path / f"model{suffix}", marker)
    status = cli.main(["-q", "run", "--model", str(model), "--sink", "null", "--no-osc", "--device", "cpu",
                       "--width", "64", "--height", "64"])
    err = capsys.readouterr().err
    assert status == 2 and "refusing to load" in err and len(err.strip().splitlines()) == 1, err
    assert not marker.exists()


@pytest.fixture
def probe_module(tmp_path, monkeypatch):
    """An importable module that leaves a marker when imported; on sys.path for the test."""
    marker = tmp_path / "probe-imported"
    (tmp_path / f"{PROBE}.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef run(*a, **k):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub-id-looking value fails fast instead of waiting
    yield marker
    assert PROBE not in sys.modules


def code_like_values(tmp_path) -> list[str]:
    return [PROBE, f"{PROBE}:run", f"{PROBE}.run", f"__import__('{PROBE}')",
            f"exec(\"open('{tmp_path}/exec-ran', 'w')\")", "os.system", "!!python/object/apply:os.system"]


def test_no_setting_is_imported_or_evaluated(probe_module, tmp_path):
    """Every text setting, given module paths and Python expressions: refused, or kept as text."""
    text_fields = [f.name for f in dataclasses.fields(RunSettings) if "str" in f.type]
    assert {"model", "source", "sink", "backend", "vae", "lcm_lora", "prompt", "device"} <= set(text_fields)
    for field in text_fields:
        for value in code_like_values(tmp_path):
            given = (value,) if field == "sink" else value
            try:
                settings = RunSettings(**{"sink": ("null",), field: given})
            except ValueError as exc:
                assert field.split("_")[0] in str(exc), (field, str(exc))
                continue
            assert getattr(settings, field) == given  # kept as it was: a string, never a callable
    assert not probe_module.exists() and not (tmp_path / "exec-ran").exists()


@pytest.mark.parametrize("field, which", [("model", 1), ("model", 3), ("source", 1), ("sink", 3), ("device", 3),
                                          ("backend", 1), ("prompt", 3)])
def test_code_in_a_config_file_never_runs(field, which, probe_module, tmp_path, capsys):
    """Through `sdbridge run --config`: a module:function or a Python expression is refused in one
    line, or used as plain text (the prompt)."""
    for value in [code_like_values(tmp_path)[which]]:
        config = tmp_path / "show.toml"
        lines = {"sink": '"null"', "model": '"random:tiny"', "width": "64", "height": "64", "device": '"cpu"',
                 "osc": "false", "status": "false", "frames": "1"}
        lines[field] = f"[{_toml_string(value)}]" if field == "sink" else _toml_string(value)
        config.write_text("".join(f"{key} = {text}\n" for key, text in lines.items()))
        status = cli.main(["-q", "run", "--config", str(config)])
        err = capsys.readouterr().err
        assert status in (0, 2), err
        if status == 2:
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not probe_module.exists() and not (tmp_path / "exec-ran").exists()


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# The only places in the product that import, evaluate or unpickle anything by name: each was
# reviewed; a new one fails this test until it is reviewed and added.
REVIEWED = {
    ("bridge/cli.py", "importlib.import_module"),  # COMMAND_MODULES, a fixed tuple
    ("bridge/devices.py", "importlib.import_module"),  # "tensorrt", a constant
    ("bridge/commands/bench.py", "subprocess.run"),  # git rev-parse / git status for the JSON, fixed argv
}
DANGEROUS_NAMES = {"eval", "exec", "compile", "__import__"}
DANGEROUS_ATTRS = {("importlib", "import_module"), ("pickle", "load"), ("pickle", "loads"), ("marshal", "loads"),
                   ("torch", "load"), ("runpy", "run_path"), ("runpy", "run_module"), ("yaml", "load"),
                   ("yaml", "unsafe_load"), ("subprocess", "run"), ("subprocess", "Popen"), ("os", "system")}


def test_nothing_imports_or_evaluates_by_name_outside_the_reviewed_places():
    found = set()
    for root in ("bridge", "pipeline"):
        for path in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                if isinstance(func, ast.Name) and func.id in DANGEROUS_NAMES:
                    found.add((path.relative_to(REPO).as_posix(), func.id))
                elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) \
                        and (func.value.id, func.attr) in DANGEROUS_ATTRS:
                    found.add((path.relative_to(REPO).as_posix(), f"{func.value.id}.{func.attr}"))
    assert found <= REVIEWED, sorted(found - REVIEWED)


def test_tensorrt_backend_without_tensorrt_is_one_line(capsys, monkeypatch):
    """Where TensorRT is not installed, `run --backend tensorrt` says so and stops, exit status 2."""
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # not importable, also where it is installed
    status = cli.main(["-q", "run", "--sink", "null", "--no-osc", *TINY, "--backend", "tensorrt"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "backend: 'tensorrt' cannot run here: TensorRT is not installed" in err and "eager" in err
