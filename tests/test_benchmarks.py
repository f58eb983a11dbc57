"""Every benchmark script runs its real commands end to end on tiny inputs (smoke mode, benchmarks/smoke.py).

With VITSLIM_BENCH_SMOKE=1 the scripts swap in a tiny random-init ViT, a step or two, 16 images (digits
when CIFAR-10 is not there) and 5 timed runs, and write into one temporary folder, where they build on
each other as they do in vitslim-out. A command that no longer runs on the current code (a renamed
option, a moved module) fails here. Each `python` command goes to tests/_pyserver.py, which imports
torch once and forks per command (VITSLIM_TEST_FORKSERVER=0: plain processes), and the speed tables
run in a second queue beside the fine-tuning scripts: two cores, two queues.
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from vitslim.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
RESULTS = BENCH / "results"

# every file in benchmarks/ and the test (or fixture) that runs it, directly or through the script named
EXERCISED = {
    "common.sh": "every .sh", "short_finetune.sh": "the fine-tuning scripts", "smoke.py": "smoke",
    "finetune_report.py": "the fine-tuning scripts", "cait_export_eval.py": "test_cait_cifar10",
    "sit_cifar10.sh": "sit_runs", "sit_long.sh": "test_sit_long", "spvit_cifar10.sh": "test_spvit_and_its_modes",
    "spvit_modes.py": "test_spvit_and_its_modes", "prune_merge_cifar10.sh": "prune_merge_runs",
    "prune_merge_long.sh": "test_prune_merge_long", "cait_cifar10.sh": "test_cait_cifar10",
    "finetune_cifar10.sh": "second_queue", "foundation.sh": "second_queue", "speed.sh": "second_queue",
    "speed.py": "second_queue", "tome_overhead.py": "second_queue", "cait_speed.py": "test_recorded_python_commands_run",
    "prune_merge_scaling.py": "test_recorded_python_commands_run", "speed_recheck.py": "test_speed_recheck",
    "segment_camvid.py": "test_recorded_python_commands_run", "deploy.py": "test_recorded_python_commands_run",
    "rope_positions.py": "test_recorded_python_commands_run", "auto_cifar10.sh": "test_auto_cifar10",
    "auto_report.py": "test_auto_cifar10", "auto_camvid.sh": "test_auto_camvid", "long_finetune.sh": "test_long_finetune_resumes_and_marks_unfinished",
    "long_report.py": "test_long_finetune_resumes_and_marks_unfinished",
    "channel_importance.py": "test_recorded_python_commands_run",
}


def test_every_benchmark_script_is_exercised():
    scripts = {p.name for p in BENCH.iterdir() if p.suffix in (".sh", ".py")}
    assert scripts == set(EXERCISED), "add the new script to a smoke test and to EXERCISED"


class Smoke:
    """Runs benchmark commands in smoke mode in one work folder, their `python` through the fork server."""

    def __init__(self, work: Path, python: str):
        self.work, self.results, self.python = work, work / "results", python
        self.env = {**os.environ, "VITSLIM_BENCH_SMOKE": "1", "VITSLIM_BENCH_DIR": str(work), "PYTHON": python,
                    "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
        self.queue = ThreadPoolExecutor(max_workers=1)  # the second queue

    def __call__(self, *command: str, **env: str) -> str:
        """Run a command from the repository root; fail with its output unless it exits 0."""
        done = subprocess.run(command, cwd=REPO, env={**self.env, **env}, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, f"{shlex.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def later(self, *command: str, **env: str) -> Future:
        """Run a command in the second queue; .result() waits for it (and raises its failure)."""
        return self.queue.submit(self, *command, **env)

    def report(self, name: str) -> dict:
        """A JSON report the smoke run wrote."""
        return json.loads((self.results / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def smoke():
    """One smoke folder (and fork server) for the module: the scripts reuse each other's runs."""
    with tempfile.TemporaryDirectory(prefix="vb-") as tmp:  # short: a socket path has at most 107 bytes
        tmp = Path(tmp)
        server = None
        python = sys.executable
        if os.environ.get("VITSLIM_TEST_FORKSERVER", "1") != "0":
            sock = tmp / "py.sock"
            env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
            server = subprocess.Popen([sys.executable, str(REPO / "tests/_pyserver.py"), "serve", str(sock)],
                                      env=env, stdout=subprocess.PIPE, text=True)
            assert server.stdout.readline().strip() == "ready"
            python = tmp / "python"
            python.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -S "
                              f"{shlex.quote(str(REPO / 'tests/_pyserver.py'))} {shlex.quote(str(sock))} \"$@\"\n")
            python.chmod(0o755)
        committed = {p: p.stat().st_mtime for p in RESULTS.iterdir()}
        runner = Smoke(tmp / "work", str(python))
        try:
            runner(runner.python, "benchmarks/smoke.py", str(runner.work / "tiny-vit"))  # once, for both queues
            yield runner
        finally:
            runner.queue.shutdown(cancel_futures=True)
            if server is not None:
                server.terminate()  # its handlers are reaped as they finish
                server.wait()
        assert {p: p.stat().st_mtime for p in RESULTS.iterdir()} == committed, "smoke mode wrote into results/"


@pytest.fixture(scope="module", autouse=True)
def second_queue(smoke):
    """Start the speed tables and the CIFAR-less fine-tune at once, beside the fine-tuning chain."""
    return {
        "foundation": smoke.later("bash", "benchmarks/foundation.sh"),
        "speed": smoke.later("bash", "benchmarks/speed.sh", "sit", "spvit", "prune_merge", "cait", "pit"),
        # as in a clean clone without ../shared: digits instead of CIFAR-10
        "finetune": smoke.later("bash", "benchmarks/finetune_cifar10.sh", VITSLIM_SHARED="/nonexistent",
                                VITSLIM_DATA="/nonexistent"),
    }


def _runs(report: dict) -> list[str]:
    return [row["run"] for row in report["rows"]]


@pytest.fixture(scope="module")
def sit_runs(smoke):
    smoke("bash", "benchmarks/sit_cifar10.sh")
    return smoke.work / "sit_cifar10"


def test_sit_cifar10(smoke, sit_runs):
    report = smoke.report("sit_cifar10")
    assert _runs(report) == ["dense"] + [f"{m}@{b}" for b in (0.5, 0.7) for m in ("sit-frd", "sit-kd", "tome", "evit")]
    assert all(row["steps"] == 2 and row["n"] == 16 for row in report["rows"])


def test_sit_long(smoke, sit_runs):
    smoke("bash", "benchmarks/sit_long.sh")
    assert _runs(smoke.report("sit_long_cifar10")) == ["dense", "sit-frd@0.5", "sit-frd-2ep@0.5"]


def test_auto_cifar10(smoke):
    smoke("bash", "benchmarks/auto_cifar10.sh")
    rows = smoke.report("auto_cifar10")["rows"]
    assert [r["target"] for r in rows] == ["macs=0.5", "macs=0.7", "speedup=1.5"]
    assert smoke.report("auto_cifar10")["command"] == "bash benchmarks/auto_cifar10.sh"  # the default targets
    for row in rows[:2]:  # MACs targets are always met; a speed-up may not be on a tiny model
        assert row["met"] and abs(row["macs_ratio"] - float(row["target"][5:])) <= 0.02 * float(row["target"][5:])
        assert row["hand"]["method"] == "tome"  # the committed table's best at 0.5 and 0.7


def test_auto_cifar10_finetune(smoke):
    smoke("bash", "benchmarks/auto_cifar10.sh", FINETUNE="2", TARGETS="macs=0.5")
    (row,) = smoke.report("auto_cifar10_finetune2")["rows"]
    assert row["met"] and row["finetune"]["steps"] == 2 and row["chosen"] in row["finetune"]["candidates"]
    assert all("2" in row["candidates"][name]["finetuned"] for name in row["finetune"]["candidates"])
    table = (smoke.results / "auto_cifar10_finetune2.md").read_text()
    assert "FINETUNE=2 TARGETS=\"macs=0.5\" bash benchmarks/auto_cifar10.sh" in table
    assert table.count("| macs=0.5 |") == 1 + len(row["finetune"]["candidates"])  # the target, then each finalist


def test_auto_camvid(smoke):
    smoke("bash", "benchmarks/auto_camvid.sh", TARGETS="macs=0.5 speedup=1.5")
    hand = smoke.report("auto_camvid_hand")["rows"]
    assert [r["method"] for r in hand] == ["dense", "tome", "atme"]  # under the head auto searched under
    assert all(r["speedup_batch32"] > 0 for r in hand)  # a speed-up target: the hand rows are timed too
    macs, speed = smoke.report("auto_camvid")["rows"]
    assert (macs["target"], speed["target"]) == ("macs=0.5", "speedup=1.5")
    assert smoke.report("auto_camvid")["command"] == 'TARGETS="macs=0.5 speedup=1.5" bash benchmarks/auto_camvid.sh'
    assert macs["met"] and macs["metric"] == "miou" and abs(macs["macs_ratio"] - 0.5) <= 0.02 * 0.5
    assert macs["dense_miou"] == pytest.approx(hand[0]["miou_linear"], abs=1e-3)  # the same head and images
    if speed["met"]:  # timed on a busy machine: a tiny model may not reach 1.5x
        assert speed["speedup"] >= 1.5 and speed["metric"] == "miou"
    if speed["hand"] is not None:
        assert speed["hand"]["speedup"] >= 1.5


def test_long_finetune_resumes_and_marks_unfinished(smoke):
    name = "long_finetune_cifar10-5ep@0.5"
    smoke("bash", "benchmarks/long_finetune.sh", RUNS="dense tome cait")
    first = {r["run"]: r for r in smoke.report(name)["rows"]}
    assert list(first) == ["dense", "tome@0.5", "cait@0.5"]
    assert all(r["status"] == "finished" and set(r["curve"]) == {"0", "1"} for r in first.values())
    assert first["tome@0.5"]["deit_s_speedup_b32"] is not None and first["cait@0.5"]["top1_exported"] is not None
    # killed after its last checkpoint: the report shows the run as unfinished, a rerun completes it
    (smoke.work / name / "tome@0.5" / "summary.json").unlink()
    smoke(smoke.python, "benchmarks/long_report.py", str(smoke.work / name), "dense", "tome@0.5", "--name", name,
          "--results", str(smoke.results))
    assert smoke.report(name)["rows"][1]["status"] == "unfinished"
    smoke("bash", "benchmarks/long_finetune.sh", RUNS="dense tome cait")
    rows = smoke.report(name)["rows"]
    assert rows[1]["status"] == "finished" and rows[1]["curve"] == first["tome@0.5"]["curve"]
    # a new checkout has the committed report but no run folders: nothing is trained again, the rows stay
    shutil.rmtree(smoke.work / name / "dense")
    smoke("bash", "benchmarks/long_finetune.sh", RUNS="dense tome cait")
    assert not (smoke.work / name / "dense").exists()
    assert smoke.report(name)["rows"][0] == first["dense"]


def test_spvit_and_its_modes(smoke, sit_runs):
    smoke("bash", "benchmarks/spvit_cifar10.sh")
    assert _runs(smoke.report("spvit_cifar10")) == ["dense"] + [
        f"{m}@{b}" for b in (0.5, 0.7) for m in ("spvit", "tome", "evit")]
    out = smoke(smoke.python, "benchmarks/spvit_modes.py", str(sit_runs / "spvit@0.5/last.pt"), "--limit", "2000")
    assert set(json.loads(out)) == {"(a) top-k inference", "(b) masked + Gumbel (official eval)",
                                    "(c) masked + argmax"}


@pytest.fixture(scope="module")
def prune_merge_runs(smoke, sit_runs):
    smoke("bash", "benchmarks/prune_merge_cifar10.sh")


def test_prune_merge_cifar10(smoke, prune_merge_runs):
    runs = _runs(smoke.report("prune_merge_cifar10"))
    assert runs == ["dense", "prune_merge@0.5", "tome@0.5", "evit@0.5", "prune_merge@0.65", "prune_merge@0.7",
                    "tome@0.7", "evit@0.7"]


def test_prune_merge_long(smoke, prune_merge_runs):
    smoke("bash", "benchmarks/prune_merge_long.sh")
    assert _runs(smoke.report("prune_merge_long_cifar10")) == ["dense", "prune_merge@0.65", "prune_merge-2ep@0.65"]


def test_cait_cifar10(smoke, sit_runs):
    smoke("bash", "benchmarks/cait_cifar10.sh")
    rows = smoke.report("cait_cifar10")["rows"]
    assert [r["run"] for r in rows] == ["dense"] + [
        f"{m}@{b}" for b in (0.5, 0.7) for m in ("tome", "evit", "atme", "cdcp", "cait")]
    assert [r["run"] for r in rows if r["top1_exported"] is not None] == ["cdcp@0.5", "cait@0.5", "cdcp@0.7", "cait@0.7"]
    assert (smoke.work / "cait_cifar10/tome@0.5").resolve() == (sit_runs / "tome@0.5").resolve()  # reused


def test_finetune_cifar10_without_the_shared_data(smoke, second_queue):
    second_queue["finetune"].result()
    report = smoke.report("finetune_cifar10")
    assert _runs(report) == ["dense", "evit", "tome"]
    assert f"--model {smoke.work / 'tiny-vit'} --data digits --epochs 1" in report["rows"][0]["command"]


def test_foundation_training_free_and_overhead(smoke, second_queue):
    second_queue["foundation"].result()
    assert [r["method"] for r in smoke.report("cifar10_training_free")["rows"]] == ["dense", "tome", "evit", "topk"]
    assert (smoke.results / "cifar10_training_free.png").is_file() and smoke.report("tome_overhead")


def _load_speed_driver(script: str = "speed.py"):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_" + Path(script).stem, BENCH / script)
    sys.path.insert(0, str(BENCH))  # speed.py imports smoke.py beside it
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


@pytest.mark.parametrize("name", sorted(p.stem for p in RESULTS.glob("deit_s_*speed*.json")))
def test_speed_sh_has_the_command_of_every_speed_table(smoke, second_queue, name):
    """The driver command in speed.sh (or foundation.sh) measures what the committed table measured."""
    second_queue["foundation"].result()
    second_queue["speed"].result()
    committed = json.loads((RESULTS / f"{name}.json").read_text())
    made = smoke.report(name)
    argv = shlex.split(made["command"])
    assert argv[:2] == ["python", "benchmarks/speed.py"]
    args = _load_speed_driver().build_parser().parse_args(argv[2:])
    proto = committed["protocol"]
    batch = args.batch_sizes.index(proto["batch_size"])
    runs = args.runs[batch] if len(args.runs) > 1 else args.runs[0]
    assert (runs, args.threads, args.precision) == (proto["runs"], proto["threads"], proto["precision"])
    assert args.allocator == ("default" if proto.get("allocator", "tuned") == "default" else "tuned")
    assert args.model == "deit_small_patch16_224"
    rows = [(r["method"].split()[0], r["budget"]) for r in committed["rows"]]  # cdcp (exported), cdcp (CAIT-...)
    assert args.methods.split(",") == list(dict.fromkeys(m for m, _ in rows[1:]))
    assert args.budgets == sorted({b for _, b in rows[1:]})
    smoke_budget = args.budgets[0]  # smoke mode measures the first budget only
    assert [(r["method"].split()[0], r["budget"]) for r in made["rows"]] == [
        r for r in rows if r[0] == "dense" or r[1] == smoke_budget]


RECORDED = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]


def test_recorded_cli_commands_still_parse():
    """The `vitslim ...` command of every committed result (and of each run in it) is valid today."""
    commands = [c for data in RECORDED for c in [data.get("command")] + [r.get("command") for r in data.get("rows", [])]
                if c and c.startswith("vitslim ")]
    assert len(commands) > 20
    for command in commands:
        try:
            build_parser().parse_args(shlex.split(command)[1:])
        except SystemExit:
            pytest.fail(f"a committed result's command no longer parses: {command}")


# one committed command per benchmark script (the others differ in numbers only)
RECORDED_PYTHON = {c.split()[1]: c for c in (d.get("command") or "" for d in RECORDED) if c.startswith("python ")}


@pytest.mark.parametrize("command", sorted(RECORDED_PYTHON.values()), ids=sorted(RECORDED_PYTHON))
def test_recorded_python_commands_run(smoke, command, tmp_path):
    """A committed result made by a benchmark script: its command runs today (smoke mode, its own folder)."""
    smoke(smoke.python, *shlex.split(command)[1:], VITSLIM_BENCH_DIR=str(tmp_path))
    assert list((tmp_path / "results").glob("*.json")), f"{command} wrote no report into the smoke folder"


def test_speed_recheck(tmp_path):
    """The rerun report pairs rows by method and budget and gives new/committed per row and per table."""
    name = "deit_s_cait_speed_b32.json"
    committed = json.loads((RESULTS / name).read_text())
    for row in committed["rows"]:
        if row["method"].startswith("cdcp"):
            row["speedup"] *= 1.1  # the rerun is 10% faster on CDCP's rows
    (tmp_path / name).write_text(json.dumps(committed))
    recheck = _load_speed_driver("speed_recheck.py")
    assert recheck.main([str(RESULTS), str(tmp_path), "--name", "check"]) == 0
    (table,) = json.loads((tmp_path / "check.json").read_text())["tables"]
    ratios = {(r["method"], r["budget"]): r["speedup_ratio"] for r in table["rows"]}
    assert ratios[("cdcp", 0.5)] == ratios[("cdcp", 0.7)] == 1.1 and ratios[("atme", 0.5)] == 1.0
    assert len(ratios) == 6 and table["median_ratio"]["measured_over_ideal"] == 1.0
    assert "| cdcp | 0.50 |" in (tmp_path / "check.md").read_text()
    assert recheck.main([str(RESULTS), str(tmp_path / "empty")]) == 2
