"""How the suite runs itself (tests/conftest.py): under ``-n`` the tests of the ``*_on_ray.py``
files one after another in one test process, the others beside them; Ray elsewhere is refused."""

import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# each test appends "<file> <xdist worker> <start> <end>" to $RECORD
BODY = '''import os, time

def _record(name):
    t0 = time.time()
    time.sleep(0.4)
    with open(os.environ["RECORD"], "a") as fh:
        fh.write(f"{name} {os.environ['PYTEST_XDIST_WORKER']} {t0} {time.time()}\\n")

def test_one():
    _record(__name__)

def test_two():
    _record(__name__)
'''


def run_suite(folder, record) -> subprocess.CompletedProcess:
    shutil.copy(os.path.join(REPO, "tests", "conftest.py"), folder / "conftest.py")
    (folder / "pytest.ini").write_text("[pytest]\n")  # (this repository's addopts stay out)
    env = {**os.environ, "RECORD": str(record), "PYTHONPATH": REPO, "COLUMNS": "300"}  # (summary lines whole)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "-q", str(folder)], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=300)


def test_the_ray_tests_run_one_after_another_in_one_test_process_first(tmp_path):
    for name in ("test_a_on_ray", "test_b_on_ray", "test_c", "test_d", "test_e"):
        (tmp_path / f"{name}.py").write_text(BODY)
    record = tmp_path / "record.txt"
    r = run_suite(tmp_path, record)
    assert r.returncode == 0 and "10 passed" in r.stdout, r.stdout + r.stderr
    rows = [line.split() for line in record.read_text().splitlines()]
    ray = sorted((float(s), float(e), w) for name, w, s, e in rows if name.endswith("_on_ray"))
    others = [(float(s), float(e), w) for name, w, s, e in rows if not name.endswith("_on_ray")]
    assert len(ray) == 4 and len({w for _, _, w in ray}) == 1  # one test process ...
    assert all(a[1] <= b[0] for a, b in zip(ray, ray[1:]))  # ... one after another
    assert all(s > ray[0][0] for s, _, w in others if w == ray[0][2])  # first there (the longest unit)
    assert {w for _, _, w in others} == {"gw0", "gw1"}  # the rest dealt to whichever is free


def test_ray_outside_the_on_ray_files_is_refused(tmp_path):
    (tmp_path / "test_x.py").write_text("def test_x(ray_cluster):\n    pass\n")
    # (Ray left started, as the guard sees it; a real one would run beside this suite's Ray tests)
    (tmp_path / "test_y.py").write_text("import sys, types\n\ndef test_y():\n    sys.modules['ray'] = types.SimpleNamespace(is_initialized=lambda: True)\n")
    r = run_suite(tmp_path, tmp_path / "record.txt")
    assert r.returncode == 1 and "2 errors" in r.stdout, r.stdout
    assert "test_x.py::test_x - Failed: this test starts Ray (ray_cluster): move it into a tests/test_*_on_ray.py file" in r.stdout
    assert "test_y.py::test_y - Failed: this test started Ray in the test process: move it into a tests/test_*_on_ray.py file" in r.stdout
