"""`puyu inspect`: the summary by default, with what decides correctness, under the same labels for an HF
checkpoint and the TurboMind workspace converted from it."""
from __future__ import annotations

import json

from puyu.cli import main
from puyu.convert.spec import read_model_spec
from puyu.tokenizer import Tokenizer


def summary_lines(out: str) -> dict[str, str]:
    lines = out.splitlines()[1:]
    return dict(line.strip().split(": ", 1) for line in lines if line.startswith("  ") and not line.startswith("    "))


def test_inspect_defaults_to_the_summary_with_correctness_fields(checkpoint_factory, tmp_path, capsys):
    src = checkpoint_factory("llama")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(rope_theta=500000.0, rms_norm_eps=1e-5, rope_scaling={"rope_type": "linear", "factor": 2.0})
    (src / "config.json").write_text(json.dumps(cfg))
    assert main(["inspect", str(src)]) == 0
    out = capsys.readouterr().out
    assert not [ln for ln in out.splitlines() if ln.startswith("    ")]  # no per-tensor lines unless --tensors
    hf = summary_lines(out)
    spec = read_model_spec(src)
    tok = Tokenizer(src, spec.vocab_size, spec.eos_token_ids, spec.arch)
    assert hf["rope_theta"] == "500000" and hf["rope_scaling"].startswith("linear x2") and hf["norm_eps"] == "1e-05"
    assert hf["tied_embeddings"] == ("yes" if spec.tie_word_embeddings else "no")
    assert hf["bos_id"] == str(spec.bos_token_id) and hf["stop_ids"] == ", ".join(map(str, tok.stop_token_ids))
    assert hf["eos_ids"] == ", ".join(map(str, spec.eos_token_ids)) and hf["chat_template"]

    assert main(["convert", str(src), "--dst-path", str(tmp_path / "ws"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "ws")]) == 0
    ws = summary_lines(capsys.readouterr().out)
    assert set(hf) - {"tensors"} <= set(ws)  # the same labels, plus the workspace's own (tp, model_format)
    for key in ("architecture", "layers", "heads", "rope_theta", "rope_scaling", "norm_eps", "bos_id", "eos_ids",
                "stop_ids", "chat_template", "vocab"):
        assert ws[key] == hf[key], key
    assert ws["tp"] == "1"
