"""benchmarks.backlog on the CPU with tiny fake rows: what is skipped as done, what does not start for lack of time,
how a row past the deadline is stopped (its whole process group), atomic result files, and that every real row's
command line parses with its benchmark's own parser."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import backlog
from benchmarks.backlog import DEADLINE, OUT, Row

ROOT = Path(__file__).resolve().parents[1]
INFO = dict(code_version="code-test", git_commit="x", code_commit="x", gpu="NVIDIA H100 80GB HBM3", gpu_slug="h100",
            backlog_deadline_s=60)


def py(code: str, *args: str) -> tuple[str, ...]:
    return ("python", "-c", code, *args)


def done_file(folder: Path, name: str, rows=None, **rec) -> Path:
    """A result file of row `name` (of `rows`, default the real ones): ok at code-v1 on an H100 unless `rec` says."""
    command = next(r for r in rows or backlog.ROWS if r.name == name).command()
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"x": 1, "backlog": {"row": name, "command": command, "status": "ok",
                                                     "code_version": "code-v1", "gpu_slug": "h100", **rec}}))
    return path


def test_only_rows_done_ok_at_this_code_version_on_this_gpu_are_skipped(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    done_file(a, "whole_720p_24gb")
    done_file(b, "gpu_tier", code_version="code-v0")  # other code
    done_file(b, "stream_480p_16gb", gpu_slug="h200")  # other GPU
    done_file(b, "whole_480p_16gb", status="failed")
    done_file(b, "fewstep_720p_fp8", status="timed_out")
    done_file(b, "waterfall_720p_peer", command=["python", "-m", "benchmarks.waterfall", "--rows", "9"])  # other args
    (b / "broken.json").write_text("{not json")
    (b / "list.json").write_text("[1, 2]")
    done = backlog.find_done([a, b, tmp_path / "missing"], backlog.ROWS, "h100", "code-v1")
    assert set(done) == {"whole_720p_24gb"}
    why = dict((r.name, w) for r, w in backlog.plan(backlog.ROWS, "h100", done, chosen=False))
    assert why["whole_720p_24gb"].startswith("done: ok at this code version on h100")
    assert all(why[n] == "pending" for n in ("gpu_tier", "stream_480p_16gb", "whole_480p_16gb", "fewstep_720p_fp8",
                                             "waterfall_720p_peer"))
    assert why["cli_720p_fast"] == "pending"  # an H100 row on an H100
    on_h200 = dict((r.name, w) for r, w in backlog.plan(backlog.ROWS, "h200", {}, chosen=False))
    assert on_h200["cli_720p_fast"].startswith("not for this GPU") and on_h200["gpu_tier"] == "pending"
    named = backlog.plan([r for r in backlog.ROWS if r.name == "cli_720p_fast"], "h200", {}, chosen=True)
    assert named[0][1] == "pending"  # named in --rows: runs on any GPU


def test_rows_measured_at_earlier_code_are_skipped_unless_stale(tmp_path, capsys):
    """A later session starts with what was never measured: a row ok at another code version (what the documents
    cite) is skipped, at this version preferred; --stale measures it again. Failed rows and other GPUs never count."""
    version = backlog.code_version()
    done_file(tmp_path, "gpu_tier", code_version="code-old")
    done_file(tmp_path, "stream_480p_16gb", code_version="code-old", status="failed")
    done_file(tmp_path, "whole_480p_16gb", code_version="code-old", gpu_slug="h200")
    now = done_file(tmp_path, "whole_720p_24gb", code_version=version)
    (tmp_path / "whole_720p_24gb_old.json").write_text(now.read_text().replace(version, "code-old"))
    args = ["--list", "--gpu", "h100", "--out", str(tmp_path / "out"), "--done", str(tmp_path), "--deadline", "540"]
    assert backlog.main(args) == 0
    out = capsys.readouterr().out
    assert "| gpu_tier | 300 | any | done: ok at an earlier code version on h100" in out
    assert "| whole_720p_24gb | 240 | any | done: ok at this code version on h100" in out
    assert "| stream_480p_16gb | 330 | any | would run at about 0-330 s |" in out  # failed: still pending
    assert "| whole_480p_16gb | 220 | any | would run at about 330-550 s |" not in out  # (540 s call: no room)
    assert "| whole_480p_16gb | 220 | any | pending" in out  # the H200's result does not count on an H100
    assert backlog.main([*args, "--stale"]) == 0
    out = capsys.readouterr().out
    assert "| gpu_tier | 300 | any | would run at about 0-300 s |" in out
    assert "| whole_720p_24gb | 240 | any | done: ok at this code version on h100" in out


def test_list_plans_without_running(tmp_path, capsys):
    version = backlog.code_version()
    done_file(tmp_path, "gpu_tier", code_version=version)
    assert backlog.main(["--list", "--gpu", "h100", "--out", str(tmp_path / "out"), "--done", str(tmp_path),
                         "--deadline", "540"]) == 0
    out = capsys.readouterr().out
    assert "| whole_720p_24gb | 240 | any | would run at about 0-240 s |" in out
    assert "| gpu_tier | 300 | any | done: ok at this code version on h100" in out
    assert "| fewstep_720p | 470 | h100 | pending, would not start" in out
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        backlog.main(["--list", "--rows", "gpu_tier,nope"])
    with pytest.raises(SystemExit):
        backlog.main(["--gpu", "h100"])  # --gpu only plans


def test_code_version_is_the_code_not_results_docs_or_caches(tmp_path):
    for rel in ("wan/a.py", "benchmarks/b.py", "benchmarks/results/r.json", "tests/t.py", "generate.py", "README.md",
                "OPTIMIZATION.md", "benchmarks/backlog.py", "tests/test_backlog.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    v0 = backlog.code_version(tmp_path)
    (tmp_path / "benchmarks/results/r.json").write_text("new numbers")
    (tmp_path / "benchmarks/results/backlog").mkdir()
    (tmp_path / "benchmarks/results/backlog/h100_gpu_tier.json").write_text("{}")
    (tmp_path / "OPTIMIZATION.md").write_text("new text")
    (tmp_path / "benchmarks/backlog.py").write_text("new estimates")  # a row's command is compared on its own
    (tmp_path / "wan/__pycache__").mkdir()
    (tmp_path / "wan/__pycache__/a.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / "tests/.pytest_cache").mkdir()
    assert backlog.code_version(tmp_path) == v0
    (tmp_path / "wan/a.py").write_text("changed")
    v1 = backlog.code_version(tmp_path)
    (tmp_path / "tests/new_test.py").write_text("")
    assert len({v0, v1, backlog.code_version(tmp_path)}) == 3
    assert backlog.code_version() == backlog.code_version() and backlog.code_version().startswith("code-")


def test_gpu_slug():
    assert backlog.gpu_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert backlog.gpu_slug("NVIDIA H200") == "h200"
    assert backlog.gpu_slug("NVIDIA A100-SXM4-80GB") == "a100"
    assert backlog.gpu_slug("h100") == "h100"
    assert backlog.gpu_slug("cpu") == "cpu"
    assert backlog.gpu_slug("NVIDIA GeForce RTX 4090") == "nvidia-geforce-rtx-4090"


def test_rows_that_do_not_fit_are_not_started_and_smaller_ones_after_them_are(tmp_path):
    marker = tmp_path / "big_ran"
    rows = [Row("big", py("import pathlib, sys; pathlib.Path(sys.argv[1]).touch()", str(marker)), 1000, "too big"),
            Row("small", py("import json, sys; json.dump({'n': 7, 'deadline': float(sys.argv[2])}, "
                            "open(sys.argv[1], 'w'))", OUT, DEADLINE), 1, "fits"),
            Row("report", py("import json, os; json.dump({'tests': {'t': {'outcome': 'passed'}}}, "
                             "open(os.environ['REPORT'], 'w'))"), 1, "env", env=(("REPORT", OUT),)),
            Row("stdout", py("print('noise'); print('RESULT ' + '{\"kind\": \"full\"}'); print('more')"), 1, "")]
    recs = backlog.run_backlog(rows, tmp_path / "out", 60, time.monotonic(), INFO)
    assert [r["status"] for r in recs] == ["skipped_deadline", "ok", "ok", "ok"]
    assert not marker.exists() and sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "h100_report.json", "h100_small.json", "h100_stdout.json"]  # no file for a row that did not run
    small = json.loads((tmp_path / "out/h100_small.json").read_text())
    assert small["n"] == 7 and 30 < small["deadline"] <= 60 - backlog.WRAP_UP_S  # its own deadline: the time left
    rec = small["backlog"]
    assert rec["row"] == "small" and rec["status"] == "ok" and rec["exit_code"] == 0
    assert rec["code_version"] == "code-test"
    assert rec["gpu"] == "NVIDIA H100 80GB HBM3" and rec["argv"][0] == sys.executable and rec["wall_s"] < 30
    assert {"started", "ended", "output_tail", "errors", "estimate_s"} <= set(rec)
    assert json.loads((tmp_path / "out/h100_report.json").read_text())["tests"]["t"]["outcome"] == "passed"
    assert json.loads((tmp_path / "out/h100_stdout.json").read_text())["kind"] == "full"


def test_rows_with_errors_inside_or_a_bad_exit_are_failed(tmp_path):
    rows = [Row("inner", py("import json, sys; json.dump({'rows': [{'per_forward_s': 1}, {'error': 'timed out'}]}, "
                            "open(sys.argv[1], 'w'))", OUT), 1, ""),
            Row("tests", py("import json, sys; json.dump({'tests': {'t': {'outcome': 'failed'}}}, "
                            "open(sys.argv[1], 'w'))", OUT), 1, ""),
            Row("exit3", py("import sys; print('out of memory'); sys.exit(3)"), 1, ""),
            Row("nothing", py("print('done')"), 1, "")]
    recs = backlog.run_backlog(rows, tmp_path, 60, time.monotonic(), INFO)
    assert [r["status"] for r in recs] == ["failed"] * 4
    assert recs[0]["errors"] == ["rows[1]: timed out"] and recs[1]["errors"] == ["tests.t: failed"]
    assert recs[2]["exit_code"] == 3 and "out of memory" in recs[2]["output_tail"]
    assert recs[3]["errors"] == ["no result: the row wrote no JSON"]
    assert backlog.find_done([tmp_path], rows, "h100", "code-test") == {}


SLEEPER = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # only SIGTERM stops this one
child = subprocess.Popen(['sleep', '300'])
open(sys.argv[1], 'w').write(f'{os.getpgid(0)} {child.pid}')
print('started', flush=True)
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_a_row_past_the_deadline_is_stopped_with_its_whole_group(tmp_path, monkeypatch):
    monkeypatch.setattr(backlog, "STOP", ((signal.SIGINT, 1.0), (signal.SIGTERM, 1.0), (signal.SIGKILL, 1.0)))
    pids = tmp_path / "pids"
    rows = [Row("sleeper", py(SLEEPER, str(pids)), 1, "")]
    t0 = time.monotonic()
    (rec,) = backlog.run_backlog(rows, tmp_path / "out", 3, t0, INFO)
    assert rec["status"] == "timed_out" and 3 <= rec["wall_s"] < 8 and "started" in rec["output_tail"]
    pgid, child = map(int, pids.read_text().split())
    assert not backlog.group_alive(pgid) and not _alive(pgid) and not _alive(child)
    saved = json.loads((tmp_path / "out/h100_sleeper.json").read_text())["backlog"]
    assert saved["status"] == "timed_out" and saved["errors"] == ["no result: the row wrote no JSON"]


def test_result_files_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "h100_row.json"
    backlog.write_json_atomic(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        backlog.write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["h100_row.json"]


SIGTERMED = """
import signal, sys
from benchmarks import backlog
backlog.gpu_name = lambda: 'NVIDIA H100 80GB HBM3'
backlog.STOP = ((signal.SIGINT, 1.0), (signal.SIGTERM, 1.0), (signal.SIGKILL, 1.0))
backlog.ROWS = (backlog.Row('sleeper', ('python', '-c', sys.argv[2], sys.argv[3]), 1, ''),)
sys.exit(backlog.main(['--out', sys.argv[1], '--deadline', '120']))
"""


def test_sigterm_to_the_backlog_stops_and_records_the_running_row(tmp_path):
    pids, out = tmp_path / "pids", tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SIGTERMED, str(out), SLEEPER, str(pids)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    end = time.monotonic() + 60
    while not pids.exists() and time.monotonic() < end:
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, text
    pgid, child = map(int, pids.read_text().split())
    assert not backlog.group_alive(pgid) and not _alive(child)
    assert [p.name for p in out.iterdir()] == ["h100_sleeper.json"]  # no temporary file left
    assert json.loads((out / "h100_sleeper.json").read_text())["backlog"]["status"] == "interrupted"


def test_every_gpu_test_is_in_the_gpu_tier_files():
    """The gpu_tier row collects only backlog.GPU_TEST_FILES (CPU-only modules may import what the GPU image
    lacks): every test marked gpu must live in one of them."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "tests/"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    files = {line.split("::")[0] for line in out.stdout.splitlines() if "::" in line}
    assert files and files <= set(backlog.GPU_TEST_FILES), files - set(backlog.GPU_TEST_FILES)


def test_every_row_parses_with_its_own_benchmark_parser():
    import importlib

    for row in backlog.ROWS:
        assert row.argv[:2] == ("python", "-m"), row
        args = [a.replace(OUT, "/tmp/x.json").replace(DEADLINE, "500") for a in row.argv[3:]]
        if row.argv[2].startswith("benchmarks."):
            parsed = importlib.import_module(row.argv[2]).build_parser().parse_args(args)
            if "--deadline" in args:
                assert parsed.deadline == 500 and parsed.out == "/tmp/x.json"
        else:  # pytest: its own parser, and the GPU tests are there to select
            assert row.argv[2] == "pytest"
            out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", *args], cwd=ROOT,
                                 capture_output=True, text=True, timeout=300)
            assert out.returncode == 0 and "test_gpu.py::" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    names = [r.name for r in backlog.ROWS]
    assert len(set(names)) == len(names)
    fp8 = next(r for r in backlog.ROWS if r.name == "fewstep_720p_fp8")
    from benchmarks.fewstep import build_parser

    opts = build_parser().parse_args([a.replace(OUT, "x").replace(DEADLINE, "1") for a in fp8.argv[3:]])
    assert json.loads(opts.options)["vae_dtype"] == "bf16" and opts.variant == [
        ("fp8 all + flash3_fp8", {"fp8_linear": "all", "attn_backend": "flash3_fp8"})]


def test_memory_tiers_whole_run_alone_needs_a_budget():
    from benchmarks import memory_tiers

    with pytest.raises(SystemExit):
        memory_tiers.main(["--only_whole_run"])
    assert "--only_whole_run" in memory_tiers.build_parser().format_help()


@pytest.mark.parametrize("free,changed", [(139.0, False), (80.0, True), (24.0, True)])
def test_rows_cli_plan_is_what_generate_plans_for_the_free_memory(monkeypatch, free, changed):
    import torch

    from benchmarks import rows
    from wan.options import fast_options

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free * 1e9, 141e9))
    opts, seen = rows.cli_fast_plan(fast_options(), "720p", 81, torch.device("cuda"))
    assert seen["free_gb"] == free and seen["options_changed"] == changed
    assert seen["log"] and seen["log"][0].startswith(f"--fast: {free:.1f} GB free on the GPU")
    assert (opts.max_gpu_memory == free and opts.offload_model is None) if changed else opts == fast_options()
    with pytest.raises(SystemExit, match="CUDA"):
        rows.cli_fast_plan(fast_options(), "720p", 81, torch.device("cpu"))


def test_a_cpu_run_is_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(backlog, "gpu_name", lambda: "cpu")
    assert backlog.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_summary_numbers_read_the_benchmarks_records_and_the_docs_name_every_row():
    def load(name):
        return json.loads((ROOT / "benchmarks/results" / name).read_text())

    keys = {r.name: r.key for r in backlog.ROWS}
    assert keys["waterfall_720p_peer"](load("h200_720p_waterfall.json")).startswith("s/forward 13.56, ")
    assert keys["fewstep_720p"](load("h200_720p_fewstep.json")) == "4-step video 47.2 s; 40-step row 10.24 s/forward"
    assert keys["stream_480p_16gb"](load("h200_720p_memory_tiers_24gb.json")) == "x1.002 of resident, 18.6 GB reserved"
    assert keys["gpu_tier"](load("gpu_tier.json")) == "15 passed"
    assert backlog.errors_in(load("h200_720p_memory_tiers_24gb.json")) == ["whole_run: timed out after 141 s"]
    doc = (ROOT / "OPTIMIZATION.md").read_text()
    assert all(f"`{r.name}`" in doc for r in backlog.ROWS)


def test_a_call_skips_done_rows_runs_the_rest_and_prints_the_summary(tmp_path, monkeypatch, capsys):
    rows = (Row("measured", py("raise SystemExit(1)"), 1, ""),
            Row("quick", py("import json, sys; json.dump({'v': 1}, open(sys.argv[1], 'w'))", OUT), 1, ""),
            Row("elsewhere", py("raise SystemExit(1)"), 1, "", gpus=("h200",)))
    monkeypatch.setattr(backlog, "ROWS", rows)
    monkeypatch.setattr(backlog, "gpu_name", lambda: "NVIDIA H100 80GB HBM3")
    done = tmp_path / "done"
    done.mkdir()
    done_file(done, "measured", rows, code_version=backlog.code_version())
    out = tmp_path / "out"
    assert backlog.main(["--out", str(out), "--done", str(done), "--deadline", "60"]) == 0
    text = capsys.readouterr().out
    assert f"| measured | skipped_done |  | {done / 'measured.json'} |" in text
    assert "| quick | ok |" in text and "| elsewhere | skipped_gpu |" in text
    assert [p.name for p in out.iterdir()] == ["h100_quick.json"]
    # the next call finds it done in --out
    assert backlog.main(["--out", str(out), "--done", str(done), "--deadline", "60"]) == 0
    assert "| quick | skipped_done |" in capsys.readouterr().out
