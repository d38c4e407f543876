"""examples/kubeflow.ipynb, run top to bottom by a real kernel against the real server, as a user would."""

import json

import nbformat
from nbclient import NotebookClient

from .conftest import REPO

NOTEBOOK = REPO / "examples" / "kubeflow.ipynb"


def test_the_notebook_is_kept_without_outputs():
    for cell in json.loads(NOTEBOOK.read_text())["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, cell["source"][:80]


def test_the_notebook_runs_against_the_server(server, speech_wav, tmp_path, monkeypatch):
    clip = tmp_path / "speech.wav"
    clip.write_bytes(speech_wav)
    for name, value in {"AST_URL": server.url, "AST_MODEL": server.model_name, "AST_CLIP": str(clip)}.items():
        monkeypatch.setenv(name, value)  # the kernel inherits this environment
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the figures
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "ready: True" in text and "windows" in text and "nearest to 'the clip above':" in text
    assert "relevance over" in text
    # the waveform, the spectrogram, the bar chart, the explanation, the timeline and the audio search
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 6
