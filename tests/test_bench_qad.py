"""scripts/bench_qad.py reports finished runs: the recipe's float / GPTQ / GPTQ + QAD scores, and
with ``--also`` the QAD result of another run only when it starts from the same GPTQ model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run_dir(root: Path, *, qad_ood: float, quantize_sha: str = "a" * 64, gptq_ood: float = 14.5, ratio: float | None = None) -> Path:
    def scored(in_domain: float, ood: float) -> dict:
        return {"perplexity": in_domain, "sets": {"in_domain": {"perplexity": in_domain, "agreement": 0.9, "kl": 0.07},
                                                  "ood": {"perplexity": ood, "agreement": 0.8, "kl": 0.18}}}

    distill = {"mode": "qad", "steps": 100, "learning_rate": 5e-4, "qad_scales": "frozen", **({"generated_ratio": ratio} if ratio else {})}
    stages = [
        {"name": "load", "status": "cached", "metrics": {}},
        {"name": "evaluate_float", "status": "cached", "metrics": scored(9.86, 12.57)},
        {"name": "quantize", "status": "cached", "metrics": {"method": "gptq", "quantize_seconds": 78.0},
         "files": {"model.safetensors": {"sha256": quantize_sha, "size": 1}}},
        {"name": "evaluate_gptq", "status": "cached", "metrics": scored(10.41, gptq_ood)},
        {"name": "distill", "status": "done", "dir": "stages/05-distill", "metrics": {"steps": 100, "stopped": "steps", "train_seconds": 530.0,
                                                          "qad_scales": "frozen", "qad_codes_changed": 40000, "curve": []}},
        {"name": "evaluate_qad", "status": "done", "metrics": scored(10.12, qad_ood)},
    ]
    (root / "stages" / "05-distill").mkdir(parents=True)
    (root / "stages" / "05-distill" / "distill.json").write_text(json.dumps({"config": distill}))
    (root / "manifest.json").write_text(json.dumps({"recipe": {"file": "recipes/smollm2_qad.yaml"}, "stages": stages}))
    return root


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "bench_qad.py"), *args], capture_output=True, text=True, timeout=120)


def test_variants_from_the_same_gptq_model_become_rows_and_others_are_refused(tmp_path):
    main = _run_dir(tmp_path / "main", qad_ood=13.9)
    generated = _run_dir(tmp_path / "gen", qad_ood=13.3, ratio=0.5)
    result = _bench("--collect", str(main), "--also", f"generated 0.5={generated}", "--out", str(tmp_path / "out"), "--name", "q")
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "out" / "q.md").read_text()
    assert "| GPTQ W4 g64 + QAD (generated 0.5) | ood | 13.300 | +5.8% | ≤ +6 %: met |" in report
    assert "| GPTQ W4 g64 + QAD | ood | 13.900 | +10.6% | ≤ +6 %: missed |" in report
    assert "generated_ratio 0.5" in report and (tmp_path / "out" / "q.png").is_file()
    payload = json.loads((tmp_path / "out" / "q.json").read_text())
    assert [v["label"] for v in payload["variants"]] == ["generated 0.5"]

    for other in (_run_dir(tmp_path / "other-weights", qad_ood=13.0, quantize_sha="b" * 64),
                  _run_dir(tmp_path / "other-scores", qad_ood=13.0, gptq_ood=14.6)):
        result = _bench("--collect", str(main), "--also", f"x={other}", "--out", str(tmp_path / "out"))
        assert result.returncode != 0 and "not the same float and GPTQ models" in result.stderr
    for hostile in ("no-equals", f"={generated}", "x=" + str(tmp_path / "missing"), "a|b=" + str(generated), "x" * 41 + f"={generated}",
                    f"two\nlines={generated}", f"\udcff={generated}"):
        result = _bench("--collect", str(main), "--also", hostile, "--out", str(tmp_path / "out"))
        assert result.returncode == 2 and "--also" in result.stderr, hostile
    broken = tmp_path / "broken"
    broken.mkdir()
    for manifest in ("{not json", json.dumps({"stages": "x"}), json.dumps([1, 2])):
        (broken / "manifest.json").write_text(manifest)
        result = _bench("--collect", str(main), "--also", f"x={broken}", "--out", str(tmp_path / "out"))
        assert result.returncode == 1 and "To resolve" in result.stderr and "Traceback" not in result.stderr, manifest
