"""Workspaces of LMDeploy < 0.6 (config.ini) get a clear error; an old quant_policy = 4 is explained."""
import pytest

from puyu.cli import main
from puyu.convert import CheckpointError, load_model_weights


def _old_workspace(root, policy: int):
    weights = root / "triton_models" / "weights"
    weights.mkdir(parents=True)
    (weights / "config.ini").write_text(f"[llama]\nmodel_name = internlm2\nhead_num = 8\nquant_policy = {policy}\n")
    return root


def test_config_ini_workspace_is_refused_with_the_reason(tmp_path):
    ws = _old_workspace(tmp_path / "ws", 0)
    with pytest.raises(CheckpointError, match=r"config.ini.*LMDeploy < 0.6.*puyu convert") as err:
        load_model_weights(ws)
    assert "quant_policy" not in str(err.value)


def test_old_quant_policy_4_is_explained(tmp_path, capsys):
    ws = _old_workspace(tmp_path / "ws", 4)
    assert main(["inspect", str(ws)]) == 2
    err = capsys.readouterr().err
    assert "int8 KV with offline calibrated scales" in err and "--quant-policy 8" in err
    assert "Traceback" not in err
