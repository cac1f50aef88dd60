"""The Makefile's choice of Python for .venv, driven with stand-in interpreters and a stand-in uv.

Each case copies the Makefile and tools/find_python.sh into a temporary folder and runs make
with a PATH holding only the stand-ins and the few tools the recipe needs: nothing is installed.
"""

import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = ("sh", "make", "touch", "mkdir", "cat", "chmod")


def _fake_python(path, version):
    """An interpreter that answers find_python.sh's version query with ``version``."""
    path.write_text(f"#!/bin/sh\necho {version}\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def project(tmp_path):
    """A copy of the build files, a bin folder on PATH, and a runner for make."""
    root = tmp_path / "project"
    (root / "tools").mkdir(parents=True)
    for name in ("Makefile", "setup.cfg", "pyproject.toml", "tools/find_python.sh"):
        shutil.copy(os.path.join(REPO, name), root / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        os.symlink(shutil.which(tool), bin_dir / tool)

    def make(*args):
        return subprocess.run(
            ["make", "--no-print-directory", *args],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
        )

    return root, bin_dir, make


def test_no_supported_python_is_one_line_and_creates_nothing(project):
    root, bin_dir, make = project
    _fake_python(bin_dir / "python3", "3.13")
    _fake_python(bin_dir / "python3.12", "3.12")
    run = make("setup")
    assert run.returncode == 2, run
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    for needle in (
        "no Python 3.9-3.11 found (python3 is 3.13)",
        "uv python install 3.11",
        "PYTHON=/path/to/python3.11 make demo",
    ):
        assert needle in lines[0], lines[0]
    assert run.stdout == ""
    assert not (root / ".venv").exists()


def test_first_supported_python_on_path(project):
    root, bin_dir, make = project
    _fake_python(bin_dir / "python3", "3.13")
    python310 = _fake_python(bin_dir / "python3.10", "3.10")
    _fake_python(bin_dir / "python3.9", "3.9")
    run = make("-n", "setup")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == f"{python310} -m venv .venv"
    # python3 itself is used when it is a supported version.
    _fake_python(bin_dir / "python3", "3.11")
    for name in ("python3.10", "python3.9"):
        (bin_dir / name).unlink()
    assert make("-n", "setup").stdout.splitlines()[0] == f"{bin_dir / 'python3'} -m venv .venv"


def test_python_given(project, tmp_path):
    root, bin_dir, make = project
    _fake_python(bin_dir / "python3.11", "3.11")
    given = _fake_python(tmp_path / "my_python", "3.10")
    run = make("-n", "setup", f"PYTHON={given}")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == f"{given} -m venv .venv"
    # A given Python of another version is refused, not replaced by the one on PATH.
    _fake_python(given, "3.12")
    run = make("setup", f"PYTHON={given}")
    assert run.returncode == 2
    assert f"PYTHON={given} is Python 3.12, not Python 3.9-3.11" in run.stderr
    assert len(run.stderr.splitlines()) == 1
    assert not (root / ".venv").exists()


def test_uv_provides_python_311_when_none_is_found(project, tmp_path):
    root, bin_dir, make = project
    _fake_python(bin_dir / "python3", "3.13")
    calls = tmp_path / "uv_calls"
    # A stand-in uv: records its arguments; "uv venv" makes a venv whose Python has no pip.
    (bin_dir / "uv").write_text(
        f"""#!/bin/sh
echo "$*" >> {calls}
if [ "$1" = venv ]; then
    mkdir -p .venv/bin && printf '#!/bin/sh\\nexit 1\\n' > .venv/bin/python
    chmod +x .venv/bin/python
fi
"""
    )
    (bin_dir / "uv").chmod(0o755)
    run = make("setup")
    assert run.returncode == 0, run.stderr
    assert calls.read_text().splitlines() == [
        "venv --python 3.11 .venv",
        "pip install --quiet --python .venv/bin/python -e .[test,plot,onnx,beam]",
    ]
    assert (root / ".venv" / ".installed").exists()
