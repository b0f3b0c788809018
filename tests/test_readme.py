"""The README's Python blocks, run in order in one namespace as a reader runs them, and the
tutorial notebook's code cells likewise: on the MNIST files, cut to a few hundred images
per split so that the training in them takes seconds."""

import dataclasses
import json
import re
import sys

import matplotlib
import pytest

from helpers import REPO

SPLIT_SIZES = {"train": 300, "valid": 100, "test": 100}


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def notebook_cells(path) -> list[str]:
    cells = json.loads(path.read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


@pytest.fixture
def small_mnist(mnist_root, monkeypatch, tmp_path):
    """``load_dataset`` everywhere in the package returns the first few images of each split."""
    import pyro_vae.data

    real = pyro_vae.data.load_dataset

    def load_small(*args, **kwargs):
        data = real(*args, **kwargs)
        cut = lambda parts: {k: v[: SPLIT_SIZES.get(k, 100)] for k, v in parts.items()}  # noqa: E731
        return dataclasses.replace(data, splits=cut(data.splits), labels=cut(data.labels))

    for name, module in list(sys.modules.items()):
        if name.startswith("pyro_vae") and getattr(module, "load_dataset", None) is real:
            monkeypatch.setattr(module, "load_dataset", load_small)
    monkeypatch.setenv("PYRO_VAE_DATA", str(mnist_root))
    monkeypatch.chdir(tmp_path)
    matplotlib.use("Agg")


def run_in_order(blocks: list[str], where: str) -> dict:
    namespace: dict = {"__name__": "__main__"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{where}, block {i + 1}", "exec"), namespace)
    return namespace


def test_the_readmes_python_blocks_run_in_order(small_mnist):
    blocks = python_blocks((REPO / "README.md").read_text())
    assert len(blocks) >= 5 and "SVI(vae.model, vae.guide" in blocks[1]  # From Python opens with Pyro's loop
    namespace = run_in_order(blocks, "README.md")
    assert namespace["probs"].shape == (8, 10) and namespace["est"].log_px.shape == (100,)


def test_the_tutorial_notebook_runs_and_was_saved_with_its_outputs(small_mnist):
    path = REPO / "experiments" / "tutorial.ipynb"
    cells = json.loads(path.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code and all(c.get("outputs") for c in code if "plt.show()" in "".join(c["source"]))
    assert any(o.get("data", {}).get("image/png") for c in code for o in c["outputs"])
    run_in_order(notebook_cells(path), "tutorial.ipynb")
