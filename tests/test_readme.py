"""The README's quickstart blocks run as written, in a folder with nothing but `examples/`.

The `bash` blocks of the "Quickstart" section are executed by one bash, in order (with `V` pointing at this
interpreter instead of `.venv/bin/python`), so a renamed flag or file in the README fails
here rather than for a new user."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def quickstart_blocks(text: str) -> list[str]:
    """The ```bash blocks between '## Quickstart' and the next '## ' heading."""
    start = text.index("## Quickstart")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```bash\n(.*?)```", text[start:end], flags=re.S)


def test_quickstart_blocks_are_found_and_use_examples_only():
    blocks = quickstart_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 2, "the plain and the conversational quickstart"
    for block in blocks:
        for path in re.findall(r"examples/[\w./-]+", block):
            assert (ROOT / path.split(":")[0]).is_file(), path


@pytest.mark.slow
def test_quickstart_blocks_run_as_written(tmp_path):
    blocks = quickstart_blocks((ROOT / "README.md").read_text())
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # one shell for all blocks, as a user pastes them one after the other
    script = "set -euo pipefail\n" + "\n".join(blocks).replace("V=.venv/bin/python", f"V={sys.executable}")
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"README quickstart:\n{done.stderr[-3000:]}"
    run = tmp_path / "runs" / "quickstart" / "run"
    assert (run / "model.safetensors").is_file()
    card = (run / "README.md").read_text()
    assert "drawn from pi_ref itself: True" in card and "sentiment_aux.py:prefer_positive" in card
    prov = (run / "manifests" / "provenance.json").read_text()
    assert '"stored_sample_logp_error": 0.0' in prov  # sampling and training agree on every log-prob
    assert (tmp_path / "runs" / "quickstart-chat" / "gate" / "gate.json").is_file()
