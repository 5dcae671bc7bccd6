"""Reliability battery (issue #18): replay hostile and careless inputs, faults and attacks against fedpeft and count
what happened to each, by outcome class.

Each case (benchmarks/reliability_cases.py) provokes one situation with real parts -- the `fedpeft` console script in
a subprocess with a timeout, the library's entry points, or a real tiny Flower simulation for the aggregation attacks
-- and classifies what came back from the exit code, the output and the files. Nothing is hard-coded: a case that
regresses is counted in the class it falls into.

Outcome classes:
  clear-error        exit code != 0 (or the library's error), a message naming the file/field/value, no traceback
  handled            the right thing happened (a bad site dropped and named while the round goes on, a torn line
                     recovered, a run resumed without losing or repeating a round)
  traceback          a Python traceback reached the user
  data-loss          something written was lost or corrupted
  silent-accept      a wrong input accepted without a word
  misleading-error   refused, but the message does not name what is wrong
  hang               the command did not end within its timeout
  single-site-abort  one site's bad input failed the round or the run for every site

Target: zero traceback, data-loss, silent-accept, hang and single-site-abort (and no misleading error).

    python3 benchmarks/reliability.py --results /tmp/reliability.jsonl            # the whole battery
    python3 benchmarks/reliability.py --only pki --only paths                      # some kinds
    python3 benchmarks/reliability.py --list                                       # the cases

--results is append-only JSON lines, one per finished case: a run stopped half-way resumes where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("clear-error", "handled", "traceback", "data-loss", "silent-accept", "misleading-error", "hang",
           "single-site-abort")
MISSES = frozenset({"traceback", "data-loss", "silent-accept", "misleading-error", "hang", "single-site-abort"})
TRACEBACK = "Traceback (most recent call last)"
CLI_TIMEOUT = 120.0
SIM_TIMEOUT = 420.0


@dataclass(frozen=True)
class Outcome:
    cls: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.cls not in CLASSES:
            raise ValueError(f"unknown outcome class {self.cls!r}")

    @property
    def miss(self) -> bool:
        return self.cls in MISSES


@dataclass
class Proc:
    """What a finished (or killed) command left: exit code, output, whether it ran past its timeout."""

    argv: list[str]
    rc: int | None
    out: str
    err: str
    timed_out: bool = False
    seconds: float = 0.0

    @property
    def text(self) -> str:
        return self.out + "\n" + self.err

    def first_error(self) -> str:
        lines = [line for line in self.err.splitlines() if line.strip() and "gemm_4bit" not in line]
        return (lines[-1] if lines else (self.out.strip().splitlines() or [""])[-1])[:300]


@dataclass(frozen=True)
class Case:
    name: str
    kind: str
    func: Callable[[Ctx], Outcome]
    doc: str
    slow: bool = False  # needs a simulation (shared with the other cases of its group)


CASES: list[Case] = []


def case(kind: str, name: str | None = None, *, slow: bool = False) -> Callable[[Callable[[Ctx], Outcome]], Callable]:
    """Register ``func(ctx) -> Outcome`` as a case of ``kind``."""

    def register(func: Callable[[Ctx], Outcome]) -> Callable[[Ctx], Outcome]:
        case_name = name or func.__name__.removeprefix("case_").replace("_", "-")
        if any(c.name == case_name for c in CASES):
            raise ValueError(f"two cases named {case_name}")
        CASES.append(Case(case_name, kind, func, (func.__doc__ or "").strip().split("\n")[0], slow))
        return func

    return register


# ---- running commands ------------------------------------------------------------------------------------------

def fedpeft_argv() -> list[str]:
    """The `fedpeft` console script of this interpreter (or its entry point run by the interpreter)."""
    script = Path(sys.executable).parent / "fedpeft"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from fedpeft.cli import main; sys.exit(main())"]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))}
    return {**env, **(extra or {})}


def run(argv: list[str], *, cwd: Path, timeout: float = CLI_TIMEOUT, env: dict[str, str] | None = None,
        stdin: str | None = None) -> Proc:
    """Run ``argv`` in its own process group; on timeout the whole group is killed (a hang is a result)."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
        return Proc(argv, proc.returncode, out, err, False, time.monotonic() - started)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        return Proc(argv, None, out, err, True, time.monotonic() - started)


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, 9)
    with contextlib.suppress(Exception):
        proc.wait(timeout=30)


# ---- what a case sees ------------------------------------------------------------------------------------------

class Ctx:
    """A case's temporary directory, its commands (kept for the reproduction) and the shared fixtures."""

    fixtures: dict[str, object] = {}
    _fixture_locks: dict[str, threading.Lock] = {}
    _guard = threading.Lock()

    def __init__(self, root: Path, name: str) -> None:
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.commands: list[str] = []

    def cli(self, *args: str, cwd: Path | None = None, timeout: float = CLI_TIMEOUT,
            env: dict[str, str] | None = None) -> Proc:
        argv = [*fedpeft_argv(), *map(str, args)]
        cwd = cwd or self.dir
        self.commands.append(f"(cd {cwd} && fedpeft {' '.join(_quote(a) for a in args)})")
        return run(argv, cwd=cwd, timeout=timeout, env=env)

    def python(self, script: str, *, timeout: float = CLI_TIMEOUT, cwd: Path | None = None) -> Proc:
        """Run a Python script (the library's entry points, in a process of its own)."""
        path = self.dir / f"script-{len(self.commands)}.py"
        path.write_text(script)
        self.commands.append(f"(cd {cwd or self.dir} && python3 {path})")
        return run([sys.executable, str(path)], cwd=cwd or self.dir, timeout=timeout)

    def note(self, text: str) -> None:
        self.commands.append(text)

    @classmethod
    def fixture(cls, name: str, build: Callable[[], object]) -> object:
        """``build()`` once per battery run, shared by every case that asks (a simulation, a completed run)."""
        with cls._guard:
            lock = cls._fixture_locks.setdefault(name, threading.Lock())
        with lock:
            if name not in cls.fixtures:
                try:
                    cls.fixtures[name] = build()
                except Exception as err:  # the fixture's own failure: every case of it reports it
                    cls.fixtures[name] = FixtureFailed(f"{name}: {type(err).__name__}: {err}",
                                                       traceback.format_exc())
            value = cls.fixtures[name]
        if isinstance(value, FixtureFailed):
            raise value
        return value


class FixtureFailed(Exception):
    def __init__(self, message: str, trace: str) -> None:
        super().__init__(message)
        self.trace = trace


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg) if len(arg) < 120 else shlex.quote(arg[:20]) + f"...({len(arg)} chars)"


# ---- classification --------------------------------------------------------------------------------------------

class Snapshot:
    """The bytes of every file under some paths, to tell afterwards whether anything was lost or changed."""

    def __init__(self, *paths: Path, ignore: Iterable[str] = ("run.lock",)) -> None:
        self.ignore = set(ignore)
        self.paths = paths
        self.files = self._read()

    def _read(self) -> dict[str, bytes]:
        files: dict[str, bytes] = {}
        for root in self.paths:
            items = [root] if root.is_file() else sorted(root.rglob("*")) if root.is_dir() else []
            for item in items:
                if item.is_file() and item.name not in self.ignore:
                    files[str(item)] = item.read_bytes()
        return files

    def changed(self) -> list[str]:
        now = self._read()
        lost = [f"{name} removed" for name in self.files if name not in now]
        edited = [f"{name} changed" for name in self.files if name in now and now[name] != self.files[name]]
        return lost + edited


def without_case_dirs(text: str) -> str:
    """``text`` with the cases' own directories cut out: their names (e.g. ...-is-a-directory) must not pass for
    the words a message is checked for."""
    root = os.environ.get("RELIABILITY_ROOT")
    return re.sub(re.escape(root) + r"/[^/\s'\"]*", "<case-dir>", text) if root else text


def has_traceback(text: str) -> bool:
    return TRACEBACK in text


def expect_error(proc: Proc, *fragments: str, unchanged: Snapshot | None = None, clean: Iterable[Path] = (),
                 exit_codes: Iterable[int] | None = None) -> Outcome:
    """A command that must refuse: timeout -> hang; traceback; files changed -> data-loss; exit 0 -> silent-accept;
    a refusal whose message misses one of ``fragments`` (case-insensitive) -> misleading-error; else clear-error.
    ``clean``: paths a refusal must not create."""
    if proc.timed_out:
        return Outcome("hang", f"no end after {proc.seconds:.0f} s")
    if has_traceback(proc.text):
        tail = [line for line in proc.text.splitlines() if line.strip()]
        return Outcome("traceback", tail[-1][:300] if tail else "")
    changed = unchanged.changed() if unchanged is not None else []
    created = [f"{path} created" for path in clean if path.exists()]
    if changed or created:
        return Outcome("data-loss", "; ".join([*changed, *created])[:400])
    if proc.rc == 0:
        return Outcome("silent-accept", f"exit 0: {(proc.out.strip().splitlines() or [''])[-1][:200]}")
    if exit_codes is not None and proc.rc not in set(exit_codes):
        return Outcome("misleading-error", f"exit {proc.rc}, expected one of {sorted(exit_codes)}: "
                                           f"{proc.first_error()}")
    message = without_case_dirs(proc.text).lower()
    missing = [f for f in fragments if f.lower() not in message]
    if missing:
        return Outcome("misleading-error", f"exit {proc.rc}, message lacks {missing}: {proc.first_error()}")
    return Outcome("clear-error", f"exit {proc.rc}: {proc.first_error()}")


def expect_raise(call: Callable[[], object], error: type[BaseException] | tuple[type[BaseException], ...],
                 *fragments: str, unchanged: Snapshot | None = None) -> Outcome:
    """The library's entry point must raise ``error`` naming ``fragments``; any other exception is a traceback
    (it would reach the user as one), returning normally is a silent accept."""
    try:
        call()
    except error as err:
        changed = unchanged.changed() if unchanged is not None else []
        if changed:
            return Outcome("data-loss", "; ".join(changed)[:400])
        message = str(err)
        missing = [f for f in fragments if f.lower() not in message.lower()]
        if missing:
            return Outcome("misleading-error", f"{type(err).__name__} lacks {missing}: {message[:300]}")
        return Outcome("clear-error", f"{type(err).__name__}: {message[:300]}")
    except Exception as err:
        return Outcome("traceback", f"{type(err).__name__}: {str(err)[:300]}")
    changed = unchanged.changed() if unchanged is not None else []
    if changed:
        return Outcome("data-loss", "; ".join(changed)[:400])
    return Outcome("silent-accept", "no error raised")


def classify_process_failure(proc: Proc) -> Outcome | None:
    """For a command that should have worked: the hang or traceback it ended in, else None."""
    if proc.timed_out:
        return Outcome("hang", f"no end after {proc.seconds:.0f} s")
    if has_traceback(proc.text):
        tail = [line for line in proc.text.splitlines() if line.strip()]
        return Outcome("traceback", tail[-1][:300] if tail else "")
    return None


# ---- the battery -----------------------------------------------------------------------------------------------

def load_results(path: Path | None) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if path is None or not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a stopped run: that case runs again
            continue
        if isinstance(record, dict) and "case" in record and record.get("outcome") in CLASSES:
            done[record["case"]] = record
    return done


def run_case(item: Case, root: Path) -> dict:
    ctx = Ctx(root, item.name)
    started = time.monotonic()
    try:
        outcome = item.func(ctx)
    except FixtureFailed as err:
        outcome = Outcome("traceback", f"the case's fixture failed: {err}")
        ctx.note(err.trace[-1500:])
    except Exception as err:
        outcome = Outcome("traceback", f"{type(err).__name__}: {str(err)[:300]} (in the case: "
                                       f"{traceback.format_exc().splitlines()[-3].strip()[:200]})")
    return {"case": item.name, "kind": item.kind, "outcome": outcome.cls, "detail": outcome.detail,
            "miss": outcome.miss, "seconds": round(time.monotonic() - started, 1), "doc": item.doc,
            "reproduce": ctx.commands, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def select(cases: list[Case], only: list[str], names: list[str], max_cases: int | None) -> list[Case]:
    kinds = {k for arg in only for k in arg.split(",") if k}
    unknown = kinds - {c.kind for c in cases}
    if unknown:
        raise SystemExit(f"reliability: unknown kind(s) {sorted(unknown)}; kinds: {sorted({c.kind for c in cases})}")
    chosen = [c for c in cases if (not kinds or c.kind in kinds) and (not names or any(n in c.name for n in names))]
    return chosen[:max_cases] if max_cases is not None else chosen


def table(records: list[dict]) -> str:
    counts = Counter(r["outcome"] for r in records)
    width = max(len(c) for c in CLASSES)
    lines = [f"{'outcome':<{width}}  cases", f"{'-' * width}  -----"]
    lines += [f"{cls:<{width}}  {counts.get(cls, 0):>5}" for cls in CLASSES]
    lines.append(f"{'total':<{width}}  {sum(counts.values()):>5}")
    return "\n".join(lines)


def kinds_table(records: list[dict]) -> str:
    by_kind: dict[str, Counter] = {}
    for r in records:
        by_kind.setdefault(r["kind"], Counter())[r["outcome"]] += 1
    head = "kind".ljust(12) + "".join(f"{c[:12]:>13}" for c in CLASSES) + f"{'total':>7}"
    rows = [head]
    for kind in sorted(by_kind):
        counts = by_kind[kind]
        rows.append(kind.ljust(12) + "".join(f"{counts.get(c, 0):>13}" for c in CLASSES)
                    + f"{sum(counts.values()):>7}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, help="append-only JSONL of finished cases; cases already in it are "
                                                     "not run again")
    parser.add_argument("--only", action="append", default=[], metavar="KIND", help="only cases of this kind "
                                                                                   "(repeatable, or a,b)")
    parser.add_argument("--case", action="append", default=[], metavar="NAME", help="only cases whose name holds "
                                                                                   "NAME (repeatable)")
    parser.add_argument("--max-cases", type=int, default=None, help="at most this many cases (in battery order)")
    parser.add_argument("--jobs", type=int, default=2, help="cheap cases run this many at a time (default 2)")
    parser.add_argument("--no-slow", action="store_true", help="leave out the cases that need a simulation")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories (their path is printed)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)

    import reliability_cases  # noqa: F401 -- registers the cases

    chosen = select(CASES, args.only, args.case, args.max_cases)
    if args.no_slow:
        chosen = [c for c in chosen if not c.slow]
    if args.list:
        for item in chosen:
            print(f"{item.kind:<12} {item.name:<36} {'[simulation] ' if item.slow else ''}{item.doc}")
        print(f"{len(chosen)} cases")
        return 0

    done = load_results(args.results)
    todo = [c for c in chosen if c.name not in done]
    print(f"reliability: {len(chosen)} cases selected, {len(chosen) - len(todo)} already in {args.results}, "
          f"{len(todo)} to run", flush=True)
    root = Path(tempfile.mkdtemp(prefix="fedpeft-reliability-"))
    os.environ["RELIABILITY_ROOT"] = str(root)  # where the shared simulations of the slow cases run
    write_lock = threading.Lock()
    records = [done[c.name] for c in chosen if c.name in done]
    started = time.monotonic()

    def finish(record: dict) -> None:
        with write_lock:
            records.append(record)
            mark = "MISS" if record["miss"] else "ok  "
            print(f"{mark} {record['kind']:<12} {record['case']:<36} {record['outcome']:<17} "
                  f"{record['seconds']:>6.1f}s  {record['detail'][:150]}", flush=True)
            if args.results is not None:
                args.results.parent.mkdir(parents=True, exist_ok=True)
                with open(args.results, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())

    try:
        cheap, slow = [c for c in todo if not c.slow], [c for c in todo if c.slow]
        # The simulations run one at a time in a thread of their own, beside the cheap cases.
        simulations = threading.Thread(target=lambda: [finish(run_case(item, root)) for item in slow])
        simulations.start()
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for record in pool.map(lambda c: run_case(c, root), cheap):
                finish(record)
        simulations.join()
    finally:
        if args.keep:
            print(f"reliability: temporary directories kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    order = {c.name: i for i, c in enumerate(chosen)}
    records.sort(key=lambda r: order.get(r["case"], 0))
    misses = [r for r in records if r["miss"]]
    print()
    print(kinds_table(records))
    print()
    print(table(records))
    if misses:
        print(f"\n{len(misses)} case(s) miss the target:")
        for r in misses:
            print(f"  {r['kind']}/{r['case']}: {r['outcome']}: {r['detail']}")
            for command in r.get("reproduce", []):
                print(f"      {command}")
    counts = Counter(r["outcome"] for r in records)
    print(f"\nsummary: {len(records)} cases in {time.monotonic() - started:.0f} s: "
          + ", ".join(f"{counts.get(c, 0)} {c}" for c in CLASSES))
    return 1 if misses else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import reliability  # the cases register into this module, not into __main__

    sys.exit(reliability.main())
