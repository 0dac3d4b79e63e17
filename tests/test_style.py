"""The formatter owns the layout: no `# fmt: skip` anywhere (`ruff format --check` runs in `make style`)."""

from .conftest import ROOT


def test_no_fmt_skip():
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for folder in ("vitask_pl", "tests", "scripts")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "# fmt: skip" in line and path.name != "test_style.py"
    ]
    assert not offenders, offenders
