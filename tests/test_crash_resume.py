"""Crash and resume (issue 7, item 1): runs killed with SIGKILL at seeded random points, resumed each time with
"latest", end bit-identical to an uninterrupted run, and nothing saved is lost.

The helper `tests/crash_train.py --serve` runs in a subprocess and forks one process per life of a run (imports are
paid once per module), so each kill is a real SIGKILL of a real training process: the run lock, half-written staging
directories and interrupted rotations are whatever the kernel leaves. Kill points are seeded: the step after which
to kill and a delay of 0-1.5 steps (measured on the uninterrupted run, so it scales with the machine); one kill is
placed inside a checkpoint write. Between lives the newest checkpoint is damaged on purpose once and complete-looking
staging copies are planted; neither may be loaded. `crash_and_resume` is also what `scripts/reliability_report.py`
runs for its table.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from softalign.training import list_checkpoints, verify

pytestmark = pytest.mark.slow  # killed and resumed runs in subprocesses: `make test-all`

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "crash_train.py"
STEPS = {"softalign": 14, "ddpo": 10}  # SoftAlign optimiser steps / DDPO epochs of one run
LINE_TIMEOUT = 240  # seconds a life may go without printing the line we wait for (a loaded CI machine)
PLANTED_STAGING = ".checkpoint-999.tmp-deadbeef"
PLANTED_OLD = ".checkpoint-998.old-deadbeef"


class LineReader:
    """Lines of a subprocess's stdout, read without blocking past a deadline."""

    def __init__(self, stream):
        self.stream = stream
        self.lines: list[tuple[float, str]] = []  # (arrival time, line)
        self._buffer = b""
        self.eof = False

    def read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.stream], [], [], timeout)
        if not ready:
            return
        chunk = os.read(self.stream.fileno(), 65536)
        if not chunk:
            self.eof = True
            return
        self._buffer += chunk
        *complete, self._buffer = self._buffer.split(b"\n")
        now = time.monotonic()
        self.lines += [(now, line.decode(errors="replace").strip()) for line in complete]

    def next_line(self, deadline: float, what: str) -> tuple[float, str]:
        while not self.lines:
            if self.eof:
                raise RuntimeError(f"the crash server ended while waiting for {what}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} within {LINE_TIMEOUT} s")
            self.read(min(1.0, max(0.0, deadline - time.monotonic())))
        return self.lines.pop(0)


class CrashServer:
    """`tests/crash_train.py --serve` in a subprocess: it forks one process per life (imports paid once)."""

    def __init__(self, log: Path):
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        self._stderr = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=environment,
        )
        self.reader = LineReader(self.proc.stdout)
        _, line = self.reader.next_line(time.monotonic() + LINE_TIMEOUT, "'ready'")
        if line != "ready":
            raise RuntimeError(f"the crash server said {line!r} instead of 'ready' (see {log})")

    def start(self, kind: str, output_dir: Path, result: Path, steps: int, log: Path, kill_in_save=None) -> Life:
        job = {"kind": kind, "output_dir": str(output_dir), "result": str(result), "steps": steps, "log": str(log)}
        job["kill_in_save"] = kill_in_save
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.proc.stdin.flush()
        _, line = self.reader.next_line(time.monotonic() + LINE_TIMEOUT, "'pid'")
        if not line.startswith("pid "):
            raise RuntimeError(f"the crash server said {line!r} instead of the pid of the new life")
        return Life(self, int(line.split()[1]), log)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self._stderr.close()


class Life:
    """One run process (a fork of the crash server), killed with SIGKILL or left to finish."""

    def __init__(self, server: CrashServer, pid: int, log: Path):
        self.server, self.pid, self.log = server, pid, log
        self.lines: list[str] = []
        self.times: list[float] = []  # when each line arrived
        self.exit_code: int | None = None

    def _next(self, deadline: float) -> None:
        arrived, line = self.server.reader.next_line(deadline, f"output of life {self.pid}")
        if line.startswith("exit "):
            self.exit_code = int(line.split()[1])
        else:
            self.lines.append(line)
            self.times.append(arrived)

    def step_seconds(self) -> float:
        """The median time between consecutive `step` lines (one optimiser step / epoch, with its checkpoint)."""
        times = [t for t, line in zip(self.times, self.lines, strict=True) if line.startswith("step ")]
        gaps = sorted(b - a for a, b in zip(times, times[1:], strict=False))
        return gaps[len(gaps) // 2] if gaps else 0.5

    def wait_for(self, line: str, timeout: float = LINE_TIMEOUT) -> bool:
        """Read until `line` is printed (True) or the life ends without printing it (False)."""
        deadline = time.monotonic() + timeout
        while line not in self.lines:
            if self.exit_code is not None:
                return False
            self._next(deadline)
        return True

    def kill(self) -> None:
        if self.exit_code is None:
            os.kill(self.pid, signal.SIGKILL)

    def finish(self, timeout: float = LINE_TIMEOUT) -> int:
        """Read the rest of its output (lines printed before a kill count) until it has exited; its exit code."""
        deadline = time.monotonic() + timeout
        while self.exit_code is None:
            self._next(deadline)
        return self.exit_code

    def numbers(self, prefix: str) -> list[int]:
        return [int(m.group(1)) for line in self.lines if (m := re.fullmatch(rf"{prefix} checkpoint-(\d+)", line))]

    @property
    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class CrashReport:
    """What happened over the lives of one crashed-and-resumed run (one row of the reliability table)."""

    kind: str
    kills: list[str] = field(default_factory=list)  # where each SIGKILL landed (the last line printed before it)
    resumes: list[int] = field(default_factory=list)  # checkpoint each later life resumed from (0: from scratch)
    expected_resumes: list[int] = field(default_factory=list)  # newest checkpoint on disk that verifies
    staging_left: list[str] = field(default_factory=list)  # staging / moved-aside directories a kill left behind
    damaged_on_purpose: list[str] = field(default_factory=list)
    damaged_found: list[str] = field(default_factory=list)  # checkpoints on disk that fail verification after a kill
    damaged_warned: list[str] = field(default_factory=list)  # ... that a later life skipped with a warning naming it
    damaged_unseen: list[str] = field(default_factory=list)  # ... older than a good one, so never considered
    data_lost: int = 0  # published checkpoints a resume went behind + tensors that differ from the uninterrupted run
    mismatched: list[str] = field(default_factory=list)
    tensors_compared: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.data_lost == 0 and not self.mismatched


def _good_and_bad(run: Path) -> tuple[list[Path], list[Path]]:
    good, bad = [], []
    for path in list_checkpoints(run):
        (good if verify(path) is None else bad).append(path)
    return good, bad


def _step_of(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def crash_and_resume(
    server: CrashServer,
    kind: str,
    root: Path,
    kills: int = 3,
    seed: int = 0,
    kill_in_save: bool = True,
    tamper: bool = True,
) -> CrashReport:
    """Run `kind` ("softalign" or "ddpo") once uninterrupted and once through `kills` seeded random SIGKILLs (plus one
    inside a checkpoint write when `kill_in_save`), resuming with "latest" after each; compare the final states.

    With `tamper`, after the first kill (from the second on) that leaves two good checkpoints, the newest one is
    truncated on purpose and a complete, verifying copy of it is planted as a staging directory
    `.checkpoint-999.tmp-*` (and as a moved-aside `.checkpoint-998.old-*`): the next life must resume from the older
    good one with a warning naming the damaged one, and never from the planted copies.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    steps = STEPS[kind]
    rng = random.Random(f"{kind}-{seed}")
    report = CrashReport(kind)
    run, result = root / "run", root / "result.safetensors"
    reference = server.start(kind, root / "reference", root / "reference.safetensors", steps, root / "reference.log")
    if reference.finish() != 0:
        report.problems.append(f"the uninterrupted run failed: {reference.stderr[-2000:]}")
        return report
    step_seconds = reference.step_seconds()  # kill points are drawn in units of this machine's step time

    plan = ["random"] * kills
    if kill_in_save:
        plan.insert(min(1, len(plan)), "save")
    published: set[int] = set()  # checkpoints a life announced as saved (renamed into place)
    expected, warned_for = 0, []  # newest good checkpoint on disk; damaged ones newer than it (need a warning)
    for life_index, action in enumerate([*plan, "finish"]):
        first_step = expected + (1 if kind == "softalign" else 0)  # the first step line a resumed life prints
        kill_at = expected + 2 if action == "save" else None
        child = server.start(kind, run, result, steps, root / f"life-{life_index}.log", kill_at)
        if action == "random":
            target = min(first_step + rng.randint(0, 1), steps - 4)  # leaves steps for the delay to land in
            delay = rng.uniform(0.0, 1.5) * step_seconds  # anywhere in the next step and a half, checkpoint included
            if child.wait_for(f"step {target}"):
                time.sleep(delay)
                child.kill()
        code = child.finish()
        resumed = (child.numbers("resumed") or [0])[0]
        if life_index:
            report.resumes.append(resumed)
            report.expected_resumes.append(expected)
            if resumed != expected:
                report.problems.append(f"life {life_index} resumed from {resumed}, the newest good one is {expected}")
            newest_published = max(published, default=0)
            report.data_lost += max(0, newest_published - resumed)
            for path in warned_for:
                if f"Skipping the damaged checkpoint {path}" in child.stderr:
                    report.damaged_warned.append(path.name)
                else:
                    report.problems.append(f"life {life_index} gave no warning naming the damaged {path}")
        published |= set(child.numbers("saved"))
        if action == "finish":
            if code != 0 or "done" not in child.lines:
                report.problems.append(f"the last life failed (exit {code}): {child.stderr[-2000:]}")
            break
        if code != -signal.SIGKILL:
            report.problems.append(f"life {life_index} was not killed (exit {code}, last lines {child.lines[-3:]})")
        last = [line for line in child.lines if line.startswith(("step", "saved"))]
        where = f"after '{last[-1]}'" if last else "before the first step"
        report.kills.append(f"{action}: {where}" + (f" (+{delay:.2f} s)" if action == "random" else ""))
        # what the kill left on disk
        leftovers = sorted(p.name for p in run.iterdir() if p.name.startswith(".checkpoint-")) if run.is_dir() else []
        report.staging_left += [name for name in leftovers if name not in (PLANTED_STAGING, PLANTED_OLD)]
        if any(p.name.startswith(".") for p in list_checkpoints(run)):
            report.problems.append("list_checkpoints returned a staging directory")
        good, bad = _good_and_bad(run)
        if tamper and not report.damaged_on_purpose and life_index >= 1 and len(good) >= 2:
            victim = good[-1]
            shutil.copytree(victim, run / PLANTED_STAGING, dirs_exist_ok=True)  # complete and verifying, but staged
            shutil.copytree(victim, run / PLANTED_OLD, dirs_exist_ok=True)
            weights = victim / "trainable.safetensors"
            weights.write_bytes(weights.read_bytes()[:-7])
            report.damaged_on_purpose.append(victim.name)
            published.discard(_step_of(victim))
            good, bad = _good_and_bad(run)
        expected = _step_of(good[-1]) if good else 0
        for path in bad:
            report.damaged_found.append(path.name)
            if path.name not in report.damaged_on_purpose and _step_of(path) in published:
                report.data_lost += 1  # a checkpoint announced as saved no longer verifies
        warned_for = [p for p in bad if _step_of(p) > expected]
        report.damaged_unseen += [p.name for p in bad if _step_of(p) < expected]
    if not result.is_file():
        report.problems.append("the resumed run wrote no result")
        return report
    whole, resumed_state = load_file(root / "reference.safetensors"), load_file(result)
    if set(whole) != set(resumed_state):
        report.problems.append(f"different tensors: {sorted(set(whole) ^ set(resumed_state))}")
    for name, value in whole.items():
        report.tensors_compared += 1
        if name not in resumed_state or not torch.equal(value, resumed_state[name]):
            report.mismatched.append(name)
    report.data_lost += len(report.mismatched)
    return report


def _check(report: CrashReport, kills: int) -> None:
    assert not report.problems, report.problems
    assert len(report.kills) == kills, report.kills
    assert report.resumes == report.expected_resumes
    assert report.tensors_compared > 0 and not report.mismatched, report.mismatched  # bit-identical (torch.equal)
    assert report.data_lost == 0
    assert all(name in report.damaged_warned or name in report.damaged_unseen for name in report.damaged_found)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = CrashServer(tmp_path_factory.mktemp("crash-server") / "server.log")
    yield server
    server.close()


def test_softalign_killed_four_times_resumes_bit_identical_and_loses_nothing(server, tmp_path):
    report = crash_and_resume(server, "softalign", tmp_path, kills=3, seed=0, kill_in_save=True, tamper=True)
    _check(report, kills=4)
    assert any(name.startswith(".checkpoint-") and ".tmp-" in name for name in report.staging_left), (
        "the kill inside a checkpoint write left no staging directory"
    )
    assert report.damaged_on_purpose and report.damaged_on_purpose[0] in report.damaged_warned
    assert all(step not in (998, 999) for step in report.resumes)  # the planted staging copies were never loaded
    assert len(report.resumes) == 4 and any(report.resumes)


def test_ddpo_killed_three_times_resumes_bit_identical_and_loses_nothing(server, tmp_path):
    report = crash_and_resume(server, "ddpo", tmp_path, kills=3, seed=0, kill_in_save=False, tamper=True)
    _check(report, kills=3)
    assert all(step not in (998, 999) for step in report.resumes)
    assert len(report.resumes) == 3 and any(report.resumes)


def test_lock_of_a_killed_run_does_not_outlive_it(server, tmp_path):
    """A SIGKILLed run leaves its lock file, but not the lock: a new run on the directory starts at once."""
    from softalign.run_lock import LOCK_NAME, RunLock

    child = server.start("softalign", tmp_path / "run", tmp_path / "r.safetensors", 40, tmp_path / "l.log")
    assert child.wait_for("step 1")
    with pytest.raises(RuntimeError, match=r"Another softalign run \(pid \d+\) is using"):
        with RunLock(tmp_path / "run"):
            pass
    child.kill()
    assert child.finish() == -signal.SIGKILL
    assert (tmp_path / "run" / LOCK_NAME).is_file()
    with RunLock(tmp_path / "run"):
        pass
