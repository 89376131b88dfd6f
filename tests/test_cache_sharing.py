"""Several runs encoding into one cache at the same moment each get their own latents, bit for bit; a run killed
mid-encode (holding the index lock, shards written, index not yet replaced) leaves a cache the next run uses."""

import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from cache_writer import encode  # noqa: E402

WRITER = Path(__file__).with_name("cache_writer.py")


def _writer(*args):
    command = [sys.executable, str(WRITER), *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _same(a: dict, b: dict) -> bool:
    keys = [k for k in a if k != "images_encoded"]
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in keys)


def test_concurrent_writers_get_their_own_latents_and_a_killed_writer_breaks_nothing(tmp_path):
    shared = tmp_path / "shared"
    seeds = (1, 2, 3)
    barrier = ["--barrier", tmp_path / "barrier", "--parties", len(seeds)]  # all start encoding at one moment
    writers = [_writer(shared, seed, tmp_path / f"{seed}.pt", *barrier) for seed in seeds]
    for writer in writers:
        assert writer.wait() == 0, writer.stderr.read()
    fresh = {seed: encode(str(tmp_path / f"fresh-{seed}"), seed) for seed in (*seeds, 4)}
    for seed in seeds:
        assert _same(torch.load(tmp_path / f"{seed}.pt"), fresh[seed]), f"writer {seed} got latents not its own"

    for seed in seeds:  # every concurrent run's entries are in the one index: encoding again encodes nothing
        again = encode(str(shared), seed)
        assert int(again["images_encoded"]) == 0 and _same(again, fresh[seed]), f"writer {seed}'s entries were lost"

    killed = _writer(shared, 4, tmp_path / "never.pt", "--die-before-index")
    assert killed.wait() == -9 and not (tmp_path / "never.pt").exists(), killed.stderr.read()
    after = encode(str(shared), 4)  # the killed run's shards were never indexed: encoded again, no error
    assert int(after["images_encoded"]) == 24 and _same(after, fresh[4])
