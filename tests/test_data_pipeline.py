"""``llamaforge data prepare`` on datatrove executors: the output does not depend on the
number of tasks, killed runs resume task by task, failures name their task."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamaforge.config import ConfigError
from llamaforge.data.prepare import load_data_config, prepare
from llamaforge.data.sources import KINDS
from llamaforge.data.stdlib import file_docs, python_files, stdlib_dir, topics_file

from .conftest import REPO
from .data_corpus import WORDS, build_corpus, source_output, write_config

SOURCES = ("web", "code", "books", "stories")


def _quiet(_msg: str) -> None:
    pass


def _run(root: Path, tok: Path, name: str, executor: str) -> dict:
    cfg = load_data_config(write_config(root, tok, root / name, executor))
    results = prepare(cfg, progress=False, log=_quiet)
    assert all(r.get("complete") for r in results), results
    return {s: source_output(root / name / s) for s in SOURCES}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, meta_tokenizer_path):
    """The in-process path (no datatrove) and datatrove with one task, on the same corpus."""
    root = tmp_path_factory.mktemp("pipeline")
    legacy = _run(root, meta_tokenizer_path, "legacy", "")
    one = _run(root, meta_tokenizer_path, "one", "[executor]\ntasks = 1")
    return root, legacy, one


def test_one_task_matches_the_in_process_path(reference):
    root, legacy, one = reference
    for s in SOURCES:
        assert one[s] == legacy[s], s
    # the corpus has cross-file duplicates of every kind, so the dedup stages did work
    removed = {s: one[s]["clean"]["removed"] for s in SOURCES}
    assert removed["web"]["duplicate_line"] > 0
    assert removed["code"]["duplicate_file"] == 1
    assert removed["books"]["near_duplicate"] == 1
    meta = json.loads((root / "one" / "stories" / "meta.json").read_text())
    assert meta["tasks"] == 1 and meta["clean"]["peak_rss_mb"] > 0


def test_four_tasks_on_two_workers_give_the_same_output(reference, meta_tokenizer_path):
    root, _, one = reference
    four = _run(root, meta_tokenizer_path, "four", "[executor]\ntasks = 4\nworkers = 2")
    for s in SOURCES:
        assert four[s] == one[s], s
    meta = json.loads((root / "four" / "stories" / "meta.json").read_text())
    assert meta["tasks"] == 4
    # every task wrote its own shards; the meta lists them in task order
    files = [sh["file"] for sh in meta["splits"]["train"]["shards"]]
    assert files == sorted(files) and len({f.split("-")[1] for f in files}) == 4
    # the mixture sampler reads them as one stream
    from llamaforge.data.mixture import TokenSource

    assert TokenSource(root / "four" / "stories").tokens == meta["splits"]["train"]["tokens"]
    assert not list((root / "four").glob("*/*.tmp*"))


def _completions(out: Path, source: str, stage: str) -> list[str]:
    folder = out / "_datatrove" / source / stage / "completions"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _cli(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "llamaforge", "data", "prepare", str(config), "--quiet", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src")}


def _wait_for(pred, proc: subprocess.Popen, limit: float = 120.0) -> None:
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, "the run ended before the point of the test"
        assert time.time() - t0 < limit, "timed out waiting"
        time.sleep(0.01)


def test_sigkill_then_rerun_redoes_only_unfinished_tasks(reference, meta_tokenizer_path):
    root, _, one = reference
    out = root / "killed"
    config = write_config(root, meta_tokenizer_path, out, "[executor]\ntasks = 4\nworkers = 1")
    proc = subprocess.Popen(
        _cli(config), env=_env(), start_new_session=True, stderr=subprocess.DEVNULL
    )
    try:
        _wait_for(lambda: len(_completions(out, "web", "read")) >= 2, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    done = _completions(out, "web", "read")
    assert 2 <= len(done) < 4 or not (out / "web" / "meta.json").exists()
    assert not (out / "web" / "meta.json").exists() and not (out / "mixture.json").exists()
    stamps = {
        n: (out / "web" / "work" / f"read-{n}.jsonl").stat().st_mtime_ns
        for n in done
        if (out / "web" / "work" / f"read-{n}.jsonl").exists()
    }
    assert stamps
    run = subprocess.run(_cli(config), env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for n, stamp in stamps.items():  # finished tasks were skipped, not redone
        assert (out / "web" / "work" / f"read-{n}.jsonl").stat().st_mtime_ns == stamp
    for s in SOURCES:
        assert source_output(out / s) == one[s], s
    assert (out / "mixture.json").is_file()


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        kids += [int(k) for k in text]
    return kids


def test_a_dying_worker_is_reported_and_the_other_tasks_finish(reference, meta_tokenizer_path):
    root, _, one = reference
    out = root / "dying"
    config = write_config(
        root, meta_tokenizer_path, out, "[executor]\ntasks = 4\nworkers = 2", ("web", "code")
    )
    proc = subprocess.Popen(
        _cli(config), env=_env(), start_new_session=True, stdout=subprocess.PIPE, text=True
    )
    try:
        _wait_for(lambda: bool(_children(proc.pid)), proc)
        victim = _children(proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        stdout, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1
    assert "worker process died (exit code -9)" in stdout and "FAILED" in stdout
    assert not (out / "web" / "meta.json").exists()  # the victim was web's first task
    assert (out / "code" / "meta.json").exists()  # the other sources finished
    assert len(_completions(out, "web", "read")) == 3
    run = subprocess.run(_cli(config), env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for s in ("web", "code"):
        assert source_output(out / s) == one[s], s


def test_an_unwritable_task_output_is_named_and_nothing_looks_complete(
    reference, meta_tokenizer_path
):
    root, _, one = reference
    out = root / "blocked"
    config = write_config(root, meta_tokenizer_path, out, "[executor]\ntasks = 3\nworkers = 1")
    cfg = load_data_config(config)
    cfg.sources = [s for s in cfg.sources if s.name == "stories"]
    (out / "stories").mkdir(parents=True)
    blocker = out / "stories" / "train-00001-00000.bin"
    blocker.mkdir()  # task 1 cannot clear its old shard: an OSError in that task only
    lines: list[str] = []
    (result,) = prepare(cfg, progress=False, log=lines.append)
    assert not result["complete"]
    assert "stage tokenize: 1 of 3 task(s) failed (task 1: IsADirectoryError" in result["error"]
    assert str(blocker) in result["error"]
    assert _completions(out, "stories", "tokenize") == ["00000", "00002"]
    assert not (out / "stories" / "meta.json").exists()
    blocker.rmdir()
    (result,) = prepare(cfg, progress=False, log=lines.append)
    assert result["complete"]
    assert source_output(out / "stories") == one["stories"]


def test_executor_config_errors(tmp_path, meta_tokenizer_path):
    config = write_config(
        tmp_path, meta_tokenizer_path, tmp_path / "o", "[executor]\ntype = 'slurm'\ntasks = 2"
    )
    with pytest.raises(ConfigError, match="needs executor.partition"):
        load_data_config(config)
    config = write_config(tmp_path, meta_tokenizer_path, tmp_path / "o", "[executor]\ntype = 'ray'")
    with pytest.raises(ConfigError, match="needs executor.tasks >= 1"):
        load_data_config(config)
    config = write_config(tmp_path, meta_tokenizer_path, tmp_path / "o", "[executor]\nkind = 'x'")
    with pytest.raises(ConfigError, match="executor: unknown key"):
        load_data_config(config)


@pytest.fixture
def ray_cluster(monkeypatch):
    """A real Ray cluster on 127.0.0.1 with 2 CPUs, shut down afterwards."""
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("PYTHONPATH", str(REPO / "src"))  # the workers import llamaforge
    monkeypatch.setenv("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ray_cluster_gives_the_same_output(reference, meta_tokenizer_path, ray_cluster):
    root, _, one = reference
    executor = "[executor]\ntype = 'ray'\ntasks = 3\nworkers = 2\nmem_per_cpu_gb = 0.25"
    four = _run(root, meta_tokenizer_path, "ray", executor)
    for s in SOURCES:
        assert four[s] == one[s], s
    assert _completions(root / "ray", "web", "read") == ["00000", "00001", "00002"]


def test_slurm_job_scripts_are_written_and_their_pickled_stages_run(reference, meta_tokenizer_path):
    """Without a Slurm cluster here: the sbatch scripts datatrove would submit are written
    (submit = false), checked, and each stage's pickled executor is run task by task on the
    local process-per-task executor; the output equals the one-task run."""
    import dill

    from llamaforge.data.pipeline import _local_executor_class

    root, _, one = reference
    out = root / "slurm"
    executor = (
        "[executor]\ntype = 'slurm'\ntasks = 2\nworkers = 2\npartition = 'cpu'\n"
        "time = '02:00:00'\nsubmit = false\nenv_command = 'source /opt/venv/bin/activate'"
    )
    cfg = load_data_config(write_config(root, meta_tokenizer_path, out, executor, ("web",)))
    lines: list[str] = []
    (result,) = prepare(cfg, progress=False, log=lines.append)
    assert result["submitted"] is False and "Slurm job scripts written" in lines[-1]
    logs = out / "_datatrove" / "web"
    stages = ["read", "lines", "tokenize", "finalize"]
    submit = (logs / "submit.sh").read_text()
    for i, stage in enumerate(stages):
        script = (logs / stage / "launch_script.slurm").read_text()
        tasks = 1 if stage == "finalize" else 2
        assert script.startswith("#!/bin/bash\n")
        assert f"#SBATCH --array=0-{tasks - 1}%{tasks}" in script
        for want in (
            "--partition=cpu",
            "--time=02:00:00",
            "--cpus-per-task=1",
            f"--job-name=llamaforge-web-{stage}",
            "source /opt/venv/bin/activate",
        ):
            assert want in script, want
        pik = (logs / stage / "executor.pik").resolve()
        assert f"launch_pickled_pipeline {pik}" in script
        assert json.loads((logs / stage / "ranks_to_run.json").read_text()) == list(range(tasks))
        assert ("--dependency" in submit.splitlines()[3 + 2 * i]) == (i > 0)
        with open(pik, "rb") as f:
            slurm = dill.load(f)
        assert slurm.world_size == tasks and slurm.partition == "cpu"
        local = _local_executor_class()(
            slurm.pipeline, tasks=tasks, workers=1, logging_dir=str(root / "slurm-run" / stage)
        )
        assert local.run_tasks() == {}
    assert source_output(out / "web") == one["web"]


def test_large_web_files_are_split_by_byte_ranges(tmp_path, meta_tokenizer_path):
    """A line-split text file and a JSON-lines file read as byte ranges by several tasks
    give the pages, duplicates and tokens of the whole files read by one process."""
    import random

    from .data_corpus import WORDS

    rng = random.Random(3)
    web = tmp_path / "web"
    web.mkdir()
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(300)]
    lines += lines[:40]  # duplicate lines, some in other ranges
    (web / "corpus.en").write_text("\n".join(lines) + "\n")
    rows = [{"text": "\n".join(rng.sample(lines, 3))} for _ in range(120)]
    (web / "pages.jsonl").write_text(
        "\n".join(json.dumps(r) for r in rows) + "\n{broken json\n" + json.dumps(rows[0]) + "\n"
    )
    outputs = {}
    for name, executor in (("whole", ""), ("ranges", "[executor]\ntasks = 3\nsplit_bytes = 3000")):
        config = tmp_path / f"{name}.toml"
        config.write_text(f"""
tokenizer = "{meta_tokenizer_path}"
output = "{tmp_path / name}"
val_fraction = 0.2
[[sources]]
name = "web"
kind = "web"
paths = ["{web}"]
options = {{ quality = "none", languages = [], txt_split = "line" }}
{executor}
""")
        (result,) = prepare(load_data_config(config), progress=False, log=_quiet)
        assert result["complete"], result
        outputs[name] = source_output(tmp_path / name / "web")
    assert outputs["ranges"] == outputs["whole"]
    assert outputs["whole"]["clean"]["removed"]["bad_json_line"] == 1
    assert outputs["whole"]["clean"]["removed"]["duplicate_line"] >= 40
    work = json.loads((tmp_path / "ranges" / "web" / "work" / "plan.json").read_text())
    assert len(work["units"]) > 6  # both files were cut into ranges


def test_minhash_near_duplicates_across_tasks(tmp_path, meta_tokenizer_path):
    """Web MinHash dedup (datatrove's signature and bucket stages, FineWeb parameters):
    near-copies of pages in other files are removed, the first in reading order is kept,
    whatever the number of tasks; the in-process path refuses the option by name."""
    import random

    from .data_corpus import WORDS

    rng = random.Random(5)
    web = tmp_path / "web"
    web.mkdir()
    pages = [" ".join(rng.choice(WORDS) for _ in range(80)) + "." for _ in range(24)]
    for i in range(4):
        (web / f"f{i}.txt").write_text("\n\n".join(pages[i * 6 : (i + 1) * 6]) + "\n")
    copies = []
    for k in (0, 7, 13):  # near-copies (one word changed) of pages held by other files
        words = pages[k].split()
        words[40] = "different"
        copies.append(" ".join(words))
    (web / "f9.txt").write_text("\n\n".join(copies) + "\n")
    outputs = {}
    for name, executor in (
        ("inproc", ""),
        ("one", "[executor]\ntasks = 1"),
        ("three", "[executor]\ntasks = 3\nworkers = 2"),
    ):
        config = tmp_path / f"{name}.toml"
        config.write_text(f"""
tokenizer = "{meta_tokenizer_path}"
output = "{tmp_path / name}"
val_fraction = 0.2
[[sources]]
name = "web"
kind = "web"
paths = ["{web}"]
options = {{ quality = "none", languages = [], dedup_lines = false, minhash = true }}
{executor}
""")
        (result,) = prepare(load_data_config(config), progress=False, log=_quiet)
        if name == "inproc":
            assert not result["complete"] and "option 'minhash'" in result["error"]
            continue
        assert result["complete"], result
        outputs[name] = source_output(tmp_path / name / "web")
    assert outputs["one"]["clean"]["removed"] == {"minhash_duplicate": 3}
    assert outputs["one"]["clean"]["documents_out"] == 24
    assert outputs["three"] == outputs["one"]
    kept = (tmp_path / "one" / "web" / "work" / "filter-00000.jsonl").read_text()
    assert kept.count("different") == 3  # stored before the filter; the copies are last


def test_cli_flags_choose_the_executor(reference, meta_tokenizer_path, tmp_path):
    root, _, one = reference
    out = tmp_path / "cli"
    config = write_config(root, meta_tokenizer_path, out, "", ("stories",))
    bad = subprocess.run(
        _cli(config, "--executor", "ray"), env=_env(), capture_output=True, text=True
    )
    assert bad.returncode != 0 and "needs executor.tasks >= 1" in bad.stderr
    logs = tmp_path / "logs"
    args = ("--tasks", "2", "--workers", "2", "--logging-dir", str(logs))
    run = subprocess.run(
        _cli(config, *args), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "2 task(s), peak memory per worker" in run.stdout
    assert sorted(p.name for p in (logs / "stories" / "tokenize" / "completions").iterdir()) == [
        "00000",
        "00001",
    ]
    assert source_output(out / "stories") == one["stories"]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 24 KiB tmpfs (needs root and mount rights: skipped elsewhere)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_full_output_disk_names_the_file_and_task(reference, meta_tokenizer_path, tiny_disk):
    root, _, one = reference
    logs = tiny_disk.parent / "logs"
    executor = f"[executor]\ntasks = 4\nworkers = 1\nlogging_dir = '{logs}'"
    cfg = load_data_config(write_config(root, meta_tokenizer_path, tiny_disk / "out", executor))
    cfg.sources = [s for s in cfg.sources if s.name == "stories"]
    lines: list[str] = []
    from llamaforge.files import NoSpaceError

    with pytest.raises(NoSpaceError, match="mixture.json"):  # the disk is still full
        prepare(cfg, progress=False, log=lines.append)
    report = "\n".join(lines)
    assert "stories: FAILED: source stories: stage tokenize:" in report
    assert "no space left on device while writing" in report and ".bin" in report, report
    done = sorted(p.name for p in (logs / "stories" / "tokenize" / "completions").iterdir())
    assert "00000" in done and len(done) < 4  # the first task finished, a later one failed
    folder = tiny_disk / "out" / "stories"
    assert not (folder / "meta.json").exists()
    assert not list(folder.glob(".*tmp*"))  # no temporaries left behind
    for t in done:  # every finished task's shards are whole
        task = json.loads((folder / "work" / f"task-{t}.json").read_text())
        for split in task["splits"].values():
            for sh in split["shards"]:
                assert (folder / sh["file"]).stat().st_size == 2 * sh["tokens"]


SLURM_CONF = """ClusterName=lftest
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/none
CredType=cred/none
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=localhost NodeHostname={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def slurm_cluster(tmp_path, monkeypatch):
    """A one-node Slurm (Debian's slurm-wlm: slurmctld + slurmd on 127.0.0.1, no munge),
    started and stopped by the test; skipped where slurm-wlm is not installed or not root."""
    import shutil
    import socket

    if not (shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("sbatch")):
        pytest.skip("slurm-wlm (slurmctld, slurmd, sbatch) is not installed")
    if os.geteuid() != 0:
        pytest.skip("a throwaway slurmd needs root")
    d = tmp_path / "slurm"
    for sub in ("state", "spool"):
        (d / sub).mkdir(parents=True)
    conf = d / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(
            d=d, host=socket.gethostname(), ctld_port=_free_port(), d_port=_free_port()
        )
    )
    monkeypatch.setenv("SLURM_CONF", str(conf))
    procs = [
        subprocess.Popen(
            ["slurmctld", "-D", "-i"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        ),
        subprocess.Popen(["slurmd", "-D"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT),
    ]
    try:
        t0 = time.time()
        while (
            "idle"
            not in subprocess.run(
                ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True
            ).stdout
        ):
            if time.time() - t0 > 60:
                log = (d / "slurmctld.log").read_text()[-500:]
                pytest.skip(f"the one-node Slurm did not come up ({log})")
            time.sleep(0.5)
        yield d
    finally:
        subprocess.run(["scancel", "--user", "root"], capture_output=True)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.mark.slow
def test_a_one_node_slurm_runs_the_job_arrays(reference, meta_tokenizer_path, slurm_cluster):
    """The real datatrove Slurm path: sbatch'd job arrays chained with afterok, srun,
    launch_pickled_pipeline; a rerun once they are done writes mixture.json."""
    root, _, one = reference
    out = slurm_cluster / "out"
    env = f"export PATH={Path(sys.executable).parent}:$PATH PYTHONPATH={REPO / 'src'}"
    executor = (
        f"[executor]\ntype = 'slurm'\ntasks = 2\nworkers = 2\npartition = 'debug'\n"
        f"time = '00:10:00'\nenv_command = '{env}'\nsbatch_args = {{ mem-per-cpu = '100M' }}"
    )
    config = write_config(root, meta_tokenizer_path, out, executor, ("code", "stories"))
    cfg = load_data_config(config)
    lines: list[str] = []
    results = prepare(cfg, progress=False, log=lines.append)
    assert all(r.get("submitted") for r in results), lines
    t0 = time.time()
    while subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip():
        assert time.time() - t0 < 400, "the Slurm jobs did not finish"
        time.sleep(1)
    results = prepare(load_data_config(config), progress=False, log=lines.append)
    assert all(r.get("complete") and r.get("skipped") for r in results), lines
    assert (out / "mixture.json").is_file()
    for s in ("code", "stories"):
        assert source_output(out / s) == one[s], s
        assert json.loads((out / s / "meta.json").read_text())["tasks"] == 2


def test_bad_input_files_are_named_and_the_rest_is_kept(tmp_path, meta_tokenizer_path):
    """Truncated XML, a truncated JSON line and binary / invalid UTF-8 files spread over
    several tasks: each is reported by name in meta.json, everything else is prepared, the
    same as with one task."""
    qa = tmp_path / "qa"
    for site in ("a", "b", "c"):
        (qa / site).mkdir(parents=True)
        rows = "".join(
            f'<row Id="{i}" PostTypeId="1" Score="{i}" Title="Question {i} on {site}" '
            f'Body="&lt;p&gt;How does the {site} river flow in winter, number {i}?&lt;/p&gt;" />'
            f'<row Id="{100 + i}" PostTypeId="2" ParentId="{i}" Score="1" '
            f'Body="&lt;p&gt;It flows slowly under the ice, answer {i}.&lt;/p&gt;" />'
            for i in range(1, 6)
        )
        xml = f'<?xml version="1.0" encoding="utf-8"?>\n<posts>{rows}</posts>\n'
        (qa / site / "Posts.xml").write_text(xml if site != "b" else xml[: len(xml) // 2])
    docs = tmp_path / "docs"
    docs.mkdir()
    good = [json.dumps({"text": f"Document {i} about the quiet harbor."}) for i in range(30)]
    (docs / "a.jsonl").write_text("\n".join(good) + "\n")
    (docs / "b.jsonl").write_text("\n".join(good[:5]) + '\n{"text": "cut off in the mid')
    (docs / "c.txt").write_bytes(b"\x00\x01binary")
    (docs / "d.txt").write_bytes(b"caf\xe9 latin-1, not UTF-8")
    (docs / "e.txt").write_text("A last plain document about a bridge.")
    outputs = {}
    for name, executor in (("one", "[executor]\ntasks = 1"), ("three", "[executor]\ntasks = 3")):
        config = tmp_path / f"{name}.toml"
        config.write_text(f"""
tokenizer = "{meta_tokenizer_path}"
output = "{tmp_path / name}"
val_fraction = 0.2
[[sources]]
name = "qa"
kind = "stackexchange"
paths = ["{qa}/*/Posts.xml"]
[[sources]]
name = "docs"
kind = "generic"
paths = ["{docs}"]
{executor}
""")
        results = prepare(load_data_config(config), progress=False, log=_quiet)
        assert all(r["complete"] for r in results), results
        outputs[name] = {s: source_output(tmp_path / name / s) for s in ("qa", "docs")}
        errors = {
            s: " | ".join(
                json.loads((tmp_path / name / s / "meta.json").read_text())["clean"]["errors"]
            )
            for s in ("qa", "docs")
        }
        assert str(qa / "b" / "Posts.xml") in errors["qa"] and "malformed XML" in errors["qa"]
        assert f"{docs / 'b.jsonl'}:6: malformed JSON" in errors["docs"]
        assert str(docs / "c.txt") in errors["docs"] and "binary" in errors["docs"]
        assert str(docs / "d.txt") in errors["docs"] and "invalid UTF-8" in errors["docs"]
    assert outputs["three"] == outputs["one"]
    assert outputs["one"]["qa"]["train"][0] + outputs["one"]["qa"]["val"][0] == 10
    assert outputs["one"]["docs"]["train"][0] + outputs["one"]["docs"]["val"][0] == 36


# ----------------------------------------------------------------------------- every kind


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _kind_inputs(root: Path, kind: str) -> tuple[list[str], dict]:
    """A few files (units) of source kind ``kind`` under ``root``: its paths and options."""
    rng = random.Random(11)
    if kind in ("web", "code", "books", "generic"):
        dirs = build_corpus(root)
        folder = {"generic": "stories"}.get(kind, kind)
        options = {
            "web": {"quality": "c4", "languages": [], "c4_min_sentences": 3},
            "books": {"min_words": 50},
        }.get(kind, {})
        return [str(dirs[folder])], options
    if kind == "stdlib_docs":  # a part of the real standard library, by the real kind
        return [str(stdlib_dir() / d) for d in ("json", "email", "http", "xml")], {}
    for i in range(5):
        if kind == "wikipedia":
            pages = "".join(
                f"<page><title>Page {i}.{j}</title><ns>0</ns><id>{10 * i + j}</id><revision>"
                f"<text>{_words(rng, 40)}.\n== Part ==\n{_words(rng, 30)}.</text></revision></page>"
                for j in range(3)
            )
            (root / f"wiki{i}.xml").parent.mkdir(parents=True, exist_ok=True)
            (root / f"wiki{i}.xml").write_text(f'<mediawiki xml:lang="en">{pages}</mediawiki>\n')
        elif kind == "arxiv":
            paper = root / f"paper{i}"
            paper.mkdir(parents=True)
            (paper / "main.tex").write_text(
                "\\documentclass{article}\n\\newcommand{\\R}{\\mathbb{R}}\n\\begin{document}\n"
                f"\\section{{Part {i}}}\n{_words(rng, 50)} in $\\R^{i}$.\n\\input{{more}}\n"
                "\\end{document}\n"
            )
            (paper / "more.tex").write_text(f"\\section{{More}}\n{_words(rng, 40)}.\n")
        elif kind == "stackexchange":
            site = root / f"site{i}"
            site.mkdir(parents=True)
            rows = "".join(
                f'<row Id="{q}" PostTypeId="1" Score="{q}" Title="{_words(rng, 5)}" '
                f'Body="&lt;p&gt;{_words(rng, 20)}?&lt;/p&gt;" />'
                f'<row Id="{100 + q}" PostTypeId="2" ParentId="{q}" Score="1" '
                f'Body="&lt;p&gt;{_words(rng, 15)}.&lt;/p&gt;" />'
                for q in range(1, 4)
            )
            (site / "Posts.xml").write_text(f'<?xml version="1.0"?>\n<posts>{rows}</posts>\n')
    return [str(root)], {"min_chars": 50} if kind == "arxiv" else {}


def _toml(value: dict) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items()) + " }"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_kind_gives_the_same_shards_with_1_2_and_4_tasks(kind, tmp_path, meta_tokenizer_path):
    """Each kind's units are split once over the tasks: 1, 2 and 4 tasks give the same
    documents, filter counts and token bytes of every split (shard files begin elsewhere)."""
    paths, options = _kind_inputs(tmp_path / "in", kind)
    outputs = {}
    for tasks in (1, 2, 4):
        out = tmp_path / f"tasks{tasks}"
        config = tmp_path / f"tasks{tasks}.toml"
        config.write_text(f"""
tokenizer = "{meta_tokenizer_path}"
output = "{out}"
val_fraction = 0.2
shard_tokens = 500
[[sources]]
name = "s"
kind = "{kind}"
paths = {json.dumps(paths)}
options = {_toml(options)}
[executor]
tasks = {tasks}
workers = 2
""")
        (result,) = prepare(load_data_config(config), progress=False, log=_quiet)
        assert result["complete"], result
        outputs[tasks] = source_output(out / "s")
        units = json.loads((out / "s" / "work" / "plan.json").read_text())["units"]
        assert len(units) >= 4  # every task of 4 has a unit to read
    assert outputs[1]["clean"]["documents_out"] >= 4
    assert outputs[2] == outputs[1], kind
    assert outputs[4] == outputs[1], kind


def test_the_stdlib_config_gives_the_same_shards_with_1_2_and_4_tasks(
    tmp_path, meta_tokenizer_path
):
    """configs/data/stdlib.toml as it is (its ``code`` source on ``@stdlib`` and its
    ``stdlib_docs`` source: this machine's whole standard library), Meta's tokenizer instead
    of training one: 1, 2 and 4 tasks give the same shards; the docs are read once, not once
    a task."""
    outputs = {}
    for tasks in (1, 2, 4):
        cfg = load_data_config(REPO / "configs" / "data" / "stdlib.toml")
        kinds = [(s.name, s.kind, s.paths) for s in cfg.sources]
        assert kinds == [("code", "code", ["@stdlib"]), ("docs", "stdlib_docs", [])]
        cfg.tokenizer, cfg.output = str(meta_tokenizer_path), str(tmp_path / f"tasks{tasks}")
        cfg.executor.tasks, cfg.executor.workers = tasks, 2
        results = prepare(cfg, progress=False, log=_quiet)
        assert all(r["complete"] for r in results), results
        outputs[tasks] = {s: source_output(Path(cfg.output) / s) for s in ("code", "docs")}
    topics = len(list(file_docs([topics_file()])))
    assert outputs[1]["docs"]["clean"]["documents_out"] > topics > 10
    assert outputs[2] == outputs[1]
    assert outputs[4] == outputs[1]


def test_stdlib_docs_default_paths_and_max_bytes(tmp_path, meta_tokenizer_path):
    """Without paths, stdlib_docs reads the topics module, then every other file of the
    standard library (each a unit for the tasks); ``max_bytes`` (a cap on the documents
    read so far) makes it one task, whatever ``tasks`` says."""
    from llamaforge.data.config import SourceConfig, source_paths
    from llamaforge.data.pipeline import make_job

    cfg = load_data_config(REPO / "configs" / "data" / "stdlib.toml")
    files = source_paths(cfg, SourceConfig(name="d", kind="stdlib_docs"))
    rest = [p for p in python_files(stdlib_dir()) if p != topics_file()]
    assert files == [topics_file(), *rest]
    cfg.executor.tasks = 3
    job = make_job(cfg, SourceConfig(name="d", kind="stdlib_docs"), str(meta_tokenizer_path))
    assert job.tasks == 3 and len(job.units) == len(files)
    capped = SourceConfig(name="d", kind="stdlib_docs", options={"max_bytes": 20_000})
    assert make_job(cfg, capped, str(meta_tokenizer_path)).tasks == 1
