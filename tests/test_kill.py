"""No lock outlives its writer: every writer killed with -9 at a random moment, then the same command
run again at once, without --wait, must succeed.

encode and add run DataLoader worker processes, forked while the writer holds the collection's lock.
Were the workers to keep their inherited copy of the lock's descriptor, they would hold the lock after
their parent's death until they noticed it, and the command run again would be refused.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import pytest

from conftest import cli, hashsearch_cmd, manifest

TRIALS = 3
LOCKED = "is being written by another process"


def _start(args, log):
    # A session of its own: the workers orphaned by the kill are found, and stopped, by their group.
    return subprocess.Popen(hashsearch_cmd() + [str(a) for a in args], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _generation(root) -> int:
    try:
        return json.loads((root / "manifest.json").read_text()).get("generation", 0)
    except (FileNotFoundError, ValueError):
        return -1


def _kill_writer_only(proc, when, deadline: float = 240) -> None:
    """kill -9 of the writer alone once `when()` holds, after a random extra delay; its workers live on."""
    end = time.monotonic() + deadline
    while not when():
        assert proc.poll() is None, "the writer ended before it could be killed"
        assert time.monotonic() < end, "the writer made no progress in time"
        time.sleep(0.01)
    time.sleep(random.uniform(0, 0.3))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _run_again_at_once(args) -> subprocess.CompletedProcess:
    return subprocess.run(hashsearch_cmd() + [str(a) for a in args], capture_output=True, text=True, timeout=300)


def _stop_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.parametrize("trial", range(TRIALS))
def test_encode_with_loader_workers_runs_again_at_once_after_kill_9(model, tmp_path, trial):
    random.seed(trial)
    out = tmp_path / "coll"
    args = ["encode", "synthetic:3000", "--model", model, "--out", out, "--shard-size", "300", "--batch-size", "50",
            "--workers", "2", "--device", "cpu", "--quiet"]
    with open(tmp_path / "log", "w") as log:
        proc = _start(args, log)
        try:
            _kill_writer_only(proc, lambda: _generation(out) >= 2)     # a shard is out: the workers are running
            assert proc.returncode == -signal.SIGKILL
            again = _run_again_at_once(args)
        finally:
            _stop_group(proc)
    assert again.returncode == 0, again.stdout + again.stderr
    assert manifest(out)["complete"] and manifest(out)["items"] == 3000


@pytest.mark.parametrize("trial", range(TRIALS))
def test_add_with_loader_workers_runs_again_at_once_after_kill_9(collection_copy, tmp_path, trial):
    random.seed(100 + trial)
    before = manifest(collection_copy)
    args = ["add", collection_copy, "synthetic:3000", "--batch-size", "50", "--workers", "2", "--quiet"]
    with open(tmp_path / "log", "w") as log:
        proc = _start(args, log)
        try:
            _kill_writer_only(proc, lambda: _generation(collection_copy) > before["generation"])
            again = _run_again_at_once(args)
        finally:
            _stop_group(proc)
    assert again.returncode == 0, again.stdout + again.stderr
    assert manifest(collection_copy)["items"] == 3000


@pytest.mark.parametrize("trial", range(TRIALS))
def test_delete_and_compact_run_again_at_once_after_kill_9(collection_copy, tmp_path, trial):
    random.seed(200 + trial)
    ids = [str(i) for i in range(0, 150, 2)]
    delete = ["delete", collection_copy, *[x for i in ids for x in ("--id", i)]]
    compact = ["compact", collection_copy, "--threshold", "0.05"]
    for args in (delete, compact):
        with open(tmp_path / "log", "w") as log:
            proc = _start(args, log)
            time.sleep(random.uniform(0, 1.0))      # these take about a second: anywhere in it, or after
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        again = _run_again_at_once(args)
        assert LOCKED not in again.stderr
        if args is delete and again.returncode != 0:      # the killed delete had already taken effect
            assert "was deleted" in again.stderr and manifest(collection_copy)["deleted"] == len(ids), again.stderr
        else:
            assert again.returncode == 0, again.stderr
    assert manifest(collection_copy)["deleted"] == 0      # compacted: the deleted rows are gone
    assert cli("info", collection_copy, "--verify").exit_code == 0
