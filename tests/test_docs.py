"""The tables in README.md and docs/*.md are generated from benchmarks/results/*.json by benchmarks/make_docs.py:
a doc that drifted from its JSON (or a hand-edited number) fails here. Fast: JSON and Markdown only."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "make_docs.py"


def _check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--check", "--root", str(root)],
                          capture_output=True, text=True, timeout=120)


def _copy(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copytree(ROOT / "benchmarks" / "results", tmp_path / "benchmarks" / "results",
                    ignore=shutil.ignore_patterns("*.png", "*.log"))
    return tmp_path


def test_docs_are_up_to_date():
    result = _check(ROOT)
    assert result.returncode == 0, result.stderr


def test_every_generated_table_is_used_and_every_block_is_known():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import make_docs
    finally:
        sys.path.remove(str(SCRIPT.parent))
    used = {m.group("name") for doc in make_docs.docs(ROOT) for m in make_docs.BLOCK.finditer(doc.read_text())}
    assert used == set(make_docs.TABLES)
    assert "headline" in {m.group("name") for m in make_docs.BLOCK.finditer((ROOT / "README.md").read_text())}


def test_a_hand_edited_number_is_caught(tmp_path):
    root = _copy(tmp_path)
    readme = root / "README.md"
    text = readme.read_text()
    block = re.search(r"<!-- table:headline -->.*?<!-- /table -->", text, re.S).group(0)
    assert "23.28" in block  # SmolLM2, the CLI default's perplexity (its row in screen.json)
    readme.write_text(text.replace(block, block.replace("23.28", "22.28", 1)))
    result = _check(root)
    assert result.returncode == 1 and "README.md: headline" in result.stderr


def test_a_changed_json_is_caught_and_rewrite_fixes_it(tmp_path):
    root = _copy(tmp_path)
    path = root / "benchmarks" / "results" / "speed_cpu_decode.json"
    path.write_text(path.read_text().replace('"fused/base": 0.9024339003737664', '"fused/base": 0.5', 1))
    result = _check(root)
    assert result.returncode == 1 and "docs/speed.md: decode-cpu" in result.stderr
    subprocess.run([sys.executable, str(SCRIPT), "--no-plot", "--root", str(root)], check=True, capture_output=True,
                   timeout=120)
    assert _check(root).returncode == 0
    assert "**0.50**" in (root / "docs" / "speed.md").read_text()


@pytest.mark.parametrize("doc", ["README.md"] + sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")))
def test_links_to_results_and_docs_exist(doc):
    path = ROOT / doc
    for target in re.findall(r"\]\(([^)#]+)\)", path.read_text()):
        if target.startswith("http"):
            continue
        assert (path.parent / target).exists(), f"{doc}: broken link {target}"
