"""The runtime path starts without torch, transformers or onnx (docs/runtime.md): importing the
runtime, serve, validate, the device agent and the CLI loads none of them, and `edgekit run` /
`edgekit validate` on a real bundle answer with an import guard that fails on any of them.
No timings here: scripts/bench_startup.py measures the start-up."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import compress_tiny_bundle

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "onnx")

# A meta-path finder that refuses the heavy packages, records the attempt, and reports at exit.
GUARD = textwrap.dedent(
    """\
    import atexit, json, sys
    HEAVY = {heavy!r}
    attempts = []

    class Guard:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HEAVY:
                attempts.append(name)
                raise ImportError("import of " + name + " refused by the start-up guard")
            return None

    sys.meta_path.insert(0, Guard())

    def report():
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
        sys.stderr.write("\\nGUARD " + json.dumps({{"attempts": attempts, "loaded": loaded}}) + "\\n")

    atexit.register(report)
    """
).format(heavy=HEAVY)


def _guarded(code: str, *args: str, cwd: Path | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    result = subprocess.run([sys.executable, "-c", GUARD + code, *args], capture_output=True, text=True, cwd=cwd, timeout=600)
    line = next((l for l in reversed(result.stderr.splitlines()) if l.startswith("GUARD ")), None)
    assert line is not None, result.stderr[-2000:]
    return result, json.loads(line[len("GUARD "):])


def _runtime_modules() -> list[str]:
    import pkgutil

    import edgekit.runtime
    import edgekit.serve
    import edgekit.validate

    names = ["edgekit.cli", "edgekit.api", "edgekit.__main__", "edgekit.validate", "edgekit.deploy.agent",
             "edgekit.runtime", "edgekit.serve"]
    for package in (edgekit.runtime, edgekit.serve, edgekit.validate):
        names += [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
    return sorted(set(names))


def test_runtime_modules_import_without_torch_transformers_or_onnx():
    modules = _runtime_modules()
    assert "edgekit.runtime.tokenizer" in modules and "edgekit.runtime.backends" in modules
    # __main__ would run the CLI: import its module body only through runpy's guard below
    code = textwrap.dedent(
        f"""\
        import importlib
        for name in {[m for m in modules if m != "edgekit.__main__"]!r}:
            importlib.import_module(name)
        """
    )
    result, guard = _guarded(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert guard == {"attempts": [], "loaded": []}, guard


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model_dir) -> Path:
    return compress_tiny_bundle(tmp_path_factory.mktemp("startup"), tiny_model_dir)


RUN_CLI = textwrap.dedent(
    """\
    import runpy
    sys.argv = ["edgekit"] + sys.argv[1:]
    runpy.run_module("edgekit", run_name="__main__")
    """
)


def test_edgekit_run_loads_neither_torch_nor_transformers(bundle):
    result, guard = _guarded(RUN_CLI, "run", str(bundle), "--prompt", "The for statement is", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() and "[answered by small" in result.stderr
    assert guard == {"attempts": [], "loaded": []}, guard


def test_edgekit_run_streams_and_prints_json_without_them(bundle):
    result, guard = _guarded(RUN_CLI, "run", str(bundle), "--prompt", "Hello", "--max-new-tokens", "4", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["branch"] == "small"
    assert guard == {"attempts": [], "loaded": []}, guard


def test_edgekit_validate_loads_neither_torch_nor_transformers(bundle, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The for statement is\nA list is\n")
    result, guard = _guarded(RUN_CLI, "validate", str(bundle), "--prompts", str(prompts), "--requests", "2", "--warmup", "0",
                             "--max-new-tokens", "4", "--output", str(tmp_path / "report"), cwd=tmp_path)
    assert result.returncode in (0, 1), result.stderr[-3000:]  # 1: a budget breached (timings are not checked here)
    assert (tmp_path / "report" / "validate.json").is_file()
    assert guard == {"attempts": [], "loaded": []}, guard


def test_serve_parser_renders_chat_without_them(bundle):
    """The serve side of the tokenizer: the chat template through the bundle's tokenizer (the
    tiny bundle has none, so a template is given) with nothing heavy loaded."""
    code = textwrap.dedent(
        f"""\
        from edgekit.runtime.backends import load_branch
        branch = load_branch({str(bundle)!r}, name="small", backend="onnxruntime")
        tok = branch.tokenizer
        tok.chat_template = "{{% for m in messages %}}<{{{{ m.role }}}}>{{{{ m.content }}}}{{% endfor %}}{{% if add_generation_prompt %}}<assistant>{{% endif %}}"
        text = tok.apply_chat_template([{{"role": "user", "content": "hi"}}], tokenize=False, add_generation_prompt=True)
        assert text == "<user>hi<assistant>", text
        assert tok.encode(text) and tok.eos_token_id is not None and tok(text)["input_ids"] == tok.encode(text)
        """
    )
    result, guard = _guarded(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert guard == {"attempts": [], "loaded": []}, guard
