"""``accelerate launch -m deblurcli deblur IN OUT``: two CPU processes share a folder.

accelerate's ``--cpu`` starts a single process, so the test launches two through its torchrun
launcher (``--multi_gpu``, which needs no GPU) and gives ``--device cpu`` (gloo between them).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from deblurcli.distributed import cpu_threads_share, launched_processes
from deblurcli.images import write_image

pytest.importorskip("accelerate")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_launched_processes_reads_world_size(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_processes() == 1 and cpu_threads_share(None) == 0
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launched_processes() == 4


@pytest.mark.slow  # two fresh Python processes import torch and load the model: ~20-60 s
def test_two_processes_deblur_every_file_once_with_one_summary(tiny_model_folder, tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "in"
    names = [f"p{i}.png" for i in range(5)]
    for name in names:
        write_image(src / name, rng.random((24, 32, 3), dtype=np.float32))
    (src / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "deblurcli", "deblur", str(src), str(out), "--weights", str(tiny_model_folder),
           "--device", "cpu", "--tile", "0", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr  # bad.png failed in one process
    # one summary for both processes: every file counted once, the failure listed once
    assert re.findall(r"processed \d+, skipped \d+, failed \d+", res.stdout) == \
        ["processed 5, skipped 0, failed 1"], res.stdout
    assert res.stdout.count("failed: ") == 1 and "bad.png" in res.stdout
    assert "process 1/2" in res.stderr and "process 2/2" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == names
