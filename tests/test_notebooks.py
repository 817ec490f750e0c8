"""The notebooks and docs as a reader meets them, checked without running them (nbval runs them).

No placeholder install URLs and a setup cell that says what to do; no reference to notes the project does not
ship; links into docs/fox.md that land on a real section; math that renders without MathJax (an HTML export
opened offline has none); and notebook 06's smoothed loss curve computed from real values only.
"""

import base64
import importlib.util
import json
import math
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9]*.ipynb"))
DOCS = REPO / "docs" / "fox.md"
TEXT_SUFFIXES = {".py", ".md", ".ipynb", ".toml", ".yml", ".yaml", ".txt", ".cfg"}
SKIP_DIRS = {".git", ".venv", "runs", "build", "test-artifacts", "__pycache__", ".pytest_cache", ".ipynb_checkpoints",
             ".gpu", ".anchors", ".whl"}  # the last three: git-ignored scratch of GPU runs
UNSHIPPED_NOTES = "FOX" + ".md"  # the team's private notes; spelled apart so this file does not cite them
# Files the kernels rewrite still has to update (see the lead's merge notes); empty this set when it lands.


def cells(path: Path, kind: str | None = None) -> list[dict]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return [c for c in nb["cells"] if kind is None or c["cell_type"] == kind]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def project_files():
    for path in sorted(REPO.rglob("*")):
        rel = path.relative_to(REPO)
        if path.is_file() and not SKIP_DIRS & set(rel.parts) and not any(p.endswith(".egg-info") for p in rel.parts):
            if path.suffix in TEXT_SUFFIXES or path.name == "Makefile":
                yield rel.as_posix(), path.read_text(encoding="utf-8", errors="replace")


def test_notebooks_exist():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]


# --- setup ------------------------------------------------------------------------------------------


def test_every_notebook_says_how_to_install_and_checks_it():
    checks = set()
    for path in NOTEBOOKS:
        intro = source(cells(path)[0])
        assert "<your-git-host>" not in intro and "git+https" not in intro, path.name  # no made-up URL
        assert 'pip install -e ".[notebooks]"' in intro and "!pip install ./foxlab" in intro, path.name
        first_code = source(cells(path, "code")[0])
        assert first_code.startswith("# Setup check"), path.name
        checks.add(first_code)
    assert len(checks) == 1, "the setup check is the same cell in every notebook"


@pytest.mark.parametrize("colab", [True, False], ids=["colab", "elsewhere"])
def test_setup_check_says_what_to_do_when_foxlab_is_missing(monkeypatch, colab):
    check = source(cells(NOTEBOOKS[0], "code")[0])
    exec(check, {})  # foxlab is installed here: the cell passes silently
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "foxlab" else find_spec(name, *a))
    if colab:
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    advice = (r"In Colab: put the repository in this runtime .* run `!pip install \./foxlab`" if colab else
              r'From a clone of the repository: pip install -e "\.\[notebooks\]"')
    with pytest.raises(ModuleNotFoundError, match="foxlab is not installed. " + advice):
        exec(check, {})


# --- references -------------------------------------------------------------------------------------


def test_nothing_cites_notes_the_project_does_not_ship():
    citing = [rel for rel, text in project_files() if UNSHIPPED_NOTES in text]
    assert citing == [], f"these files cite {UNSHIPPED_NOTES}: put what the reader needs in docs/fox.md"


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_into_the_docs_land_on_a_section():
    headings = [line.lstrip("#").strip() for line in DOCS.read_text(encoding="utf-8").splitlines()
                if line.startswith("## ")]
    assert "Adaptive computation pruning" in headings
    anchors = {github_anchor(h) for h in headings}
    links = 0
    for rel, text in project_files():
        for anchor in re.findall(r"docs/fox\.md#([\w-]+)", text):
            assert anchor in anchors, f"{rel}: no section #{anchor} in docs/fox.md"
            links += 1
        for name in re.findall(r'docs/fox\.md, \\?"([^"\\]+)\\?"', text):  # docstrings: docs/fox.md, "Variants"
            assert any(h.startswith(name) for h in headings), f"{rel}: no section {name!r} in docs/fox.md"
            links += 1
    assert links >= 8


def test_math_renders_without_mathjax():
    """$...$ needs MathJax: an HTML export opened offline shows it as raw LaTeX. We write math as text + HTML."""
    latex = re.compile(r"\$\$|\$[^\s$][^$\n]*\$")
    for path in NOTEBOOKS:
        for cell in cells(path, "markdown"):
            assert not latex.search(source(cell)), f"{path.name}: LaTeX in {source(cell)[:80]!r}"
    for doc in (DOCS, REPO / "README.md"):
        assert not latex.search(doc.read_text(encoding="utf-8")), doc.name


# --- notebook 06's loss by position -----------------------------------------------------------------


def plotly_array(value) -> np.ndarray:
    """A plotly JSON array: a list, or plotly's typed form {"dtype", "bdata"}."""
    if isinstance(value, dict):
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
    return np.asarray(value, dtype=np.float64)


def test_06_loss_by_position_smooths_real_values_only():
    """Each smoothed point is the mean of the raw losses at the last 1 + t // 4 positions (fewer at the start):
    no padding, so the first positions show their own losses, not position 0's."""
    cell = next(c for c in cells(NOTEBOOKS[5], "code") if "log_window" in source(c))
    figure = next(o["data"]["application/vnd.plotly.v1+json"] for o in cell["outputs"] if "data" in o)
    traces = {t["name"]: plotly_array(t["y"]) for t in figure["data"]}
    for name in ("FoX", "Transformer (RoPE)"):
        raw, smooth = traces[f"{name}, raw"].astype(np.float64), traces[name]
        expected = [raw[max(0, t + 1 - (1 + t // 4)): t + 1].mean() for t in range(len(raw))]
        np.testing.assert_allclose(smooth, expected, rtol=1e-9)
        assert smooth[:16].min() >= raw[:16].min() and smooth[:16].max() <= raw[:16].max()
        assert math.isclose(smooth[0], raw[0]) and len(raw) > 256


def test_06_trailing_mean_against_a_loop():
    """The notebook's smoothing helper itself, on random values and window widths (odd sizes included)."""
    cell = next(c for c in cells(NOTEBOOKS[5], "code") if "def trailing_mean" in source(c))
    code = source(cell)
    namespace = {"torch": torch}
    exec(code[code.index("def trailing_mean"):code.index("\nfig")], namespace)
    x = torch.rand(37, dtype=torch.float64)
    for width in (lambda t: 1 + t // 4, lambda t: torch.full_like(t, 10), lambda t: torch.full_like(t, 1)):
        got = namespace["trailing_mean"](x, width)
        widths = [min(int(width(torch.tensor(t))), t + 1) for t in range(len(x))]
        torch.testing.assert_close(got, torch.stack([x[t + 1 - w: t + 1].mean() for t, w in enumerate(widths)]))
