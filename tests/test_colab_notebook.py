"""The Colab smoke notebook is a valid notebook whose code cells run (on a reduced config)."""

from pathlib import Path

import nbformat
from test_launch import SMALL

NOTEBOOK = Path(__file__).resolve().parents[1] / "launch" / "colab_smoke.ipynb"


def test_notebook_is_valid_and_its_cells_run(tmp_path, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    assert any("!pip install" in source for source in code), "the notebook should install jaxcollab first"
    monkeypatch.chdir(tmp_path)  # the notebook writes runs/colab-smoke relative to where it runs

    namespace: dict = {}
    for source in code:
        lines = [line for line in source.splitlines() if not line.lstrip().startswith(("!", "%"))]
        exec(compile("\n".join(lines), str(NOTEBOOK), "exec"), namespace)
        if "config" in namespace and "results_path" not in namespace:  # shrink the run before it starts
            for key, value in SMALL.items():
                node = namespace["config"]
                *parents, leaf = key.split(".")
                for part in parents:
                    node = node[part]
                node[leaf] = value
    results = namespace["results"]
    assert set(results["strategies"]) == {"seq_fft", "seq_lora", "avg_lora", "moe_gateless"}
    assert (tmp_path / "runs" / "colab-smoke" / "R_matrices.png").is_file()
