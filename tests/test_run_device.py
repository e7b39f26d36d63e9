"""bench/run_device.sh's ending (the device tool returns only a few files of $OUT): everything
it wrote is packed into $OUT/results.tgz, and its exit status is its first failing step's."""

import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_device(tmp_path: Path, *steps: str, pack: str = "1") -> tuple[int, Path]:
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "earlier.jsonl").write_text("{}\n")  # what a step left in a sub-folder
    # `profile` fails here (no GPU: bench/profile_step.py exits non-zero); an unknown step
    # name does nothing
    env = {"OUT": str(out), "PACK": pack, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    proc = subprocess.run(["bash", "bench/run_device.sh", *steps], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, out


def test_outputs_are_packed_into_one_file_and_a_failing_step_fails_the_call(tmp_path):
    rc, out = run_device(tmp_path, "profile", "nothing")
    assert rc != 0
    assert [p.name for p in out.iterdir()] == ["results.tgz"]
    with tarfile.open(out / "results.tgz") as tar:
        names = set(tar.getnames())
    assert {"./sub/earlier.jsonl", "./profile.log", "./gpu.txt"} <= names


def test_a_passing_call_exits_0_and_pack_0_keeps_the_files(tmp_path):
    rc, out = run_device(tmp_path, "nothing", pack="0")
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["gpu.txt", "sub"]
