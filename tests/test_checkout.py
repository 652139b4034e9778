"""A fresh clone as a new user has it: the suite in a folder whose name is no Python identifier, and the
core installed with pip and run from another folder (issue 14)."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What the tests below need of the checkout; .git, a .venv and build outputs stay behind.
CHECKOUT = ("pyproject.toml", "README.md", "__init__.py", "liveavatar_core", "nodes", "web", "workflows",
            "example_workflows", "example_inputs", "tests")
TEST_ONLY = ("librosa", "pytest")


def _copy_checkout(dest: Path) -> Path:
    dest.mkdir()
    skip = shutil.ignore_patterns("__pycache__", ".pytest_cache", "*.egg-info")
    for name in CHECKOUT:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=skip)
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


def test_tests_run_in_a_folder_named_like_the_default_clone(tmp_path, fixtures):
    # pytest used to import the root __init__.py (relative imports) as a plain module named after the
    # folder before the first test: every test errored in "ComfyUI-LiveAvatar", none in "liveavatar".
    copy = _copy_checkout(tmp_path / "ComfyUI-LiveAvatar")
    env = {**os.environ, "LIVEAVATAR_FIXTURES": str(fixtures)}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_nodes_contract.py::test_pack_registers_every_node_without_import_errors",
                          "tests/parity/test_scheduler.py"], cwd=copy, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "error" not in out.stdout.splitlines()[-1]


def test_core_installs_with_pip_and_runs_from_another_folder(tmp_path):
    # A copy, since pip writes build metadata into the folder it installs. A venv that sees this
    # interpreter's packages (torch, setuptools, pip), so the editable install needs no network.
    copy = _copy_checkout(tmp_path / "ComfyUI-LiveAvatar")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (purelib / "_parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    python, command = venv / "bin" / "python", venv / "bin" / "liveavatar"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--no-index", "-e", str(copy)], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run([str(command), "--help"], cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "demo" in out.stdout, out.stderr[-3000:]
    where = subprocess.run([str(python), "-c", "import liveavatar_core, importlib.util; "
                            "print(liveavatar_core.__file__); print(importlib.util.find_spec('nodes'))"],
                           cwd=elsewhere, capture_output=True, text=True, timeout=120)
    core_file, nodes_spec = where.stdout.split()
    assert Path(core_file) == copy / "liveavatar_core" / "__init__.py"
    assert nodes_spec == "None"  # the ComfyUI node layer is not installed as a package


def test_runtime_imports_no_test_only_package(fixtures):
    # librosa is the tests' reference for the audio loader only: the pack (core and nodes) must import
    # and load audio without it.
    code = f"""
import importlib, importlib.util, pkgutil, sys
for name in {TEST_ONLY!r}:
    sys.modules[name] = None  # any import of it raises ImportError
import liveavatar_core
for info in pkgutil.walk_packages(liveavatar_core.__path__, "liveavatar_core."):
    if not info.name.endswith("__main__"):
        importlib.import_module(info.name)
spec = importlib.util.spec_from_file_location("pack", {str(REPO / "__init__.py")!r})
pack = importlib.util.module_from_spec(spec)
sys.modules["pack"] = pack
spec.loader.exec_module(pack)
assert not sys.modules["pack.nodes"].IMPORT_ERRORS, sys.modules["pack.nodes"].IMPORT_ERRORS
from liveavatar_core.encoders.audio import load_audio
print(load_audio({str(fixtures / "inputs" / "audio.wav")!r}).shape[0])
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[-1]) > 0


def test_pyproject_dependencies_are_the_runtime_requirements():
    import tomllib

    def names(lines):
        return sorted(line.split(";")[0].strip() for line in lines if line.strip() and not line.startswith("#"))

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert names(project["dependencies"]) == names((REPO / "requirements.txt").read_text().splitlines())
    assert not {"torch", "torchvision", "torchaudio"} & {n.split(">")[0].split("=")[0] for n in
                                                         names(project["dependencies"])}
    test_extra = set(names(project["optional-dependencies"]["test"]))
    for name in TEST_ONLY:
        assert any(req.startswith(name) for req in test_extra)
        assert name not in (REPO / "requirements.txt").read_text()
