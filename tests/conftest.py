import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def fixtures_dir() -> Path:
    """The golden fixture set: $LIVEAVATAR_FIXTURES or ../shared/fixtures/liveavatar_tiny."""
    env = os.environ.get("LIVEAVATAR_FIXTURES")
    return Path(env) if env else REPO.parent / "shared" / "fixtures" / "liveavatar_tiny"


@pytest.fixture(scope="session")
def fixtures() -> Path:
    path = fixtures_dir()
    if not (path / "manifest.json").exists():
        pytest.fail(f"fixture set not found at {path}; set LIVEAVATAR_FIXTURES")
    return path


@pytest.fixture(scope="session")
def ckpt_dir(fixtures) -> Path:
    return fixtures / "ckpt" / "Wan2.2-S2V-14B"


@pytest.fixture(scope="session")
def manifest(fixtures) -> dict:
    import json

    return json.loads((fixtures / "manifest.json").read_text())


@pytest.fixture()
def writable_ckpt(tmp_path, fixtures) -> Path:
    """A copy of the fixture `ckpt/` (official folder and LoRA folder) that a test may damage."""
    import shutil
    import stat

    root = tmp_path / "ckpt"
    shutil.copytree(fixtures / "ckpt", root, copy_function=shutil.copyfile)
    for folder, dirs, _ in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(folder, d), stat.S_IRWXU)
    return root
