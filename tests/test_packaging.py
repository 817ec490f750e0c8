"""pyproject.toml: metadata that setuptools takes without deprecation warnings, and dependencies that are used."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_is_an_spdx_string_that_the_required_setuptools_reads():
    meta = pyproject()
    assert meta["project"]["license"] == "Apache-2.0"  # a table is deprecated (setuptools warns 3 times)
    assert "setuptools>=77" in meta["build-system"]["requires"]  # the first version that takes the string


def test_anywidget_is_a_real_dependency():
    """foxlab never imports anywidget, but plotly's FigureWidget (viz.explore, notebook 04) is built on it:
    without it plotly substitutes a class that raises ImportError."""
    assert any(d.startswith("anywidget") for d in pyproject()["project"]["dependencies"])
    import plotly.graph_objects as go

    assert go.FigureWidget().to_dict()["data"] == []
