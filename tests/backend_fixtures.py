"""The tiny bundle and its ONNX Runtime branch that the runtime backend tests share: pytest
fixtures (``bundle``, ``branch``, ``prompt``) and helpers, imported by the
tests/test_runtime_backends*.py modules. Not a test module itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compress_tiny_bundle

from edgekit.runtime.backends import OnnxRuntimeBranch

TEXT = "The interpreter reads a module, compiles each function to bytecode and runs it in a loop."
ATOL = 1e-4

# Building the bundle is the slow part, and no test changes it (they edit copies): one bundle
# per tiny model, however many modules import the fixture.
_BUNDLES: dict[Path, Path] = {}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model_dir) -> Path:
    if tiny_model_dir not in _BUNDLES:
        _BUNDLES[tiny_model_dir] = compress_tiny_bundle(tmp_path_factory.mktemp("backends"), tiny_model_dir)
    return _BUNDLES[tiny_model_dir]


@pytest.fixture(scope="module")
def branch(bundle) -> OnnxRuntimeBranch:
    return OnnxRuntimeBranch(bundle, threads=1)


@pytest.fixture(scope="module")
def prompt(branch) -> list[int]:
    ids = branch.tokenizer(TEXT)["input_ids"]
    assert len(ids) >= 20
    return ids[:20]


def fresh_rows(branch, tokens):
    session = branch.session()
    try:
        return session.feed(tokens)
    finally:
        session.close()
