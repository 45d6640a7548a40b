"""scripts/check_equivalence.py: HF ≡ ours ≡ masked ≡ cut ≡ HF reload, one JSON object, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from script_modules import script as load_script

from llmshear.models.build import PRESETS, build_model
from llmshear.models.hf import save_pretrained

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_equivalence.py"


@pytest.fixture(scope="module")
def script():
    return load_script("check_equivalence")


def _run(script, capsys, *argv: str) -> tuple[int, dict]:
    code = script.main(list(argv))
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-qwen2"])
def test_default_target_halves_every_axis_and_everything_agrees(script, capsys, name):
    code, report = _run(script, capsys, "--model", name, "--seed", "3")
    cfg = PRESETS[name]()
    assert code == 0 and report["ok"]
    assert all(diff <= 1e-4 for diff in report["max_abs_diff"].values())
    assert report["max_abs_diff"]["all_ones_vs_no_masks"] <= 1e-5
    half = {k: getattr(cfg, k) // 2 for k in ("d_model", "n_layers", "n_heads", "intermediate_size")}
    assert {k: report["cut_config"][k] for k in half} == half == {k: report["target"][k] for k in half}
    assert report["cut_config"]["n_heads"] % report["cut_config"]["n_kv_heads"] == 0
    assert report["params"]["source"] == build_model(cfg, device="meta").num_params()
    assert report["params"]["cut"] == report["params"]["expected_at_masks"] < report["params"]["source"]


def test_hf_directory_source_and_explicit_target(script, capsys, tmp_path):
    save_pretrained(build_model(PRESETS["tiny-llama2"](), seed=5), tmp_path / "hf")
    code, report = _run(script, capsys, "--model", str(tmp_path / "hf"), "--target", "n_heads=3", "n_layers=3",
                        "--dtype", "float64")
    assert code == 0 and report["dtype"] == "float64"
    assert report["cut_config"]["n_heads"] == report["cut_config"]["n_kv_heads"] == 3
    assert report["cut_config"]["n_layers"] == 3 and report["cut_config"]["d_model"] == 32
    assert max(report["max_abs_diff"].values()) <= 1e-6  # RMSNorm works in fp32, as in HF


def test_a_difference_above_the_tolerance_exits_1(script, capsys):
    code, report = _run(script, capsys, "--model", "tiny-llama2", "--tolerance", "0")
    assert code == 1 and not report["ok"]
    assert max(report["max_abs_diff"].values()) > 0


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--model", "tiny-gqa", "--target", "n_heads=16"], "target.n_heads=16 is larger"),
        (["--model", "tiny-gqa", "--target", "n_heads=6", "n_kv_heads=4"], "not a multiple of target.n_kv_heads"),
        (["--model", "tiny-gqa", "--target", "n_heads=8", "n_kv_heads=1"], "cannot be formed from the source"),
        (["--model", "tiny-gqa", "--target", "head_dim=8"], "target.head_dim=8 differs"),
        (["--model", "tiny-gqa", "--target", "layers=2"], "target.layers: unknown key"),
        (["--model", "tiny-gqa", "--target", "n_layers"], "expected key=value"),
    ],
)
def test_bad_targets_fail_before_any_weights_load(script, capsys, monkeypatch, argv, needle):
    monkeypatch.setattr(script, "load_pair", lambda *a: pytest.fail("weights were loaded"))
    code, report = _run(script, capsys, *argv)
    assert code == 2 and needle in report["error"]


def test_missing_or_non_llama_model_directory(script, capsys, tmp_path):
    code, report = _run(script, capsys, "--model", str(tmp_path / "nowhere"))
    assert code == 2 and "not found" in report["error"]
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, report = _run(script, capsys, "--model", str(tmp_path / "gpt2"))
    assert code == 2 and "'gpt2'" in report["error"]


def test_command_line_exit_code_and_json_last():
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny-gqa", "--target", "n_kv_heads=3"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert not report["ok"] and "target.n_kv_heads=3 is larger" in report["error"]
    assert "target.n_kv_heads=3" in done.stderr  # logged as well
