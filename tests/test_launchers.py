"""Launchers with fake execute functions: every spec runs exactly once, callbacks fire per run, a
dying worker becomes a failed record instead of a hang, workers are pinned and thread-limited,
signals stop the children, and an unusable Slurm is reported before anything is submitted.

The fakes are top-level functions of this module because the ``local`` launcher pickles them
into spawned worker processes (which import ``tests.test_launchers``).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from petlbench.errors import PetlbenchError
from petlbench.launch import LaunchOptions, launch, local, plan_local_slots, slurm
from petlbench.launch.common import each
from petlbench.records import write_record
from petlbench.runspec import RunSpec

REPO = Path(__file__).resolve().parents[1]


def make_spec(output: str | Path, seed: int = 0, task: str = "digits") -> RunSpec:
    return RunSpec(suite="demo", task=task, method="linear", seed=seed, protocol="vtab1k", backbone="micro",
                   method_hparams={}, train={"epochs": 1}, output=str(output))


def fake_ok(spec: RunSpec) -> dict[str, Any]:
    """Stands in for the engine: writes an ok record and reports where and how it ran."""
    import torch

    record = {
        "run_id": spec.run_id, "suite": spec.suite, "task": spec.task, "method": spec.method,
        "seed": spec.seed, "status": "ok", "error": None, "metrics": {"top1": 50.0},
        "pid": os.getpid(),
        "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
    }
    write_record(spec.record_path, record)
    return record


def fake_crashy(spec: RunSpec) -> dict[str, Any]:
    """seed 1 exits hard mid-run, seed 2 is SIGKILLed (what the OOM killer does); others succeed."""
    if spec.seed == 1:
        os._exit(3)
    if spec.seed == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return fake_ok(spec)


def fake_raises(spec: RunSpec) -> dict[str, Any]:
    raise ValueError(f"bad hyperparameter for {spec.label}")


def fake_sleeps(spec: RunSpec) -> dict[str, Any]:
    """Announces its pid, then runs 'forever' (an hour: until a signal stops it)."""
    pids = Path(spec.output) / "pids"
    pids.mkdir(parents=True, exist_ok=True)
    (pids / str(os.getpid())).touch()
    time.sleep(3600)
    return fake_ok(spec)


class Calls:
    def __init__(self) -> None:
        self.started: list[str] = []
        self.done: list[tuple[str, str]] = []

    def on_start(self, spec: RunSpec) -> None:
        self.started.append(spec.run_id)

    def on_done(self, spec: RunSpec, record: dict[str, Any]) -> None:
        assert spec.run_id in self.started, "on_done before on_start"
        self.done.append((spec.run_id, record["status"]))


def read(spec: RunSpec) -> dict[str, Any]:
    return json.loads(spec.record_path.read_text())


# --------------------------------------------------------------------------------------------
# inline


def test_inline_runs_each_spec_once_in_order(tmp_path: Path) -> None:
    specs = [make_spec(tmp_path, seed=s) for s in range(3)]
    calls = Calls()
    records = launch(specs, "inline", execute=fake_ok, on_start=calls.on_start, on_done=calls.on_done)
    assert [r["run_id"] for r in records] == [s.run_id for s in specs]
    assert calls.started == [s.run_id for s in specs]
    assert calls.done == [(s.run_id, "ok") for s in specs]
    assert {r["pid"] for r in records} == {os.getpid()}


def test_inline_exception_becomes_failed_record(tmp_path: Path) -> None:
    specs = [make_spec(tmp_path, seed=s) for s in range(2)]
    records = launch(specs, "inline", execute=fake_raises)
    assert [r["status"] for r in records] == ["failed", "failed"]
    on_disk = read(specs[0])
    assert on_disk["status"] == "failed" and on_disk["run_id"] == specs[0].run_id
    assert on_disk["error"]["type"] == "ValueError" and "bad hyperparameter" in on_disk["error"]["message"]
    for key in ("suite", "task", "method", "seed"):
        assert on_disk[key] == getattr(specs[0], key)


def test_empty_sweep_and_bad_names(tmp_path: Path) -> None:
    assert launch([], "local") == []
    assert launch([], "slurm") == []  # nothing to run needs no cluster
    with pytest.raises(PetlbenchError, match="unknown launcher 'locl'.*'local'"):
        launch([make_spec(tmp_path)], "locl")
    with pytest.raises(PetlbenchError, match="workers"):
        launch([make_spec(tmp_path)], "local", LaunchOptions(workers=0))


# --------------------------------------------------------------------------------------------
# local


def test_plan_local_slots_cpu_and_gpu() -> None:
    # CPU: half the cores as workers, the cores shared out as torch threads; never more than runs.
    slots = plan_local_slots(LaunchOptions(), n_runs=10, gpus=[], cpus=2)
    assert [(s.name, s.threads) for s in slots] == [("cpu0", 2)]
    slots = plan_local_slots(LaunchOptions(), n_runs=10, gpus=[], cpus=16)
    assert len(slots) == 8 and {s.threads for s in slots} == {2}
    assert slots[0].env["OMP_NUM_THREADS"] == "2" and slots[0].env["CUDA_VISIBLE_DEVICES"] == ""
    slots = plan_local_slots(LaunchOptions(workers=3), n_runs=10, gpus=[], cpus=12)
    assert len(slots) == 3 and {s.threads for s in slots} == {4}
    assert len(plan_local_slots(LaunchOptions(workers=4), n_runs=1, gpus=[], cpus=8)) == 1
    slots = plan_local_slots(LaunchOptions(workers=4, threads_per_worker=1), n_runs=9, gpus=[], cpus=8)
    assert {s.threads for s in slots} == {1}
    # GPUs: one worker per GPU, pinned by CUDA_VISIBLE_DEVICES; workers caps how many are used.
    slots = plan_local_slots(LaunchOptions(), n_runs=10, gpus=[0, 1, 2, 3], cpus=16)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1", "2", "3"]
    assert {s.threads for s in slots} == {4}
    slots = plan_local_slots(LaunchOptions(workers=2), n_runs=10, gpus=[4, 6, 7], cpus=16)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["4", "6"]
    # --device cpu ignores GPUs; --device cuda without one is a user error.
    assert plan_local_slots(LaunchOptions(device="cpu", gpus=[0, 1]), n_runs=4, cpus=4)[0].name == "cpu0"
    with pytest.raises(PetlbenchError, match="no GPU"):
        plan_local_slots(LaunchOptions(device="cuda"), n_runs=1, gpus=[], cpus=2)


def test_local_cuda_index_pins_that_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """--device cuda:N with the local launcher runs on the N-th visible GPU (the worker then sees
    it as its only device), instead of asking the pinned worker for a device it cannot see."""
    monkeypatch.setattr(local, "detect_gpus", lambda: [2, 5, 7])
    slots = plan_local_slots(LaunchOptions(device="cuda:1"), n_runs=4, cpus=8)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["5"]
    with pytest.raises(PetlbenchError, match=r"--device cuda:3: only 3 GPU\(s\) are visible"):
        plan_local_slots(LaunchOptions(device="cuda:3"), n_runs=1, cpus=8)
    with pytest.raises(PetlbenchError, match="not cuda:<index>"):
        plan_local_slots(LaunchOptions(device="cuda:x"), n_runs=1, cpus=8)
    with pytest.raises(PetlbenchError, match="not cuda:<index>"):  # any launcher, before anything runs
        launch([], "inline", LaunchOptions(device="cuda:x"))


def test_detect_gpus_honours_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(local, "nvidia_smi_devices", lambda: None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert local.detect_gpus() == ["5", "7"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7,x,3")  # CUDA stops at the first entry naming no device
    assert local.detect_gpus() == ["5", "7"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert local.detect_gpus() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert local.detect_gpus() == ["0", "1"]


GPU_UUIDS = ["GPU-5c89852c-d268-c3f3-1b07-005d5ae1dc3f", "GPU-0a1b2c3d-aaaa-bbbb-cccc-1234567890ab"]
MIG_IDS = ["MIG-c7384736-a75d-5afc-978f-d2f1294409fd", "MIG-a2b8a4a1-54ab-5a4e-9f1b-83d5c7c4bb2e"]


def test_uuid_and_mig_visible_devices_pin_those_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's CUDA_VISIBLE_DEVICES replaces the parent's: index 0 would be physical GPU 0, not
    the UUID the user named. Workers get the UUIDs themselves, and one worker per MIG instance
    (CUDA shows a process at most one, so device_count says 1 however many are listed)."""
    import torch

    monkeypatch.setattr(local, "nvidia_smi_devices", lambda: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(GPU_UUIDS))
    slots = plan_local_slots(LaunchOptions(), n_runs=4, cpus=8)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == GPU_UUIDS
    slots = plan_local_slots(LaunchOptions(device="cuda:1"), n_runs=4, cpus=8)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == GPU_UUIDS[1:]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(MIG_IDS))
    slots = plan_local_slots(LaunchOptions(), n_runs=4, cpus=8)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == MIG_IDS
    assert [s.name for s in slots] == MIG_IDS


def test_mig_instances_found_by_nvidia_smi(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without CUDA_VISIBLE_DEVICES, a GPU split into MIG instances is used instance by instance."""
    import torch

    fake = tmp_path / "nvidia-smi"
    fake.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "GPU 0: NVIDIA A100-SXM4-40GB (UUID: {GPU_UUIDS[0]})"
        echo "  MIG 3g.20gb     Device  0: (UUID: {MIG_IDS[0]})"
        echo "  MIG 3g.20gb     Device  1: (UUID: {MIG_IDS[1]})"
        echo "GPU 1: NVIDIA A100-SXM4-40GB (UUID: {GPU_UUIDS[1]})"
        """))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert local.nvidia_smi_devices() == [*MIG_IDS, "1"]
    assert local.detect_gpus() == [*MIG_IDS, "1"]


def test_gpu_workers_number_gpus_like_nvidia_smi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    slots = plan_local_slots(LaunchOptions(gpus=[3, 1]), n_runs=2, cpus=4)
    assert [(s.env["CUDA_VISIBLE_DEVICES"], s.env["CUDA_DEVICE_ORDER"]) for s in slots] == [
        ("3", "PCI_BUS_ID"), ("1", "PCI_BUS_ID")]
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")  # the user's explicit choice stands
    assert plan_local_slots(LaunchOptions(gpus=[3]), n_runs=1, cpus=4)[0].env["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"


def test_slurm_jobs_never_get_a_local_gpu_index() -> None:
    """A single-GPU Slurm job sees its GPU as cuda:0: cuda:N of the submitting machine means nothing there."""
    from petlbench.launch import worker_device

    assert worker_device("slurm", LaunchOptions(device="cuda:3")) == "cuda"
    assert worker_device("slurm", LaunchOptions(device="cuda")) == "cuda"
    assert worker_device("slurm", LaunchOptions(device="cuda:1", slurm_gpus_per_task=2)) == "cuda:1"
    with pytest.raises(PetlbenchError, match="each Slurm job has 2 GPU"):
        worker_device("slurm", LaunchOptions(device="cuda:2", slurm_gpus_per_task=2))
    with pytest.raises(PetlbenchError, match="get no GPU"):
        worker_device("slurm", LaunchOptions(device="cuda", slurm_gpus_per_task=0))
    with pytest.raises(PetlbenchError, match="get no GPU"):  # before anything is submitted
        launch([make_spec("unused")], "slurm", LaunchOptions(device="cuda:0", slurm_gpus_per_task=0))
    assert worker_device("slurm", LaunchOptions(device="auto", slurm_gpus_per_task=0)) == "auto"
    assert worker_device("local", LaunchOptions(device="cuda:1")) == "cuda"
    assert worker_device("inline", LaunchOptions(device="cuda:1")) == "cuda:1"


def test_local_cpu_workers_run_each_spec_once(tmp_path: Path) -> None:
    specs = [make_spec(tmp_path, seed=s) for s in range(5)]
    calls = Calls()
    records = launch(specs, "local", LaunchOptions(workers=2, gpus=[]), execute=fake_ok,
                     on_start=calls.on_start, on_done=calls.on_done)
    assert [r["run_id"] for r in records] == [s.run_id for s in specs]  # spec order, whatever finished first
    assert sorted(calls.started) == sorted(s.run_id for s in specs)
    assert sorted(calls.done) == sorted((s.run_id, "ok") for s in specs)
    pids = {r["pid"] for r in records}
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes, not this one
    cpus = local.usable_cpus()
    threads = max(1, cpus // 2)
    assert {r["omp_threads"] for r in records} == {str(threads)}
    assert {r["torch_threads"] for r in records} == {threads}
    assert {r["cuda_visible"] for r in records} == {""}  # CPU workers do not see GPUs
    assert all(read(s)["status"] == "ok" for s in specs)


def test_local_pins_one_worker_per_gpu(tmp_path: Path) -> None:
    specs = [make_spec(tmp_path, seed=s) for s in range(3)]
    records = launch(specs, "local", LaunchOptions(gpus=[3, 5]), execute=fake_ok)
    by_pid: dict[int, set[str]] = {}
    for r in records:
        by_pid.setdefault(r["pid"], set()).add(r["cuda_visible"])
    # Each process saw exactly one device, and together they covered both.
    assert all(len(v) == 1 for v in by_pid.values())
    assert set().union(*by_pid.values()) == {"3", "5"}


def test_local_worker_death_fails_that_run_only(tmp_path: Path) -> None:
    specs = [make_spec(tmp_path, seed=s) for s in range(5)]
    calls = Calls()
    records = launch(specs, "local", LaunchOptions(workers=2, gpus=[]), execute=fake_crashy,
                     on_start=calls.on_start, on_done=calls.on_done)
    assert [r["status"] for r in records] == ["ok", "failed", "failed", "ok", "ok"]
    assert sorted(calls.done) == sorted((r["run_id"], r["status"]) for r in records)
    exited, killed = records[1], records[2]
    assert exited["error"]["type"] == "WorkerDied" and "exited with code 3" in exited["error"]["message"]
    assert "SIGKILL" in killed["error"]["message"] and "OOM" in killed["error"]["message"]
    for spec, status in zip(specs, ["ok", "failed", "failed", "ok", "ok"], strict=True):
        on_disk = read(spec)  # the launcher wrote the failed records itself
        assert on_disk["status"] == status and on_disk["run_id"] == spec.run_id


def test_local_worker_exception_is_a_failed_record(tmp_path: Path) -> None:
    specs = [make_spec(tmp_path, seed=0)]
    (record,) = launch(specs, "local", LaunchOptions(workers=1, gpus=[]), execute=fake_raises)
    assert record["status"] == "failed" and record["error"]["type"] == "ValueError"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_parent_stops_workers(tmp_path: Path, sig: signal.Signals) -> None:
    script = tmp_path / "sweep.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from petlbench.launch import LaunchOptions, launch
        from tests.test_launchers import fake_sleeps, make_spec

        if __name__ == "__main__":
            specs = [make_spec({str(tmp_path)!r}, seed=s) for s in range(3)]
            launch(specs, "local", LaunchOptions(workers=1, gpus=[]), execute=fake_sleeps)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pids_dir = tmp_path / "pids"
    deadline = time.monotonic() + 60
    while not (pids_dir.exists() and any(pids_dir.iterdir())):
        assert parent.poll() is None, parent.communicate()
        assert time.monotonic() < deadline, "worker never started"
        time.sleep(0.1)
    (child,) = [int(p.name) for p in pids_dir.iterdir()]
    assert _alive(child)
    parent.send_signal(sig)
    try:
        # No speed is asserted: a parent that waited for its worker's run would take the hour
        # fake_sleeps sleeps; this bound only keeps such a failure from hanging the test suite.
        parent.communicate(timeout=600)
    finally:
        for pid in (parent.pid, child):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert parent.returncode != 0
    assert not _alive(child), "the worker outlived the parent"
    assert len(list(pids_dir.iterdir())) == 1  # no further run was started
    stopped = make_spec(tmp_path, seed=0)  # the run that was sleeping: stopped, never finished
    assert not stopped.record_path.exists() or read(stopped)["status"] != "ok"


# --------------------------------------------------------------------------------------------
# slurm, without a cluster


def _fake_tools(folder: Path, **scripts: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        path = folder / name
        path.write_text("#!/bin/sh\n" + body + "\n")
        path.chmod(0o755)
    return folder


def test_slurm_without_sbatch_fails_before_submitting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(_fake_tools(tmp_path / "bin")))  # no Slurm tools at all
    with pytest.raises(PetlbenchError, match=r"no `sbatch` on PATH.*--launcher local"):
        launch([make_spec(tmp_path)], "slurm", LaunchOptions(slurm_gpus_per_task=0), execute=fake_ok)
    assert not (tmp_path / ".slurm").exists()


def test_slurm_controller_down_fails_before_submitting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "sbatch-called"
    down = "echo 'slurm_load_partitions: Unable to contact slurm controller (connect failure)' >&2; exit 1"
    bin_dir = _fake_tools(tmp_path / "bin", sbatch=f"touch {marker}; exit 1", squeue=down, sinfo=down, srun="exit 1")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(PetlbenchError) as info:
        launch([make_spec(tmp_path)], "slurm", LaunchOptions(slurm_gpus_per_task=0), execute=fake_ok)
    message = str(info.value)
    assert "Unable to contact slurm controller" in message and "--launcher local" in message
    assert "\n" not in message
    assert not marker.exists()


def test_slurm_unknown_partition(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = _fake_tools(tmp_path / "bin", sbatch="exit 1", squeue="exit 0", srun="exit 0",
                          sinfo="printf 'debug*\\ngpu\\n'")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert slurm.check_slurm(LaunchOptions(slurm_partition="gpu")) == ["debug", "gpu"]
    with pytest.raises(PetlbenchError, match="unknown Slurm partition 'gpuu'.*'gpu'"):
        slurm.check_slurm(LaunchOptions(slurm_partition="gpuu"))


def _sbatch_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: LaunchOptions) -> list[str]:
    pytest.importorskip("submitit")
    from submitit.slurm.slurm import _make_sbatch_string

    bin_dir = _fake_tools(tmp_path / "bin", srun="exit 0")  # submitit's SlurmExecutor wants srun on PATH
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    executor = slurm.make_slurm_executor(tmp_path / "slurm", options)
    params = dict(executor._executor.parameters)
    text = _make_sbatch_string(command="python -m x", folder=executor._executor.folder, map_count=20, **params)
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


def test_sbatch_parameters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    options = LaunchOptions(slurm_partition="gpu", slurm_time_min=90, slurm_account="proj42", slurm_qos="high",
                            slurm_array_parallelism=8, slurm_gpus_per_task=2, slurm_mem_gb=16, slurm_cpus_per_task=6,
                            slurm_parameters={"constraint": "a100"})
    lines = _sbatch_lines(tmp_path, monkeypatch, options)
    for expected in ("--partition=gpu", "--time=90", "--account=proj42", "--qos=high", "--array=0-19%8",
                     "--gpus-per-node=2", "--mem=16GB", "--cpus-per-task=6", "--constraint=a100",
                     "--job-name=petlbench", "--nodes=1", "--ntasks-per-node=1"):
        assert f"#SBATCH {expected}" in lines, (expected, lines)


def test_sbatch_cpu_cluster_sends_no_gpu_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = _sbatch_lines(tmp_path, monkeypatch, LaunchOptions(slurm_gpus_per_task=0))
    assert not any("gpu" in line or "gres" in line for line in lines), lines
    assert not any("--partition" in line or "--account" in line or "--qos" in line for line in lines)
    assert "#SBATCH --time=240" in lines and "#SBATCH --array=0-19%20" in lines


def test_slurm_run_is_checkpointable_and_requeues_same_spec(tmp_path: Path) -> None:
    submitit = pytest.importorskip("submitit")
    import pickle

    spec = make_spec(tmp_path)
    run = slurm.SlurmRun(functools.partial(each, fake_ok))  # one array task runs one pack (here of one)
    assert isinstance(run, submitit.helpers.Checkpointable)
    delayed = run.checkpoint([spec.to_dict()])
    assert delayed.function is run and delayed.args == ([spec.to_dict()],)
    clone = pickle.loads(pickle.dumps(run))
    records = clone([spec.to_dict()])
    assert [r["status"] for r in records] == ["ok"] and read(spec)["run_id"] == spec.run_id
