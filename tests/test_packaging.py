"""How fairswitch is imported: kernels/ only as fairswitch.kernels (a top-level ``kernels`` is
Hugging Face's package, which transformers imports), and commands import only what they use."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path, **env: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _ours(path: str | None) -> bool:
    """Is ``path`` this repository's kernels/ (not, say, a virtual environment inside it)?"""
    return path is not None and Path(path).resolve().is_relative_to(ROOT / "kernels")


def test_kernels_directory_is_not_a_top_level_package():
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert not (ROOT / "kernels.py").exists()
    # From the root (first on sys.path, as with `python -m pytest`), `kernels` is at most a
    # namespace portion, which any installed regular package of that name wins over.
    origin = _python("import importlib.util as u; s = u.find_spec('kernels');"
                     "print(s.origin if s else None)", ROOT)
    assert not _ours(None if origin == "None" else origin), origin


def test_an_installed_kernels_package_wins_from_the_repository_root(tmp_path):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("WHO = 'installed'\n")
    # sys.path: the root ('' first), then PYTHONPATH: the root comes before the package.
    assert _python("import kernels; print(kernels.WHO)", ROOT, PYTHONPATH=str(site)) == "installed"


@pytest.mark.skipif(not any(d.metadata["Name"] == "kernels"
                            for d in importlib.metadata.distributions()),
                    reason="Hugging Face's kernels package is not installed")
def test_huggingface_kernels_resolves_to_its_distribution_from_the_root():
    path = _python("import kernels; print(kernels.__file__)", ROOT)
    assert not _ours(path), path
    _python("import transformers.integrations.hub_kernels", ROOT)  # what failed before


def test_fairswitch_kernels_import_from_a_source_tree(tmp_path):
    path = _python("import fairswitch.kernels.reference as r; print(r.__file__)", tmp_path,
                   PYTHONPATH=str(ROOT))
    assert Path(path).resolve() == (ROOT / "kernels" / "reference.py").resolve()


def test_generate_on_a_cpu_imports_neither_transformers_nor_triton(tmp_path):
    """Start-up is mostly imports: the CPU path reads configs and tokenizers without
    transformers, and runs no Triton kernel."""
    code = ("import sys; from fairswitch.cli.main import main;"
            "main(['generate', 'Hi', '--max-tokens', '2', '--device', 'cpu', '--no-progress']);"
            "print(sorted(m for m in ('transformers', 'triton') if m in sys.modules))")
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])  # a source tree too
    assert _python(code, tmp_path, PYTHONPATH=path).splitlines()[-1] == "[]"
