"""`python run.py` on a machine without the release: one line saying what to fetch and where."""

import subprocess
import sys
from pathlib import Path

RUN_PY = Path(__file__).resolve().parents[1] / "run.py"


def run_py(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUN_PY)], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)  # tests read the exit status


def test_without_a_checkpoint_it_says_what_to_download_where_and_what_to_run(tmp_path):
    out = run_py(tmp_path)
    assert out.returncode == 1
    ckpt0 = tmp_path.resolve() / "checkpoints" / "ckpt-0"
    assert out.stderr == (
        f"run.py: no release checkpoint at {ckpt0}: download it (318 GB, 770 files) with "
        "`huggingface-cli download xai-org/grok-1 --repo-type model --include 'ckpt-0/*' "
        "--local-dir checkpoints` (or the torrent in xai-org/grok-1's README), so that "
        f"{ckpt0}/tensor00000_000 ... tensor00769_000 exist; put "
        "https://github.com/xai-org/grok-1/raw/main/tokenizer.model in "
        f"{tmp_path.resolve() / 'tokenizer.model'}; then run `python run.py` here again\n")


def test_without_a_tokenizer_it_says_where_to_get_it(tmp_path):
    (tmp_path / "checkpoints" / "ckpt-0").mkdir(parents=True)
    out = run_py(tmp_path)
    assert out.returncode == 1
    assert out.stderr == (
        f"run.py: no tokenizer at {tmp_path.resolve() / 'tokenizer.model'}: download "
        "https://github.com/xai-org/grok-1/raw/main/tokenizer.model there, then run "
        "`python run.py` here again\n")


def test_an_empty_checkpoint_folder_is_one_line_naming_it(tmp_path, tokenizer_path):
    (tmp_path / "checkpoints" / "ckpt-0").mkdir(parents=True)
    (tmp_path / "tokenizer.model").symlink_to(tokenizer_path)
    out = run_py(tmp_path)
    assert out.returncode == 1
    assert out.stderr == (
        "run.py: CheckpointError: checkpoints/ckpt-0: no ckpt-0/ folder and no tensorNNNNN_000 "
        "files in it; the release's 770 files tensor00000_000 ... tensor00769_000 go in "
        "checkpoints/ckpt-0/\n")
