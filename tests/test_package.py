import subprocess
import sys

from conftest import run_cli

import edgekit
from edgekit.errors import EdgekitError, RecipeError


def test_import_is_light():
    code = (
        "import sys, edgekit, edgekit.api, edgekit.cli, edgekit.recipe, edgekit.pipeline.runner, edgekit.targets;"
        "import edgekit.pipeline.registry as r; r.all_stages();"
        "heavy = [m for m in ('torch', 'transformers', 'onnx', 'onnxruntime', 'optimum') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_version_and_help():
    result = run_cli("--version")
    assert result.returncode == 0 and edgekit.__version__ in result.stdout
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("compress", "recipe", "targets", "stages"):
        assert command in result.stdout


def test_error_line_format():
    err = RecipeError("unknown key 'stagse'", where="r.yaml line 3: stagse", how="rename it to 'stages'.")
    assert err.one_line() == "unknown key 'stagse' (r.yaml line 3: stagse). To resolve, rename it to 'stages'."
    assert isinstance(err, EdgekitError) and err.exit_code == 2


def test_stages_command_lists_registered_and_designed():
    result = run_cli("stages")
    assert result.returncode == 0
    for stage in ("load", "evaluate", "export_onnx", "bundle"):
        assert f"{stage}:" in result.stdout
    assert "build_engine:" in result.stdout and "designed" not in result.stdout
    for stage in ("prune", "distill"):
        assert f"{stage}:" in result.stdout


def test_every_subpackage_is_packaged():
    """A non-editable install must carry every edgekit/ subpackage (pyproject lists them)."""
    import tomllib
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(repo).parts)
        for p in (repo / "edgekit").rglob("__init__.py")
    }
    assert found <= listed, sorted(found - listed)
