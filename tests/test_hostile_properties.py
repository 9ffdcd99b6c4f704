"""Issue 12, property-based: hostile input gets no hang, no crash and no silent wrong answer.

Every command is run with option values drawn from strategies that mix valid
values, boundary values, wrong types and odd paths; every collection manifest
field and every checkpoint config field is replaced by a drawn value.  Each
run must end in one of:

  ok        exit 0, and the answer is checked (results exist, counts, ranks,
            Hamming distances recomputed, files written and readable ...);
  refused   non-zero exit, exactly one `hashsearch: error:` line on stderr,
            and nothing changed on disk for writing commands;
  usage     click's own usage error: exit 2, "Usage: ..." then "Error: ...";
  problems  `info --verify` only: exit 1 with the problems listed on stdout.

A traceback, a signal, a hang or an unchecked answer fails.  Runs that could
block (a FIFO, an endless file such as /dev/zero) go to a real process with
a timeout; the others run in-process (click's CliRunner) under an alarm.
/dev/zero is reached through a symlink in the test's folder, so a command
that atomically replaces its output replaces the link, never the device.

The defects these properties found are section 4, one plain test each (they
were xfail(strict=True) until fixed).  Section 5 draws shards whose HDF5
datasets keep their bytes elsewhere (issue 29).  Run with --hypothesis-show-statistics
to see how often each outcome came up.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import resource
import shlex
import shutil
import signal
import subprocess
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, reject, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

import live_writer as lw
from conftest import COLL_N, cli, hashsearch_cmd, save_image

# -- how long anything may take -----------------------------------------------------------------
IN_PROCESS_LIMIT = 60       # s: an alarm turns a hang inside this process into a failure
PROCESS_LIMIT = 20          # s: a real process past this is killed and fails the test
MEMORY_HEADROOM = 8 << 30   # bytes of address space a command may add: an allocation past it fails fast
MAX_WORKERS = 64            # more DataLoader worker processes than this is a fork bomb, not a setting

PROPERTY_SETTINGS = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                             suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                    HealthCheck.data_too_large, HealthCheck.filter_too_much])


# -- running a command and judging the outcome ----------------------------------------------------
class Hang(BaseException):
    """An in-process run that did not finish in time (BaseException: CliRunner must not swallow it)."""


class TooManyWorkers(Exception):
    """A command was about to start more DataLoader workers than any machine has cores."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def alarm(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Outcome:
    argv: list
    code: int
    stdout: str
    stderr: str
    crash: str | None       # a traceback, a signal, a hang

    def __str__(self):
        return (f"$ hashsearch {shlex.join(self.argv)}\nexit {self.code}\n--- stdout\n{self.stdout[-3000:]}"
                f"\n--- stderr\n{self.stderr[-3000:]}" + (f"\n--- crash\n{self.crash}" if self.crash else ""))


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _limit_memory(limit: int):
    # A child's address space: an allocation too large fails at once (MemoryError) instead of
    # swapping the machine to death.  Not under CUDA, which reserves vast address ranges.
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    return None if _cuda() else apply


def run_in_process(argv) -> Outcome:
    with time_limit(IN_PROCESS_LIMIT):
        r = cli(*argv, ok=None)
    crash = None
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        if isinstance(r.exception, TooManyWorkers):
            reject()            # the known defect, see test_huge_worker_count_is_refused
        crash = "".join(traceback.format_exception(*r.exc_info)) if r.exc_info else repr(r.exception)
    return Outcome([str(a) for a in argv], r.exit_code, r.stdout, r.stderr, crash)


def run_in_child(argv, timeout: float = PROCESS_LIMIT, memory: int = MEMORY_HEADROOM + (4 << 30)) -> Outcome:
    argv = [str(a) for a in argv]
    proc = subprocess.Popen(hashsearch_cmd() + argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_limit_memory(memory))
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return Outcome(argv, -9, out, err, f"hang: no answer within {timeout} s")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)      # stray children (loader workers) of a finished run
    crash = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else None
    return Outcome(argv, proc.returncode, out, err, crash)


CHILDREN_PER_TEST = 6      # a child process costs seconds (torch's import): more examples needing one are skipped
_children = {"left": CHILDREN_PER_TEST}


def run(argv, blocking: bool, timeout: float = PROCESS_LIMIT) -> Outcome:
    """A run that could block (a FIFO, an endless file among its paths) goes to a child process."""
    if blocking:
        if _children["left"] <= 0:
            event("skipped: this test's child processes are spent")
            reject()
        _children["left"] -= 1
        event("run in a child process")
        return run_in_child(argv, timeout)
    return run_in_process(argv)


def judge(out: Outcome, *, problems_ok: bool = False) -> str:
    """'ok', 'refused', 'usage' or 'problems'; anything else fails."""
    verdict = _judge(out, problems_ok)
    if currently_in_test_context():
        event(f"{out.argv[0]}: {verdict}")       # --hypothesis-show-statistics: how often each outcome was seen
    return verdict


def _judge(out: Outcome, problems_ok: bool) -> str:
    assert out.crash is None, f"crash\n{out}"
    assert "Traceback" not in out.stdout + out.stderr, f"traceback\n{out}"
    if out.code == 0:
        return "ok"
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    if out.code == 2 and lines and lines[0].startswith("Usage:") and lines[-1].startswith("Error:") \
            and not any("hashsearch: error:" in line for line in lines):
        return "usage"
    if problems_ok and out.code == 1 and not lines and '"problems"' in out.stdout:
        return "problems"
    assert out.code > 0, f"negative exit\n{out}"
    assert len(lines) == 1 and lines[0].startswith("hashsearch: error:"), f"not one error line\n{out}"
    return "refused"


# -- values -----------------------------------------------------------------------------------------
BOUNDARY_INTS = (0, -1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 10**30)
WRONG = ("", " ", "abc", "1.5", "-0.5", "1e3", "nan", "inf", "-inf", "0x10", "٣", "1_000", "+2", " 7 ", "-", "--",
         "None", "true", "[]")
FLOAT_TEXT = ("nan", "inf", "-inf", "-0.0", "1e-320", "1e308", "1e309")
_TEXT = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=8)


BAD_INTS = st.one_of(st.sampled_from(BOUNDARY_INTS), st.sampled_from(WRONG), st.floats(), _TEXT)
BAD_FLOATS = st.one_of(st.sampled_from(FLOAT_TEXT), st.sampled_from(BOUNDARY_INTS), st.sampled_from(WRONG))


@dataclass(frozen=True)
class Opt:
    """One option of a command: its valid values and its hostile ones (a flag has neither)."""
    name: str                       # "--k"; "<name>" for a positional argument
    valid: st.SearchStrategy | None = None
    bad: st.SearchStrategy | None = None
    required: bool = False
    many: int = 1                   # a repeatable option: up to this many values


@st.composite
def command_args(draw, specs, max_bad: int = 2):
    """Arguments where at most `max_bad` options take a hostile value and the others valid ones (or none).

    Mostly valid arguments, so that most examples get past click's parsing and the
    answer itself is checked, and shrinking leads to the one value that matters.
    """
    hostile = [s.name for s in specs if s.bad is not None]
    bad = set(draw(st.lists(st.sampled_from(hostile), max_size=max_bad, unique=True)))
    args = []
    for s in specs:
        if s.valid is None and s.bad is None:
            if draw(st.booleans()):
                args.append(s.name)
            continue
        if s.name in bad:
            values = draw(st.lists(s.valid, max_size=s.many - 1)) if s.many > 1 else []
            values.insert(draw(st.integers(0, len(values))), draw(s.bad))
        elif s.required or draw(st.booleans()):
            values = draw(st.lists(s.valid, min_size=1, max_size=s.many))
        else:
            continue
        for value in values:
            args += [value] if s.name.startswith("<") else [s.name, value]
    return args


class Odd:
    """A path made fresh for each example, in the example's own folder."""

    BLOCKING = {"fifo", "zero", "fifo-manifest", "zero-manifest", "fifo-index", "zero-index", "fifo-images"}
    KINDS = ("missing", "nested-missing", "dir", "text", "empty", "junk.png", "text.txt", "fifo", "zero",
             "fifo-manifest", "zero-manifest", "fifo-index", "zero-index", "fifo-images", "images")

    def __init__(self, kind: str):
        self.kind = kind

    def __repr__(self):
        return f"Odd({self.kind!r})"

    @property
    def blocking(self) -> bool:
        return self.kind in self.BLOCKING

    def make(self, where: Path) -> Path:
        base = where / f"odd-{self.kind}-{time.monotonic_ns()}"
        kind = self.kind
        if kind == "missing":
            return base
        if kind == "nested-missing":
            return base / "a" / "b"
        if kind in ("text", "text.txt"):
            path = base.with_name(base.name + (".txt" if kind == "text.txt" else ""))
            path.write_text("hello\n3 4\nnot, an, image\n")
            return path
        if kind == "empty":
            base.touch()
            return base
        if kind == "junk.png":
            path = base.with_name(base.name + ".png")
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
            return path
        if kind == "fifo":
            os.mkfifo(base)
            return base
        if kind == "zero":
            base.symlink_to("/dev/zero")
            return base
        base.mkdir()
        if kind in ("fifo-manifest", "zero-manifest", "fifo-index", "zero-index"):
            name = "manifest.json" if "manifest" in kind else "index.json"
            if kind.startswith("fifo"):
                os.mkfifo(base / name)
            else:
                (base / name).symlink_to("/dev/zero")
        elif kind == "fifo-images":        # one readable image between a FIFO and an endless file
            save_image(base / "b.png", seed=1)
            os.mkfifo(base / "a.png")
            (base / "c.png").symlink_to("/dev/zero")
        elif kind == "images":
            for i in range(3):
                save_image(base / f"cls{i % 2}" / f"{i}.png", seed=10 + i)
        return base


class Out:
    """A fresh output path in the example's folder (a file name that does not exist yet)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return f"Out({self.name!r})"


def materialize(args, where: Path, named: dict | None = None) -> tuple[list, bool]:
    """The argv of drawn `args`: Odd and Out made under `where`, names looked up in `named`."""
    argv, blocking = [], False
    for a in args:
        if isinstance(a, Odd):
            blocking |= a.blocking
            a = a.make(where)
        elif isinstance(a, Out):
            a = where / a.name
        elif isinstance(a, Named):
            a = named[a.name]
        argv.append(a)
    return argv, blocking


class Named:
    """A path only the test knows (a fixture's collection or model)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return f"Named({self.name!r})"


def last_value(argv, name, default=None):
    """What click keeps of an option given several times: the last value."""
    value = default
    for i, a in enumerate(argv[:-1]):
        if a == name:
            value = argv[i + 1]
    return value


def all_values(argv, name) -> list:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]


def as_int(value) -> int:
    return int(str(value))      # what click's INT does with the text it was given


# -- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def memory_cap():
    """Cap this process's address space too: a huge allocation in-process fails fast instead of swapping."""
    if not Path("/proc/self/status").exists() or _cuda():
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _vm_bytes() + MEMORY_HEADROOM
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(autouse=True)
def worker_guard(monkeypatch):
    """No run may start more loader processes than MAX_WORKERS: the example is refused instead of forking."""
    from hashsearch.encoders import dataset, runner, train
    real = dataset.make_loader

    def guarded(source, size, batch_size, workers, *args, **kw):
        if workers > MAX_WORKERS:
            raise TooManyWorkers(f"make_loader(workers={workers})")
        return real(source, size, batch_size, workers, *args, **kw)

    monkeypatch.setattr(runner, "make_loader", guarded)
    monkeypatch.setattr(train, "make_loader", guarded)


@pytest.fixture(autouse=True)
def child_budget():
    _children["left"] = CHILDREN_PER_TEST


@pytest.fixture
def where(tmp_path):
    """A fresh folder per example (tmp_path is shared by all examples of a test)."""
    counter = iter(range(10**9))

    def make() -> Path:
        d = tmp_path / f"ex{next(counter)}"
        d.mkdir()
        return d
    return make


@dataclass
class CollData:
    n: int
    ids: set
    code: dict
    path: dict
    label: dict


def coll_data(root) -> CollData:
    from hashsearch.shards import Collection
    with Collection.open(root, allow_empty=True) as coll:
        live = coll.live_rows()
        ids = coll.ids()[live].tolist()
        names = coll.manifest.get("class_names") or []
        labels = coll.labels()[live].tolist()
        return CollData(n=len(ids), ids=set(ids), code=dict(zip(ids, coll.codes()[live])),
                        path=dict(zip(ids, coll.paths(live))),
                        label={i: names[l] if 0 <= l < len(names) else l for i, l in zip(ids, labels)})


@pytest.fixture(scope="module")
def session_data(collection) -> CollData:
    return coll_data(collection)


@pytest.fixture(scope="module")
def light(tmp_path_factory) -> Path:
    """A torch-free collection: 400 rows in shards of 200, ids 7 and 250 deleted, a flat index (rows file)."""
    from hashsearch import Index
    from hashsearch.shards import delete_items
    root = tmp_path_factory.mktemp("light") / "c"
    lw.create(root, 400)
    delete_items(root, ids=[7, 250])
    Index.build(root, "flat").close()
    return root


def copy_of(root: Path, where: Path) -> Path:
    dst = where / "coll"
    shutil.copytree(root, dst, symlinks=True)
    return dst


def popcount(a, b) -> int:
    return int(np.unpackbits(np.bitwise_xor(a, b)).sum())


def check_query_report(report, *, names, k, mode, radius, data: CollData, image_hits=None):
    assert report["mode"] == mode and report["k"] == k
    assert [q["query"] for q in report["queries"]] == names
    for q in report["queries"]:
        res = q["results"]
        assert [r["rank"] for r in res] == list(range(1, len(res) + 1))
        assert len(res) <= min(k, data.n)
        got = [r["id"] for r in res]
        assert len(set(got)) == len(got) and set(got) <= data.ids, got
        for r in res:
            assert r["path"] == data.path[r["id"]] and r["label"] == data.label[r["id"]], r
            if radius is not None:
                assert r["hamming"] <= radius, r
        if q["query"].startswith("id:"):
            qid = int(q["query"][3:])
            for r in res:
                assert r["hamming"] == popcount(data.code[qid], data.code[r["id"]]), r
            if mode == "es":
                assert len(res) == min(k, data.n) and res[0]["id"] == qid and res[0]["distance"] == 0.0
        elif image_hits and q["query"] in image_hits and mode == "es":
            assert res[0]["id"] == image_hits[q["query"]] and res[0]["distance"] < 1e-2, res[:2]
        if mode == "bcs":
            assert [r["hamming"] for r in res] == sorted(r["hamming"] for r in res)
        elif res:
            dist = [r["distance"] for r in res]
            assert all(d is not None and math.isfinite(d) and d >= 0 for d in dist), dist
            assert dist == sorted(dist)


def manifest_bytes(root: Path) -> bytes:
    return (root / "manifest.json").read_bytes()


# -- 1. command-line options --------------------------------------------------------------------------
def odd(*kinds) -> st.SearchStrategy:
    return st.sampled_from(kinds).map(Odd)


QUERY_OPTIONS = [
    Opt("-k", st.integers(1, 20), BAD_INTS),
    Opt("--pool", st.integers(0, 400), BAD_INTS),
    Opt("--radius", st.integers(0, 16), BAD_INTS),
    Opt("--nflip", st.integers(0, 16), BAD_INTS),
    Opt("--mode", st.sampled_from(["hds", "bcs", "es"]), st.sampled_from(["HDS", "", "all", "exhaustive"])),
    Opt("--index", st.just(Named("index")),
        odd("missing", "dir", "text", "fifo", "zero", "fifo-index", "zero-index")),
]
QUERY_BY_ID = [Opt("--id", st.integers(0, COLL_N - 1), BAD_INTS, required=True, many=3), *QUERY_OPTIONS]
QUERY_BY_IMAGE = [
    Opt("--image", st.just(Named("png")), odd("missing", "dir", "text", "empty", "junk.png", "fifo", "zero"),
        required=True, many=2),
    Opt("--id", st.integers(0, COLL_N - 1), BAD_INTS),
    Opt("--model", st.just(Named("model")), st.one_of(st.just(Named("model32")),
                                                      odd("missing", "dir", "text", "empty", "fifo", "zero"))),
    *QUERY_OPTIONS]


def _query(argv, blocking, data, image_hits=None):
    out = run(argv, blocking)
    if judge(out) == "ok":
        report = json.loads(out.stdout)
        names = [str(p) for p in all_values(argv, "--image")] + [f"id:{as_int(i)}" for i in all_values(argv, "--id")]
        radius = last_value(argv, "--radius")
        check_query_report(report, names=names, k=as_int(last_value(argv, "-k", 10)),
                           mode=last_value(argv, "--mode", "hds"), radius=None if radius is None else as_int(radius),
                           data=data, image_hits=image_hits)
    return out


@settings(PROPERTY_SETTINGS, max_examples=80)
@given(args=command_args(QUERY_BY_ID))
@example(args=["--id", 3, "-k", 2**63, "--mode", "es"])
@example(args=["--id", " 7 ", "--radius", 0, "--pool", 10**30])
@example(args=["--id", 3, "--id", 3, "--mode", "bcs", "-k", 300])
def test_query_by_id_options(collection, session_data, where, args):
    argv, blocking = materialize(args, where(), {"index": collection / "index"})
    _query(["query", collection, *argv, "--json"], blocking, session_data)


@settings(PROPERTY_SETTINGS, max_examples=20)
@given(args=command_args(QUERY_BY_IMAGE))
@example(args=["--image", Named("png"), "-k", 1, "--mode", "es"])
def test_query_by_image_options(collection, session_data, model, model32, synthetic_png, where, args):
    named = {"index": collection / "index", "model": model, "model32": model32, "png": synthetic_png}
    argv, blocking = materialize(args, where(), named)
    _query(["query", collection, *argv, "--json"], blocking, session_data, image_hits={str(synthetic_png): 5})


BUILD_INDEX = [
    Opt("--coarse", st.sampled_from(["flat", "hash", "multihash"]), st.sampled_from(["", "Flat", "ivf"])),
    Opt("--hash-bits", st.integers(1, 16), BAD_INTS),
    Opt("--nhash", st.integers(1, 4), BAD_INTS),
    Opt("--nflip", st.integers(0, 3), BAD_INTS),
    Opt("--out", st.just(Out("index-out")), odd("missing", "nested-missing", "dir", "text", "fifo", "zero")),
    Opt("--wait"),
]


@settings(PROPERTY_SETTINGS, max_examples=30)
@given(args=command_args(BUILD_INDEX))
@example(args=["--coarse", "multihash", "--hash-bits", 2**63])
@example(args=["--coarse", "hash", "--hash-bits", 8, "--nflip", 8])
def test_build_index_options(light, where, args):
    from hashsearch import Index
    d = where()
    root = copy_of(light, d)
    before = manifest_bytes(root)
    argv, blocking = materialize(args, d)
    out = run(["build-index", root, *argv], blocking)
    data = coll_data(root)
    if judge(out) == "ok":
        index_dir = last_value(argv, "--out")
        with Index.open(root, index_dir) as index:
            assert index.kind == last_value(argv, "--coarse", "flat")
            for name, key in (("--hash-bits", "hash_bits"), ("--nhash", "nhash"), ("--nflip", "nflip")):
                if last_value(argv, name) is not None and key in index.meta["coarse"]:
                    assert index.meta["coarse"][key] == as_int(last_value(argv, name)), index.meta
            ids = sorted(data.ids)[::40]
            with time_limit(IN_PROCESS_LIMIT):
                res = index.search(np.stack([data.code[i] for i in ids]), None, 5, mode="bcs", pool=50)
            assert set(res.ids.ravel().tolist()) - {-1} <= data.ids
            if index.kind == "flat":
                assert (res.hamming[:, 0] == 0).all()
    else:
        assert manifest_bytes(root) == before


INFO = [
    Opt("<collection>", st.just(Named("light")),
        odd("missing", "dir", "text", "empty", "fifo", "zero", "fifo-manifest", "zero-manifest"), required=True),
    Opt("--json"), Opt("--verify"),
]


@settings(PROPERTY_SETTINGS, max_examples=15)
@given(args=command_args(INFO))
def test_info_options(light, where, args):
    argv, blocking = materialize(args, where(), {"light": light})
    out = run(["info", *argv], blocking)
    if judge(out) == "ok":
        assert argv[0] == light
        if "--json" in argv:
            report = json.loads(out.stdout)
            assert report["items"] == 398 and report["deleted"] == 2 and report["bits"] == lw.BITS
            assert report.get("verified", True) is True
        else:
            assert "items: 398" in out.stdout


class IdsFile:
    """An ids file holding drawn values."""

    def __init__(self, values):
        self.values = values

    def __repr__(self):
        return f"IdsFile({self.values!r})"


DELETE_IDS = st.integers(0, 420)
DELETE = [
    Opt("--id", DELETE_IDS, BAD_INTS, many=3),
    Opt("--path", DELETE_IDS.map(lambda i: f"item-{i}"),
        st.sampled_from(["", "item-", "synthetic:3", "item-007", "ITEM-3", "item-3 "]), many=2),
    Opt("--ids-file", st.lists(DELETE_IDS, max_size=4).map(IdsFile),
        st.one_of(st.lists(st.one_of(DELETE_IDS, BAD_INTS), max_size=4).map(IdsFile),
                  odd("missing", "dir", "text", "empty", "fifo", "zero"))),
    Opt("--wait"),
]


@settings(PROPERTY_SETTINGS, max_examples=40)
@given(args=command_args(DELETE))
@example(args=["--id", 3, "--id", 3, "--path", "item-3"])
@example(args=["--ids-file", IdsFile([5, "abc"])])
def test_delete_options(light, where, args):
    d = where()
    root = copy_of(light, d)
    before, live = manifest_bytes(root), coll_data(root).ids
    args = list(args)
    for i, a in enumerate(args):
        if isinstance(a, IdsFile):
            args[i] = d / f"ids-{i}.txt"
            args[i].write_text("".join(f"{v}\n" for v in a.values))
    argv, blocking = materialize(args, d)
    out = run(["delete", root, *argv], blocking)
    if judge(out) == "ok":
        doomed = {as_int(v) for v in all_values(argv, "--id")}
        doomed |= {int(p[5:]) for p in all_values(argv, "--path")}
        for path in all_values(argv, "--ids-file")[-1:]:
            doomed |= {int(v) for v in Path(path).read_text().split()}
        assert doomed and doomed <= live
        assert coll_data(root).ids == live - doomed
    else:
        assert manifest_bytes(root) == before


COMPACT = [
    Opt("<collection>", st.just(Named("root")), odd("missing", "dir", "text", "fifo", "fifo-manifest", "zero-manifest"),
        required=True),
    Opt("--threshold", st.floats(0, 0.99), BAD_FLOATS),
    Opt("--wait"),
]


@settings(PROPERTY_SETTINGS, max_examples=25)
@given(args=command_args(COMPACT))
@example(args=[Named("root"), "--threshold", 0.0])
@example(args=[Named("root"), "--threshold", "nan"])
def test_compact_options(light, where, args):
    from hashsearch import Index
    from hashsearch.shards import Collection
    d = where()
    root = copy_of(light, d)
    before, live = manifest_bytes(root), coll_data(root)
    argv, blocking = materialize(args, d, {"root": root})
    out = run(["compact", *argv], blocking)
    if judge(out) == "ok":
        assert argv[0] == root
        after = coll_data(root)
        assert after.ids == live.ids and after.path == live.path
        assert all((after.code[i] == live.code[i]).all() for i in live.ids)
        with Collection.open(root) as coll:
            assert coll.verify() == []
        with Index.open(root) as index:
            res = index.search(np.stack([live.code[i] for i in (0, 300)]), None, 5, mode="bcs")
            assert set(res.ids.ravel().tolist()) <= live.ids
    assert manifest_bytes(root) == before or out.code == 0


ADD = [
    Opt("<source>", st.integers(COLL_N, COLL_N + 6).map(lambda n: f"synthetic:{n}"),
        st.one_of(st.sampled_from(["synthetic:0", "synthetic:-1", "synthetic:", "synthetic:abc", "synthetic:305:3",
                                   "synthetic:302:4"]),
                  odd("missing", "dir", "text.txt", "junk.png", "fifo", "zero", "fifo-images", "images")),
        required=True),
    Opt("--limit", st.integers(1, COLL_N + 6), BAD_INTS),
    Opt("--batch-size", st.integers(1, 8), BAD_INTS),
    Opt("--workers", st.just(0), BAD_INTS, required=True),
    Opt("--device", st.sampled_from(["cpu", "auto"]), st.sampled_from(["cuda", "cuda:7", "CPU", "", "mps"])),
    Opt("--data-dir", st.just(Named("tmp")), odd("missing", "text", "fifo", "zero")),
    Opt("--wait"),
]


@settings(PROPERTY_SETTINGS, max_examples=20)
@given(args=command_args(ADD))
@example(args=["synthetic:99999999999999999999999", "--limit", COLL_N + 2, "--workers", 0])
def test_add_options(collection, where, args):
    from hashsearch.shards import Collection
    d = where()
    root = copy_of(collection, d)
    before, old = manifest_bytes(root), coll_data(root)
    argv, blocking = materialize(args, d, {"tmp": d})
    out = run(["add", root, *argv, "--quiet"], blocking)
    if judge(out) == "ok":
        new = coll_data(root)
        assert old.ids <= new.ids and all(new.path[i] == old.path[i] for i in old.ids)
        source, limit = str(argv[0]), last_value(argv, "--limit")
        if source.startswith("synthetic:"):
            n = int(source.split(":")[1])
            total = n if limit is None else min(n, as_int(limit))
            assert new.n == max(total, COLL_N)
            assert {new.path[i] for i in new.ids - old.ids} == {f"synthetic:{i}" for i in range(COLL_N, total)}
        with Collection.open(root) as coll:
            assert coll.verify() == []
            assert np.isfinite(coll.features(coll.live_rows())).all()
    else:
        assert manifest_bytes(root) == before


EVAL = [
    Opt("<database>", st.just(Named("coll")), odd("missing", "dir", "text", "fifo", "fifo-manifest"), required=True),
    Opt("--queries", st.just(Named("coll")), st.one_of(st.just(Named("light")),
                                                       odd("missing", "dir", "text", "fifo", "zero-manifest")),
        required=True),
    Opt("--mode", st.sampled_from(["bcs", "es", "hds", "all"]), st.sampled_from(["", "ALL", "exhaustive"])),
    Opt("--topk", st.integers(1, 400), BAD_INTS),
    Opt("--pool", st.integers(1, 400), BAD_INTS),
    Opt("--map-all"),
    Opt("--json", st.just(Out("out.json")), odd("nested-missing", "dir", "fifo", "zero")),
    Opt("--plot", st.just(Out("p.png")), odd("dir", "text", "fifo")),
    Opt("--pr-plot", st.just(Out("pr.png")), odd("dir", "text", "fifo")),
    Opt("--baselines", st.sampled_from(["lsh", "itq", "lsh,itq", "LSH", ",,itq,"]),
        st.sampled_from(["", " , ", "pca"])),
]


@settings(PROPERTY_SETTINGS, max_examples=25)
@given(args=command_args(EVAL))
@example(args=[Named("coll"), "--queries", Named("coll"), "--mode", "es", "--topk", 2**63, "--json", Out("out.json")])
def test_eval_options(collection, light, where, args):
    d = where()
    argv, blocking = materialize(args, d, {"coll": collection, "light": light})
    out = run(["eval", *argv], blocking)
    if judge(out) == "ok":
        assert argv[0] == collection and last_value(argv, "--queries") == collection
        json_path = last_value(argv, "--json")
        if json_path is not None:
            report = json.loads(Path(json_path).read_text())
            for r in report if isinstance(report, list) else [report]:
                assert 0 <= r["map"] <= 1 and all(0 <= p <= 1 for p in r["precision_at_k"].values()), r
                if r["mode"] == "es":
                    assert r["precision_at_k"]["1"] == 1.0        # each query item is its own nearest
        for name in ("--plot", "--pr-plot"):
            png = last_value(argv, name)
            if png is not None:
                assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


BENCH = [
    Opt("--n", st.integers(20, 64), st.sampled_from([0, -1, "", "x", "1.5"]), required=True),
    Opt("--dim", st.integers(4, 32), BAD_INTS, required=True),
    Opt("--bits", st.integers(8, 64), BAD_INTS, required=True),
    Opt("--queries", st.integers(1, 4), st.sampled_from([0, -1, "x", 2**31 - 1]), required=True),
    Opt("--batch", st.integers(1, 4), BAD_INTS),
    Opt("--pool", st.integers(1, 64), BAD_INTS),
    Opt("--radius", st.integers(0, 8), BAD_INTS),
    Opt("--coarse", st.sampled_from(["flat", "hash", "multihash"]), st.sampled_from(["ivf", ""])),
    Opt("--hash-bits", st.integers(1, 8), BAD_INTS),
    Opt("--nhash", st.integers(1, 4), BAD_INTS),
    Opt("--nflip", st.integers(0, 2), BAD_INTS),
    Opt("--json", st.just(Out("bench.json")), odd("dir", "fifo")),
]


def drop_bench_log(out: Outcome) -> None:
    """bench's progress log is stderr by design: "[bench] ..." lines, and the generator's "generating ..." ones."""
    out.stderr = "\n".join(line for line in out.stderr.splitlines() if not line.startswith(("[bench]", "generating ")))


@settings(PROPERTY_SETTINGS, max_examples=10)
@given(args=command_args(BENCH))
def test_bench_exhaustive_options(where, args):
    d = where()
    argv, _ = materialize(["--exhaustive", "--cache-dir", Out("cache"), *args], d)
    out = run_in_child(["bench", *argv])         # always a real process: faiss's probing loops are C
    drop_bench_log(out)
    if judge(out) == "ok":
        json_path = last_value(argv, "--json")
        if json_path is not None:
            report = json.loads(Path(json_path).read_text())
            assert report["n"] == as_int(last_value(argv, "--n"))
            assert report["bits"] == as_int(last_value(argv, "--bits"))


ENCODE = [
    Opt("<source>", st.integers(1, 12).map(lambda n: f"synthetic:{n}"),
        st.one_of(st.sampled_from(["synthetic:0", "synthetic:-1", "synthetic:", "synthetic:x", "synthetic:8:3",
                                   "synthetic:8:5000", "synthetic:8:4", "synthetic:८", "synthetic:1e3",
                                   "fashion-mnist:dev"]),
                  odd("missing", "dir", "text.txt", "junk.png", "fifo", "zero", "fifo-images", "images")),
        required=True),
    Opt("--model", st.just(Named("model")), st.one_of(st.just(Named("model32")),
                                                      odd("missing", "dir", "text", "empty", "fifo", "zero")),
        required=True),
    Opt("--out", st.just(Out("coll")), odd("dir", "text", "fifo", "zero", "nested-missing"), required=True),
    Opt("--limit", st.integers(1, 12), BAD_INTS),
    Opt("--batch-size", st.integers(1, 8), BAD_INTS),
    Opt("--workers", st.just(0), BAD_INTS, required=True),
    Opt("--device", st.sampled_from(["cpu", "auto"]), st.sampled_from(["cuda", "CPU", "", "cuda:0"])),
    Opt("--shard-size", st.integers(1, 8), BAD_INTS),
    Opt("--precision", st.sampled_from(["auto", "fp32"]), st.sampled_from(["bf16", "fp16", ""])),
    Opt("--float32"), Opt("--overwrite"),
    Opt("--data-dir", st.just(Named("tmp")), odd("missing", "text", "fifo")),
]


def check_encoded(root, *, n: int, bits: int, dtype: str):
    from hashsearch.shards import Collection
    with Collection.open(root) as coll:
        assert coll.items == n and coll.bits == bits and str(coll.feature_dtype) == dtype
        assert coll.verify() == []
        feats = coll.features(np.arange(coll.n))
        assert np.isfinite(feats).all(), "non-finite features stored"
        if bits % 8:
            assert not (coll.codes()[:, -1] >> (bits % 8)).any(), "padding bits set"


@settings(PROPERTY_SETTINGS, max_examples=25)
@given(args=command_args(ENCODE))
@example(args=["synthetic:99999999999999999999999", "--model", Named("model"), "--out", Out("coll"),
               "--limit", 3, "--workers", 0, "--shard-size", 2**63 - 1])
@example(args=["synthetic:5", "--model", Named("model"), "--out", Out("coll"), "--workers", 0,
               "--batch-size", 2**63])
def test_encode_options(model, model32, where, args):
    d = where()
    argv, blocking = materialize(args, d, {"model": model, "model32": model32, "tmp": d})
    out = run(["encode", *argv, "--quiet"], blocking)
    if judge(out) == "ok":
        source, limit = str(argv[0]), last_value(argv, "--limit")
        assert source.startswith("synthetic:") or Path(source).is_dir()
        if source.startswith("synthetic:"):
            n = int(source.split(":")[1])
            check_encoded(last_value(argv, "--out"), n=n if limit is None else min(n, as_int(limit)),
                          bits=16 if last_value(argv, "--model") == model else 32,
                          dtype="float32" if "--float32" in argv else "float16")


TRAIN = [
    Opt("<source>", st.integers(12, 24).map(lambda n: f"synthetic:{n}"),
        st.one_of(st.sampled_from(["synthetic:0", "synthetic:1", "synthetic:2:4", "synthetic:x"]),
                  odd("missing", "dir", "text.txt", "fifo", "zero", "fifo-images", "images")),
        required=True),
    Opt("--out", st.just(Out("m.pt")), odd("dir", "text", "fifo", "zero", "nested-missing"), required=True),
    Opt("--epochs", st.just(1), st.sampled_from([0, -1, "", "x", "1.5", "nan"]), required=True),
    Opt("--bits", st.integers(1, 32), BAD_INTS),
    Opt("--backbone", st.just("small"), st.sampled_from(["Small", "", "resnet", "small "])),
    Opt("--batch-size", st.integers(1, 16), BAD_INTS),
    Opt("--lr", st.floats(1e-4, 1e-2), BAD_FLOATS),
    Opt("--backbone-lr-mult", st.floats(0, 1), BAD_FLOATS),
    Opt("--weight-decay", st.floats(0, 1e-2), BAD_FLOATS),
    Opt("--warmup-epochs", st.floats(0, 2), BAD_FLOATS),
    Opt("--val-fraction", st.floats(0, 0.5), BAD_FLOATS),
    Opt("--input-size", st.integers(8, 40), BAD_INTS),
    Opt("--limit", st.integers(1, 24), BAD_INTS),
    Opt("--seed", st.integers(0, 1000), BAD_INTS),
    Opt("--workers", st.just(0), BAD_INTS, required=True),
    Opt("--precision", st.sampled_from(["fp32", "bf16"]), st.sampled_from(["auto", ""])),
    Opt("--device", st.sampled_from(["cpu", "auto"]), st.sampled_from(["cuda", ""])),
    Opt("--weights", st.just(Named("model")), odd("missing", "dir", "text", "empty", "fifo", "zero")),
    Opt("--freeze-backbone"), Opt("--resume"),
]


@settings(PROPERTY_SETTINGS, max_examples=30)
@given(args=command_args(TRAIN))
def test_train_options(model, where, args):
    from hashsearch.encoders.checkpoint import read_checkpoint
    d = where()
    argv, blocking = materialize(args, d, {"model": model})
    out = run(["train", *argv, "--quiet"], blocking)
    if judge(out) == "ok":
        payload = read_checkpoint(last_value(argv, "--out"))
        assert payload["config"]["bits"] == as_int(last_value(argv, "--bits", 48))
        bad = [k for k, v in payload["state_dict"].items() if v.is_floating_point() and not v.isfinite().all()]
        if bad and any(_extreme(last_value(argv, name)) for name in TRAIN_RATES):
            event("known defect: test_train_numbers_that_are_no_numbers")
            reject()
        assert not bad, f"train exited 0 with non-finite weights in {bad[:3]}\n{out}"


TRAIN_RATES = ("--lr", "--backbone-lr-mult", "--weight-decay")


def _extreme(value) -> bool:
    """A rate no run survives: NaN, infinite, or so large that the weights overflow."""
    try:
        x = float(str(value))
    except ValueError:
        return False
    return not math.isfinite(x) or abs(x) > 1e6


# -- 2. manifest fields ------------------------------------------------------------------------------------
MISSING = "<field removed>"

JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from(BOUNDARY_INTS), st.floats(), _TEXT),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3), max_leaves=6)


def manifest_fields(m: dict) -> list[tuple]:
    fields = [("bits",), ("feature_dim",), ("feature_dtype",), ("generation",), ("next_id",), ("tombstones",),
              ("tombstones", "count"), ("tombstones", "file"), ("tombstones", "sha256"), ("items",), ("deleted",),
              ("complete",), ("version",), ("shards",), ("class_names",), ("index",)]
    for s in range(len(m["shards"])):
        fields += [("shards", s, "rows"), ("shards", s, "file"), ("shards", s, "sha256"), ("shards", s)]
    fields += [("index", key) for key in m["index"]] + [("index", "coarse", "kind")]
    return fields


def near_values(m: dict, path: tuple) -> list:
    """Values close to the real one: off by one, another entry's, a path that leaves the collection."""
    value = _get(m, path)
    out = [MISSING]
    if isinstance(value, int) and not isinstance(value, bool):
        out += [value - 1, value + 1, value * 2, -value, float(value), str(value), True, 0, 2**63 - 1, 2**62]
    if isinstance(value, str):
        shards = m["shards"]
        out += [value.upper(), value + " ", "", "../" + value, "/" + value, "/dev/zero", "shards/", ".",
                shards[0]["file"], shards[-1]["file"], shards[0]["sha256"], shards[-1]["sha256"],
                m["index"]["file"], "float32", "float64", "object", "<f2"]
    if isinstance(value, list):
        out += [value[:1], value[::-1], value + value[:1], []]
    if isinstance(value, dict):
        out += [{}, {k: v for k, v in value.items() if k != sorted(value)[0]}]
    return out


def _get(m, path):
    for key in path:
        try:
            m = m[key]
        except (KeyError, IndexError, TypeError):
            return None
    return m


def _set(m, path, value):
    for key in path[:-1]:
        m = m[key]
    if value is MISSING:
        if isinstance(m, dict):
            m.pop(path[-1], None)
        else:
            del m[path[-1]]
    else:
        m[path[-1]] = value


@pytest.fixture(scope="module")
def untampered(light):
    query = run_in_process(["query", light, "--id", 0, "--json"])
    info = run_in_process(["info", light, "--verify", "--json"])
    assert query.code == 0 and info.code == 0, (query, info)
    return Quiet(query=json.loads(query.stdout), info=json.loads(info.stdout),
                 manifest=json.loads((light / "manifest.json").read_text()), name="untampered answers")


INFO_KEYS = ("complete", "items", "deleted", "shards", "bits", "feature_dim", "feature_dtype", "index", "index_delta")


@settings(PROPERTY_SETTINGS, max_examples=150)
@given(data=st.data())
def test_manifest_field(light, untampered, where, data):
    want_query, want_info, m = untampered["query"], untampered["info"], untampered["manifest"]
    path = data.draw(st.sampled_from(manifest_fields(m)), label="field")
    value = data.draw(st.one_of(st.sampled_from(near_values(m, path)), JSON_VALUES), label="value")
    tampered = copy.deepcopy(m)
    _set(tampered, path, value)
    root = copy_of(light, where())
    (root / "manifest.json").write_text(json.dumps(tampered))

    out = run_in_process(["query", root, "--id", 0, "--json"])
    if judge(out) == "ok":
        assert json.loads(out.stdout) == want_query, f"a different answer, exit 0\n{out}"
    out = run_in_process(["info", root, "--verify", "--json"])
    if judge(out, problems_ok=True) == "ok":
        got = json.loads(out.stdout)
        assert got["verified"] is True
        got, want = {k: got.get(k) for k in INFO_KEYS}, {k: want_info.get(k) for k in INFO_KEYS}
        if path == ("complete",):       # reported as it stands; marked unfinished, nothing queries it
            want["complete"] = got["complete"]
        if path == ("index",) and (value is None or value is MISSING):
            want["index"] = want["index_delta"] = None        # no index is a valid collection
        if got != want:
            known = known_silent_manifest_defect(path, value, m)
            if known:
                event(f"known defect: {known}")
                reject()
        assert got == want, f"info --verify passes with other facts\n{out}"
    elif out.code == 1 and not out.stderr.strip():
        assert json.loads(out.stdout)["verified"] is False


def known_silent_manifest_defect(path, value, m) -> str | None:
    from hashsearch.codes import code_bytes
    if path == ("bits",) and type(value) is int and 1 <= value <= 4096 and code_bytes(value) == code_bytes(m["bits"]):
        return "test_info_verify_checks_bits_against_the_codes"
    if path == ("tombstones",) and (value is None or value is MISSING):
        return "test_info_verify_checks_the_deleted_count"
    if path[0] == "index":              # info reads the index entry unchecked
        return "test_info_with_a_malformed_index_entry"
    return None


# -- 3. checkpoint fields --------------------------------------------------------------------------------------
CONFIG_FIELDS = ("bits", "backbone", "input_size", "mean", "std", "feature_dim", "num_classes", "class_names")


def config_values(field: str, config: dict) -> st.SearchStrategy:
    import torch
    value = config[field]
    near = [MISSING, None, True, str(value), [value], {"v": value}, torch.tensor(1.0)]
    if isinstance(value, int):
        near += [value - 1, value + 1, 0, -1, 1, 7, 8, 1024, 1025, 4096, 4097, float(value), 2**63, 10**30,
                 torch.tensor(value)]
    if isinstance(value, list) and field in ("mean", "std"):
        near += [[0.0] * 3, [1e-300] * 3, [1e308] * 3, [float("nan")] * 3, [float("inf")] * 3, [-1.0] * 3,
                 value[:2], value + [0.5], [str(v) for v in value], torch.tensor(value), tuple(value), [True] * 3]
    if field == "class_names":
        near += [value[:-1], value + ["extra"], [f"other{i}" for i in range(len(value))], list(range(len(value))),
                 ["x" * 10_000] * len(value), [""] * len(value)]
    if field == "backbone":
        near += ["alexnet", "efficientnet-lite0", "Small", "", "small "]
    return st.one_of(st.sampled_from(near), JSON_VALUES)


class Quiet(dict):
    """A fixture's dict that hypothesis prints by name, not as 160 kB of tensors."""

    def __repr__(self):
        return f"<{self.get('name', 'fixture')}>"


@pytest.fixture(scope="module")
def checkpoint(model):
    import torch
    return Quiet(torch.load(model, map_location="cpu", weights_only=True), name="the session model's payload")


@settings(PROPERTY_SETTINGS, max_examples=100)
@given(data=st.data())
def test_checkpoint_config_field(checkpoint, where, data):
    import torch
    from hashsearch import Encoder, HashsearchError
    from hashsearch.encoders.sources import SyntheticSource
    field = data.draw(st.sampled_from(CONFIG_FIELDS), label="field")
    value = data.draw(config_values(field, checkpoint["config"]), label="value")
    payload = {k: v for k, v in checkpoint.items() if k != "name"}
    payload["config"] = dict(payload["config"])
    _set(payload["config"], (field,), value)
    d = where()
    path = d / "model.pt"
    torch.save(payload, path)

    with time_limit(IN_PROCESS_LIMIT):
        try:        # the library: a HashsearchError, or an encoder that encodes
            encoder = Encoder.from_checkpoint(path, device="cpu")
            codes, feats = encoder.encode([SyntheticSource(8).load(i) for i in range(2)])
        except HashsearchError:
            encoder = None
        else:
            assert codes.shape == (2, (encoder.bits + 7) // 8)
            assert np.isfinite(feats).all(), f"Encoder made non-finite features from {field}={value!r}"

    out = run_in_process(["encode", "synthetic:8", "--model", path, "--out", d / "coll", "--workers", 0,
                          "--device", "cpu", "--quiet"])
    if judge(out) == "ok":
        assert encoder is not None, f"the CLI encodes with a checkpoint Encoder refuses\n{out}"
        check_encoded(d / "coll", n=8, bits=encoder.bits, dtype="float16")
    else:
        assert encoder is None, f"Encoder.from_checkpoint accepts a checkpoint the CLI refuses\n{out}"


# -- 4. defects found by the properties above, one test each (each failed before its fix) -----------------
def tampered_copy(light, where, edit) -> Path:
    root = copy_of(light, where())
    m = json.loads((root / "manifest.json").read_text())
    edit(m)
    (root / "manifest.json").write_text(json.dumps(m))
    return root


@pytest.mark.parametrize("kind, timeout, memory", [("fifo", 3, 8 << 30), ("zero", 30, 3 << 29)])
def test_delete_ids_file_that_never_ends(light, where, kind, timeout, memory):
    d = where()
    root = copy_of(light, d)
    before = manifest_bytes(root)
    out = run_in_child(["delete", root, "--ids-file", Odd(kind).make(d)], timeout=timeout, memory=memory)
    assert judge(out) == "refused"
    assert manifest_bytes(root) == before


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_json_output_that_is_a_fifo(light, where, command):
    d = where()
    fifo = Odd("fifo").make(d)
    argv = {"eval": ["eval", light, "--queries", light, "--mode", "bcs"],
            "bench": ["bench", "--exhaustive", "--n", 20, "--dim", 4, "--bits", 8, "--queries", 1,
                      "--cache-dir", d / "cache"]}[command]
    out = run_in_child([*argv, "--json", fifo], timeout=5)
    drop_bench_log(out)
    if judge(out) == "ok":      # the FIFO replaced by a regular file is fine too
        assert fifo.is_file() and json.loads(fifo.read_text())


def test_eval_plot_is_written_where_it_says(collection, where):
    curves = where() / "curves"
    out = run_in_process(["eval", collection, "--queries", collection, "--mode", "bcs", "--plot", curves])
    assert judge(out) == "ok"
    written = [line[len("wrote "):] for line in out.stdout.splitlines() if line.startswith("wrote ")]
    assert written and all(Path(p).is_file() and Path(p).read_bytes()[:4] == b"\x89PNG" for p in written), out


def test_hash_index_probing_depth_that_never_ends(light, where):
    root = copy_of(light, where())
    built = run_in_process(["build-index", root, "--coarse", "hash", "--hash-bits", 32, "--nflip", 32])
    if judge(built) == "refused":
        return
    assert judge(run_in_child(["query", root, "--id", 0, "--json"], timeout=3)) in ("ok", "refused")


@pytest.mark.parametrize("edit", [
    "m['index'] = {}", "m['index']['coarse'] = [1]", "m['index']['coarse']['kind'] = 'FLAT'",
    "m['index']['base_shards'] = 5", "m['index']['base_shards'] = ['a', 'b', 'c']"])
def test_info_with_a_malformed_index_entry(light, where, edit):
    root = tampered_copy(light, where, lambda m: exec(edit, {"m": m}))
    out = run_in_process(["info", root, "--verify", "--json"])
    assert judge(out, problems_ok=True) in ("refused", "problems")


def test_query_with_an_index_entry_without_bits(light, where):
    root = tampered_copy(light, where, lambda m: m["index"].pop("bits"))
    assert judge(run_in_process(["query", root, "--id", 0, "--json"])) == "refused"


@pytest.mark.parametrize("command", [["query", "--id", 0, "--json"], ["info", "--verify", "--json"]])
def test_huge_tombstone_count(light, where, command):
    root = tampered_copy(light, where, lambda m: m["tombstones"].update(count=2**62))
    out = run_in_process([command[0], root, *command[1:]])
    assert judge(out, problems_ok=True) in ("refused", "problems")


def test_info_verify_checks_bits_against_the_codes(light, where):
    root = tampered_copy(light, where, lambda m: m.update(bits=25))
    out = run_in_process(["info", root, "--verify", "--json"])
    assert judge(out, problems_ok=True) in ("refused", "problems")


def test_info_verify_checks_the_deleted_count(light, where):
    root = tampered_copy(light, where, lambda m: m.update(tombstones=None))
    out = run_in_process(["info", root, "--verify", "--json"])
    assert judge(out, problems_ok=True) in ("refused", "problems")


@pytest.fixture
def edited_model(checkpoint, where):
    import torch

    def make(**config) -> Path:
        payload = {k: v for k, v in checkpoint.items() if k != "name"}
        payload["config"] = {**payload["config"], **config}
        path = where() / "model.pt"
        torch.save(payload, path)
        return path
    return make


@pytest.mark.parametrize("how", ["checkpoint", "train"])
def test_input_size_too_small_for_the_backbone(edited_model, where, how):
    d = where()
    if how == "checkpoint":
        argv = ["encode", "synthetic:4", "--model", edited_model(input_size=4), "--out", d / "c"]
    else:
        argv = ["train", "synthetic:12", "--epochs", 1, "--input-size", 4, "--out", d / "m.pt"]
    out = run_in_process([*argv, "--workers", 0, "--device", "cpu", "--quiet"])
    assert judge(out) == "refused"


@pytest.mark.parametrize("config", [{"std": [1e-300] * 3}, {"mean": [1e308] * 3}])
def test_normalisation_that_makes_nan_features(edited_model, where, config):
    d = where()
    out = run_in_process(["encode", "synthetic:4", "--model", edited_model(**config), "--out", d / "c",
                          "--workers", 0, "--device", "cpu", "--quiet"])
    if judge(out) == "ok":
        check_encoded(d / "c", n=4, bits=16, dtype="float16")


def trained_ok(out: Outcome) -> bool:
    """train's answer is good: refused, or a checkpoint whose weights are all finite."""
    from hashsearch.encoders.checkpoint import read_checkpoint
    if judge(out) != "ok":
        return True
    state = read_checkpoint(last_value(out.argv, "--out"))["state_dict"]
    return all(v.isfinite().all() for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("option, value", [
    ("--lr", "nan"), ("--lr", "inf"), ("--backbone-lr-mult", "nan"), ("--weight-decay", "nan"),
    ("--warmup-epochs", "nan"), ("--warmup-epochs", "inf"), ("--val-fraction", "inf")])
def test_train_numbers_that_are_no_numbers(where, option, value):
    out = run_in_process(["train", "synthetic:12", "--epochs", 1, option, value, "--out", where() / "m.pt",
                          "--workers", 0, "--device", "cpu", "--quiet"])
    assert trained_ok(out), out


def test_train_negative_backbone_rate(where):
    out = run_in_process(["train", "synthetic:12", "--epochs", 1, "--backbone-lr-mult", -1,
                          "--out", where() / "m.pt", "--workers", 0, "--device", "cpu", "--quiet"])
    assert judge(out) == "refused"


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_train_seed_out_of_range(where, seed):
    out = run_in_process(["train", "synthetic:12", "--epochs", 1, "--seed", seed, "--out", where() / "m.pt",
                          "--workers", 0, "--device", "cpu", "--quiet"])
    assert judge(out) in ("ok", "refused")


@pytest.mark.parametrize("command", ["encode", "add", "train"])
def test_huge_worker_count_is_refused(collection, model, where, command):
    d = where()
    argv = {"encode": ["encode", "synthetic:4", "--model", model, "--out", d / "c"],
            "add": ["add", copy_of(collection, d), "synthetic:302"],
            "train": ["train", "synthetic:12", "--epochs", 1, "--out", d / "m.pt"]}[command]
    with time_limit(IN_PROCESS_LIMIT):
        r = cli(*argv, "--workers", 2**31 - 1, "--device", "cpu", "--quiet", ok=None)
    # worker_guard stops make_loader before it forks: reaching it is the defect
    assert not isinstance(r.exception, TooManyWorkers), r.exception
    out = Outcome([str(a) for a in argv], r.exit_code, r.stdout, r.stderr, None)
    assert judge(out) in ("ok", "refused")


# -- 5. shards whose datasets keep their bytes elsewhere (issue 29) --------------------------------------
# HDF5 can store a dataset's bytes in other files (external storage, virtual datasets) or link a name to a
# dataset of another file (external links) or to anywhere in the file (soft links).  The bytes elsewhere are
# the right ones, or an endless device, or a FIFO: any such shard is refused before a byte is read.
STORAGE_LAYOUTS = ("external", "external-zero", "external-fifo", "virtual")     # fixed-size data only
LINK_LAYOUTS = ("external-link", "external-link-fifo", "soft-link")
BLOCKING_LAYOUTS = {"external-fifo", "external-link-fifo"}
SHARD_DATASETS = ("codes", "features", "ids", "labels", "paths")


@st.composite
def shard_layouts(draw):
    layout = draw(st.sampled_from(STORAGE_LAYOUTS + LINK_LAYOUTS), label="layout")
    names = SHARD_DATASETS if layout in LINK_LAYOUTS else SHARD_DATASETS[:4]
    return draw(st.integers(0, 1), label="shard"), draw(st.sampled_from(names), label="dataset"), layout


def _stored_elsewhere(f, name: str, values: np.ndarray, layout: str, outside: Path) -> None:
    """Dataset `name` of the open HDF5 file `f`, holding `values` (or, for a device, its bytes), as `layout`."""
    import h5py
    if layout in ("external", "external-zero", "external-fifo"):
        target = outside / f"{name}.bin"
        if layout == "external":
            target.write_bytes(values.tobytes())
        elif layout == "external-zero":
            target.symlink_to("/dev/zero")
        else:
            os.mkfifo(target)
        f.create_dataset(name, values.shape, values.dtype, external=[(str(target), 0, values.nbytes)])
    elif layout == "virtual":
        source = outside / f"{name}.h5"
        with h5py.File(source, "w") as src:
            src[name] = values
        space = h5py.VirtualLayout(values.shape, values.dtype)
        space[...] = h5py.VirtualSource(str(source), name, values.shape)
        f.create_virtual_dataset(name, space)
    elif layout == "soft-link":
        f.create_dataset(f"hidden/{name}", data=values)
        f[name] = h5py.SoftLink(f"/hidden/{name}")
    else:
        target = outside / f"{name}.h5"
        if layout == "external-link":
            with h5py.File(target, "w") as src:
                src.create_dataset(name, data=values)
        else:
            os.mkfifo(target)
        f[name] = h5py.ExternalLink(str(target), name)


def keep_elsewhere(root: Path, shard: int, name: str, layout: str, outside: Path) -> None:
    """Rewrite shard `shard` of the collection at `root` with dataset `name` stored as `layout`, and its
    checksum in the manifest to match: what a collection made by someone else could hold."""
    import h5py
    from hashsearch.shards.manifest import file_sha256
    m = json.loads((root / "manifest.json").read_text())
    path = root / m["shards"][shard]["file"]
    new = path.with_name("rewritten.h5")
    with h5py.File(path, "r") as src, h5py.File(new, "w") as dst:
        for other in SHARD_DATASETS:
            if other != name:
                src.copy(other, dst)
        values = src[name][...]
        if name == "paths":
            values = values.astype(h5py.string_dtype("utf-8"))
        _stored_elsewhere(dst, name, values, layout, outside)
    os.replace(new, path)
    m["shards"][shard]["sha256"] = file_sha256(path)
    (root / "manifest.json").write_text(json.dumps(m))


@settings(PROPERTY_SETTINGS, max_examples=20)
@given(drawn=shard_layouts())
@example(drawn=(0, "features", "external"))
@example(drawn=(1, "codes", "external-zero"))
@example(drawn=(0, "features", "external-fifo"))
@example(drawn=(0, "ids", "virtual"))
@example(drawn=(1, "paths", "external-link"))
@example(drawn=(0, "codes", "external-link-fifo"))
@example(drawn=(0, "labels", "soft-link"))
def test_shard_datasets_stored_elsewhere_are_refused(light, where, drawn):
    shard, name, layout = drawn
    d = where()
    root = copy_of(light, d)
    outside = d / "outside"
    outside.mkdir()
    keep_elsewhere(root, shard, name, layout, outside)
    before = manifest_bytes(root)
    blocking = layout in BLOCKING_LAYOUTS
    # A FIFO is run once, in a child: each child costs seconds, and one hang is enough to see.
    commands = [["info", root, "--verify", "--json"]] if blocking else \
        [["info", root, "--verify", "--json"], ["query", root, "--id", 0, "--json"], ["delete", root, "--id", 3]]
    for argv in commands:
        out = run(argv, blocking)
        assert judge(out) == "refused", f"{layout} {name} in shard {shard} was not refused\n{out}"
        assert "refused" in out.stderr, out
    assert manifest_bytes(root) == before


@pytest.mark.parametrize("kind", ["fifo", "symlink", "zero"])
def test_add_with_a_rejects_file_that_is_not_the_collections_own(collection, where, kind):
    d = where()
    root = copy_of(collection, d)
    outside = d / "outside.jsonl"
    outside.write_text('{"index": 0, "path": "elsewhere", "reason": "kept"}\n')
    rejects = root / "rejects.jsonl"
    if kind == "fifo":
        os.mkfifo(rejects)
    else:
        rejects.symlink_to(outside if kind == "symlink" else "/dev/zero")
    images = d / "images"                # one image add takes, and one it rejects, which it would record
    save_image(images / "good.png", seed=3)
    (images / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    before, outside_before = manifest_bytes(root), outside.read_bytes()
    out = run_in_child(["add", root, images, "--workers", 0, "--device", "cpu", "--quiet"], timeout=30,
                       memory=4 << 30)
    assert judge(out) == "refused" and "rejects.jsonl" in out.stderr, out
    assert manifest_bytes(root) == before and outside.read_bytes() == outside_before


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_checkpoint_with_non_finite_weights_is_refused(checkpoint, where, value):
    import torch
    from hashsearch import Encoder, HashsearchError
    from hashsearch.encoders.checkpoint import read_weights
    d = where()
    payload = {k: v for k, v in checkpoint.items() if k != "name"}
    payload["state_dict"] = dict(payload["state_dict"])
    weight = payload["state_dict"]["latent.weight"].clone()
    weight[0, 0] = value            # bit 0 of every code would be 0
    payload["state_dict"]["latent.weight"] = weight
    torch.save(payload, d / "model.pt")
    with pytest.raises(HashsearchError, match="latent.weight holds NaN or infinite values"):
        Encoder.from_checkpoint(d / "model.pt", device="cpu")
    out = run_in_process(["encode", "synthetic:4", "--model", d / "model.pt", "--out", d / "c", "--workers", 0,
                          "--device", "cpu", "--quiet"])
    assert judge(out) == "refused" and "latent.weight" in out.stderr and not (d / "c").exists()
    torch.save({"conv.weight": torch.full((2, 2), value)}, d / "backbone.pt")      # --weights of a backbone
    with pytest.raises(HashsearchError, match="conv.weight holds NaN or infinite values"):
        read_weights(d / "backbone.pt")


# -- request bodies -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def service_client(photo_collection):
    """The HTTP app over the photo collection, in this process: its body limits are middleware of the app."""
    from fastapi.testclient import TestClient
    from hashsearch.serve.app import create_app
    from hashsearch.serve.service import SearchService
    service = SearchService(photo_collection, max_upload_mb=0.25)
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        yield client
    service.close()


def _body(kind: str, size: int, depth: int) -> bytes:
    if kind == "nested":
        return b"[" * depth + b"]" * depth
    if kind == "json":
        return b'{"id": 3, "pad": "' + b"x" * size + b'"}'
    if kind == "multipart":
        return (b'--b0\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
                b"Content-Type: image/png\r\n\r\n" + b"\x89PNG" + b"\0" * size + b"\r\n--b0--\r\n")
    return os.urandom(size)


@settings(PROPERTY_SETTINGS, max_examples=40)
@example(kind="nested", size=0, depth=2000, chunked=True, content_type="application/json")   # past a recursion
@given(kind=st.sampled_from(["json", "nested", "multipart", "bytes"]),
       size=st.sampled_from([0, 10, 4000, 5000, 300_000, 2_000_000]),
       depth=st.integers(1, 3000), chunked=st.booleans(),
       content_type=st.sampled_from(["application/json", "multipart/form-data; boundary=b0", "text/plain", None]))
def test_request_bodies_get_an_answer_never_a_500(service_client, kind, size, depth, chunked, content_type):
    """Any body, chunked or with a Content-Length, oversized or nested, is answered with one JSON error or a
    result; one over its limit is 413 whichever way it was sent."""
    from hashsearch.serve.app import SMALL_BODY_BYTES
    body = _body(kind, size, depth)
    headers = {"content-type": content_type} if content_type else {}
    content = (body[i:i + 65536] for i in range(0, max(len(body), 1), 65536)) if chunked else body
    r = service_client.post("/search", content=content, headers=headers)
    assert r.status_code in (200, 400, 404, 413, 415), (r.status_code, r.text[:200])
    assert r.headers["content-type"] == "application/json" and ("error" in r.json()) == (r.status_code != 200)
    limit = (SMALL_BODY_BYTES if not (content_type or "").startswith("multipart/")
             else int(0.25 * (1 << 20)) + (1 << 16))
    if len(body) > limit:
        assert r.status_code == 413, (kind, len(body), r.text[:200])
