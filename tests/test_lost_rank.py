"""A rank lost mid-training (SIGKILL) in a 2-process gloo run: the run stops with a clear error in bounded time,
every checkpoint written before stays intact, and the resumed 2-process run ends bit-identical to an uninterrupted
one."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from softalign.training import list_checkpoints, verify

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "two_process_lost_rank.py"


def _torchrun(port: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    return subprocess.run([*command, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_lost_rank_stops_the_run_cleanly_and_the_resumed_run_is_bit_identical(tmp_path):
    steps = 4
    whole = _torchrun("29561", str(tmp_path / "whole"), str(steps))
    assert whole.returncode == 0, whole.stderr[-3000:]

    run = tmp_path / "cut"
    started = time.monotonic()
    cut = _torchrun("29562", str(run), str(steps), "--kill-rank1-at", "2", timeout=300)
    assert cut.returncode != 0 and time.monotonic() - started < 300  # no hang: the survivor does not wait forever
    assert "SIGKILL" in cut.stderr or "Signal 9" in cut.stderr, cut.stderr[-3000:]  # the launcher names the loss
    checkpoints = list_checkpoints(run)
    # checkpoint-2 was being written when rank 1 died: it is whole or absent, never half there
    assert [int(c.name.split("-")[1]) for c in checkpoints] in ([1], [1, 2]), checkpoints
    assert all(verify(c) is None for c in checkpoints), [verify(c) for c in checkpoints]

    resumed = _torchrun("29563", str(run), str(steps), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for rank in (0, 1):
        a = load_file(tmp_path / "whole" / f"final-rank{rank}.safetensors")
        b = load_file(run / f"final-rank{rank}.safetensors")
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), f"rank {rank} differs after resume"
