"""Re-run the notebooks and save their outputs (what GitHub shows), timing each one.

    python notebooks/refresh_outputs.py                    # every notebook, fast mode (FOXLAB_FAST=1)
    python notebooks/refresh_outputs.py --full 04 05       # selected notebooks (by prefix), full mode

Each notebook runs top to bottom in its own folder, as `jupyter nbconvert --to notebook --execute --inplace`
would run it, with one fix that nbconvert cannot make: a tqdm progress bar in a notebook is a widget whose plain
text copy (the one GitHub shows) is the bar at 0%. That copy is rewritten from the widget's final state, stored
with the notebook, e.g. "train segments: 100%|██████████| 150/150 [00:28<00:00, ...]". The stored widget state
is then dropped when it is large (an explorer's FigureWidget holds megabytes of figure data that a viewer without
a kernel cannot use anyway), to keep each notebook small on disk.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
MAX_WIDGET_STATE = 200_000  # bytes of JSON


def _progress_text(model_id: str, state: dict) -> str | None:
    """tqdm's text for a finished tqdm.notebook bar (HBox of HTML, FloatProgress, HTML), or None."""
    box = state.get(model_id, {})
    children = [c.removeprefix("IPY_MODEL_") for c in box.get("state", {}).get("children", [])]
    if box.get("model_name") != "HBoxModel" or len(children) != 3:
        return None
    left, bar, right = (state.get(c, {}) for c in children)
    if bar.get("model_name") != "FloatProgressModel":
        return None
    value, total = bar["state"].get("value", 0), bar["state"].get("max", 0) or 1
    filled = round(10 * min(value / total, 1))
    text = f"{left['state'].get('value', '')}|{'█' * filled}{' ' * (10 - filled)}|{right['state'].get('value', '')}"
    return html.unescape(text).replace("\u2007", " ")


def fix_progress_bars(nb) -> int:
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    fixed = 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get(WIDGET_VIEW)
            text = view and _progress_text(view["model_id"], state)
            if text:
                output["data"]["text/plain"] = text
                fixed += 1
    return fixed


def run(path: Path, timeout: int) -> float:
    nb = nbformat.read(path, as_version=4)
    started = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    elapsed = time.perf_counter() - started
    fix_progress_bars(nb)
    if len(json.dumps(nb.metadata.get("widgets", {}))) > MAX_WIDGET_STATE:
        del nb.metadata["widgets"]
    nbformat.write(nb, path)
    return elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefixes", nargs="*", help="notebook name prefixes (default: all)")
    parser.add_argument("--full", action="store_true", help="full mode (default: fast mode, FOXLAB_FAST=1)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args(argv)
    if args.full:
        os.environ.pop("FOXLAB_FAST", None)
        os.environ.pop("CI", None)
    else:
        os.environ["FOXLAB_FAST"] = "1"
    paths = sorted(p for p in HERE.glob("[0-9]*.ipynb") if not args.prefixes or p.name.startswith(tuple(args.prefixes)))
    total = 0.0
    for path in paths:
        elapsed = run(path, args.timeout)
        total += elapsed
        print(f"{path.name}: {elapsed:.0f} s", flush=True)
    print(f"total: {total:.0f} s ({'full' if args.full else 'fast'} mode)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
