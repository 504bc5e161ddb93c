"""Hand-written files in ``hwgen/rtl_templates/``: found, filled with placeholders, copied.

Templates hold no logic: only ``@NAME@`` placeholders that the build fills in (top module,
source list, clock period), so users with vendor tools can run their own flows.
"""

from __future__ import annotations

import re
from importlib import resources

from hwgen.errors import HwgenError

# Package data: shipped inside the wheel, so a plain `pip install .` finds it too.
TEMPLATE_DIR = resources.files("hwgen") / "rtl_templates"
_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")


def template(name: str) -> str:
    """The text of ``hwgen/rtl_templates/<name>``."""
    path = TEMPLATE_DIR / name
    if not path.is_file():
        raise HwgenError(f"template {name} not found in {TEMPLATE_DIR} (broken install?)")
    return path.read_text()


def fill(text: str, values: dict[str, str]) -> str:
    """Replace every ``@NAME@``; a placeholder without a value is an error, not left behind."""

    def sub(match: re.Match[str]) -> str:
        if match.group(1) not in values:
            raise HwgenError(f"template placeholder @{match.group(1)}@ has no value")
        return values[match.group(1)]

    return _PLACEHOLDER.sub(sub, text)


def vendor_projects(top: str, sources: list[str], clock_mhz: float) -> dict[str, str]:
    """Vivado (Arty A7) and Quartus project files for ``top``, keyed by relative path."""
    values = {
        "TOP": top,
        "CLOCK_PERIOD_NS": f"{1000.0 / clock_mhz:.3f}",
        "READ_SOURCES": "\n".join(f"read_verilog ../{s}" for s in sources),
        "SOURCE_ASSIGNMENTS": "\n".join(
            f"set_global_assignment -name VERILOG_FILE ../{s}" for s in sources
        ),
    }
    files = {
        "vivado/build.tcl": "vivado/build.tcl",
        "vivado/arty_a7.xdc": "vivado/arty_a7.xdc",
        f"quartus/{top}.qsf": "quartus/project.qsf",
        f"quartus/{top}.sdc": "quartus/top.sdc",
    }
    return {out: fill(template(src), values) for out, src in files.items()}
