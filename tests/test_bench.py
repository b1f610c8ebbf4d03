"""`mmfree-fpga bench --only`: refreshes the named sections and keeps the others."""

import json

from mmfree_fpga.bench import SECTIONS, split_markdown
from mmfree_fpga.cli import main


def test_bench_only_updates_named_sections(tmp_path):
    md, js = tmp_path / "B.md", tmp_path / "B.json"
    assert main(["bench", "--only", "projection,packing", "--out", str(md), "--json-out", str(js)]) == 0
    parts = split_markdown(md.read_text())
    assert list(parts) == ["packing", "projection"]            # in SECTIONS order
    assert all(f"`mmfree-fpga bench --only {n}`" in parts[n] for n in parts)
    # mark the projection section: a run of --only packing must keep it verbatim
    marked = parts["projection"].replace("## ", "## [kept] ", 1)
    md.write_text(md.read_text().replace(parts["projection"], marked))
    assert main(["bench", "--only", "packing", "--out", str(md), "--json-out", str(js)]) == 0
    after = split_markdown(md.read_text())
    assert after["projection"] == marked
    assert list(after) == ["packing", "projection"]
    assert set(json.loads(js.read_text())["sections"]) == {"packing", "projection"}


def test_bench_unknown_section(capsys):
    assert main(["bench", "--only", "nonsense"]) != 0
    assert "unknown bench section" in capsys.readouterr().err


def test_bench_skip_keeps_skipped_sections(tmp_path):
    md = tmp_path / "B.md"
    assert main(["bench", "--only", "packing,projection", "--out", str(md)]) == 0
    before = split_markdown(md.read_text())
    marked = before["projection"].replace("## ", "## [kept] ", 1)
    md.write_text(md.read_text().replace(before["projection"], marked))
    assert main(["bench", "--only", "packing,projection", "--skip", "projection", "--out", str(md)]) == 0
    after = split_markdown(md.read_text())
    assert after["projection"] == marked and list(after) == ["packing", "projection"]
