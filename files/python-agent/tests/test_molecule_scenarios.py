"""scripts/molecule-scenarios.sh: every scenario runs, and a failure's reason ends the output.

A CI log is often read from its end: the summary must name the failed scenario and repeat its
failing tests and assertion lines, which otherwise sit thousands of lines further up.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "scripts" / "molecule-scenarios.sh"

FAKE = r"""#!/usr/bin/env bash
# a stand-in for molecule: `test -s NAME`; the consumer scenario fails like a pytest verify
echo "running $3"
for i in $(seq 1 500); do echo "  │ filler line $i"; done
if [[ $3 == consumer ]]; then
  printf '  \033[31m│ tests/test_x.py::test_lost FAILED\033[0m\n'
  echo "  │ E   AssertionError: lost 3 lines (COLUMNS=$COLUMNS)"
  echo "  │ FAILED tests/test_x.py::test_lost - AssertionError: lost 3 lines"
  echo "  │ ======== 1 failed, 5 passed in 9.1s ========"
  exit 1
fi
echo "  │ ======== 6 passed in 9.1s ========"
"""


def test_a_failed_scenario_is_summarised_with_its_reason_at_the_end(tmp_path):
    fake = tmp_path / "molecule"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    run = subprocess.run(
        ["bash", str(SCRIPT), "-s", "consumer", "-s", "image"],
        env={"PATH": "/usr/bin:/bin", "MOLECULE": str(fake), "MOLECULE_LOG_DIR": str(tmp_path / "logs")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1, run.stderr
    out = run.stdout.splitlines()
    # the scenario after the failed one still ran
    assert "running image" in out and "  image: passed" in " ".join(out)
    tail = out[out.index("== molecule scenarios:") :]
    assert tail[-1] == "scenarios: 1 passed, 1 failed"
    why = "\n".join(tail)
    assert "== why consumer failed" in why and "why image failed" not in why
    assert "tests/test_x.py::test_lost FAILED" in why  # colour codes stripped
    assert "E   AssertionError: lost 3 lines (COLUMNS=200)" in why  # molecule does not wrap at 80
    # pytest's line per failed test comes after the assertion lines: a log cut short keeps it
    assert why.index("E   AssertionError") < why.index("FAILED tests/test_x.py::test_lost - ")
    assert "filler" not in why
    assert (tmp_path / "logs" / "consumer.log").read_text().count("filler line") == 500
