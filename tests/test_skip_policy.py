"""No test skips silently (tests/conftest.py): a skip fails unless the test is marked ``gpu`` and the
machine has no CUDA device; a module-level ``importorskip`` fails its module; a missing test extra
(``peft``, ...) fails the session at its start. Each case runs in its own pytest process on a small
suite written here, with this suite's conftest hooks."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

CONFTEST = Path(__file__).resolve().parent / "conftest.py"


def _pytest(tmp_path, files: dict[str, str], extras: tuple[str, ...] | None = None) -> tuple[int, str]:
    hooks = ("pytest_sessionstart", "pytest_runtest_makereport", "pytest_make_collect_report",
             "pytest_collection_modifyitems")
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("studio_conftest", {str(CONFTEST)!r})
        studio = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(studio)
        if {extras!r} is not None:
            studio.TEST_EXTRAS = {extras!r}
        {"; ".join(f"{h} = studio.{h}" for h in hooks)}
    """))
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    for name, text in files.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def test_only_a_gpu_test_without_cuda_may_skip(tmp_path):
    code, out = _pytest(tmp_path, {
        "test_cases.py": """
            import pytest

            def test_runs():
                pass

            def test_skips_inside():
                pytest.skip("not today")

            @pytest.mark.skipif(True, reason="always true here")
            def test_skipif():
                pass

            @pytest.mark.gpu
            def test_needs_cuda():
                pass

            @pytest.mark.xfail(reason="a known bug", strict=True)
            def test_expected_failure():
                assert False
        """})
    assert code == 1, out
    assert "PASSED test_cases.py::test_runs" in out and "XFAIL test_cases.py::test_expected_failure" in out
    assert "FAILED test_cases.py::test_skips_inside" in out
    assert "ERROR test_cases.py::test_skipif" in out  # a skip mark acts at set-up, so it fails there
    assert "1 failed, 1 passed, 1 skipped, 1 xfailed, 1 error" in out or torch.cuda.is_available()
    assert "only tests marked gpu may skip" in out and "not today" in out
    gpu = "SKIPPED" if not torch.cuda.is_available() else "PASSED"
    assert f"{gpu} [1] test_cases.py" in out or f"{gpu} test_cases.py::test_needs_cuda" in out, out


def test_an_importorskip_fails_its_module(tmp_path):
    code, out = _pytest(tmp_path, {"test_needs_it.py": """
        import pytest

        pytest.importorskip("no_such_package_for_lora_studio")

        def test_never_collected():
            pass
    """})
    assert code != 0 and "test_needs_it.py" in out and "only tests marked gpu may skip" in out, out
    assert "no_such_package_for_lora_studio" in out


def test_a_missing_test_extra_fails_the_session_by_name(tmp_path):
    code, out = _pytest(tmp_path, {"test_fine.py": "def test_fine():\n    pass\n"},
                        extras=("peft", "no_such_oracle_for_lora_studio"))
    assert code != 0 and "the tests need no_such_oracle_for_lora_studio" in out, out
    assert "1 passed" not in out
