"""Ask the scheduler what became of a job: Slurm (sacct, else squeue + scontrol) or a local submitit
job (its process and result pickle). States are normalised to
pending | running | completed | failed | cancelled | timeout | unknown, with the scheduler's own word kept.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ACTIVE_SLURM = {"PENDING": "pending", "REQUEUED": "pending", "REQUEUE_HOLD": "pending", "REQUEUE_FED": "pending",
                "RESV_DEL_HOLD": "pending", "CONFIGURING": "running", "RUNNING": "running",
                "COMPLETING": "running", "SUSPENDED": "running", "RESIZING": "running", "SIGNALING": "running",
                "STAGE_OUT": "running"}
FINAL_SLURM = {"COMPLETED": "completed", "CANCELLED": "cancelled", "TIMEOUT": "timeout", "DEADLINE": "timeout",
               "FAILED": "failed", "OUT_OF_MEMORY": "failed", "NODE_FAIL": "failed", "BOOT_FAIL": "failed",
               "PREEMPTED": "failed", "REVOKED": "cancelled"}
ACTIVE = ("pending", "running")


@dataclass
class JobState:
    job_id: str
    state: str           # normalised (see module docstring)
    raw: str = ""        # the scheduler's word, e.g. "CANCELLED by 0", "OUT_OF_MEMORY"
    reason: str = ""     # e.g. "DependencyNeverSatisfied", "exit 1:0"

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def _normalise(raw: str) -> str:
    word = raw.split()[0].rstrip("+") if raw.strip() else ""
    return ACTIVE_SLURM.get(word) or FINAL_SLURM.get(word) or "unknown"


def _expand(job_id: str) -> list[str]:
    """`12_[0-2,5]` (a pending array) -> 12_0, 12_1, 12_2, 12_5; other ids unchanged."""
    if "_[" not in job_id:
        return [job_id]
    base, ranges = job_id.split("_[", 1)
    out = []
    for part in ranges.rstrip("]").split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        out += [f"{base}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def _run(cmd: list[str], timeout: float = 30) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def slurm_states(job_ids: list[str]) -> dict[str, JobState]:
    """States of Slurm jobs (ids like `12` or array tasks `12_3`) in one sacct call; jobs sacct cannot see
    (no accounting) are asked of squeue (queued/running) and scontrol (recently finished)."""
    ids = sorted({str(j) for j in job_ids})
    if not ids:
        return {}
    found: dict[str, JobState] = {}
    bases = sorted({j.split("_")[0] for j in ids})
    out = _run(["sacct", "-X", "-P", "-n", "-o", "JobID,State,ExitCode", "-j", ",".join(bases)])
    ranged: dict[str, JobState] = {}  # `12_[3-5]`: array tasks that have not started on their own yet
    for line in (out or "").splitlines():
        parts = line.split("|")
        if len(parts) < 3:
            continue
        jid, raw, code = parts[:3]
        reason = f"exit {code}" if code not in ("0:0", "") else ""
        for one in _expand(jid):
            (ranged if "[" in jid else found)[one] = JobState(one, _normalise(raw), raw, reason)
    for one, js in ranged.items():
        found.setdefault(one, js)
    missing = [j for j in ids if j not in found]
    if missing:
        out = _run(["squeue", "-h", "-r", "-o", "%i|%T|%r", "-j", ",".join(sorted({j.split('_')[0] for j in missing}))])
        for line in (out or "").splitlines():
            jid, raw, reason = (line.split("|") + ["", ""])[:3]
            found.setdefault(jid, JobState(jid, _normalise(raw), raw, reason if reason != "None" else ""))
    for jid in [j for j in ids if j not in found]:
        out = _run(["scontrol", "show", "job", "-o", jid])
        fields = dict(kv.split("=", 1) for kv in (out or "").split() if "=" in kv)
        if fields.get("JobState"):
            reason = fields.get("Reason", "None")
            found[jid] = JobState(jid, _normalise(fields["JobState"]), fields["JobState"],
                                  reason if reason != "None" else "")
        else:
            found[jid] = JobState(jid, "unknown", "", "not known to sacct, squeue or scontrol")
    return {j: found[j] for j in ids}


def slurm_responds(timeout: float = 10) -> bool:
    """True when `sinfo` reaches a controller and at least one node can run jobs."""
    if shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and any(s.startswith(("idle", "mixed", "alloc")) for s in out.stdout.split())


def _pid_is_submitit(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z" and b"submitit" in cmdline


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def stop_local_job(job, grace_s: float = 3.0) -> None:
    """Stop a local submitit job: SIGINT to its controller (which stops its tasks), then SIGKILL to the
    controller and every process below it if they are still there (SIGINT is ignored in processes
    started in the background, and the tasks ignore SIGTERM by design)."""
    import signal
    import time
    process = getattr(job, "_process", None)
    if process is None or process.poll() is not None:
        return
    tree = _descendants(process.pid)
    process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace_s
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in [*tree, process.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    process.poll()


def result_outcome(result_pickle: str | Path) -> str | None:
    """'success' / 'error' from a submitit result pickle, None when there is none (yet)."""
    if not result_pickle or not Path(result_pickle).is_file():
        return None
    path = Path(result_pickle)
    try:
        import cloudpickle  # submitit's own pickler; our own job folders only
        with open(path, "rb") as f:
            outcome = cloudpickle.load(f)[0]
    except Exception:  # noqa: BLE001 - half-written or foreign: no verdict
        return None
    return str(outcome)


def local_state(job_id: str, result_pickle: str | Path) -> JobState:
    """A local submitit job: its controller process (pid = job id) and result pickle."""
    outcome = result_outcome(result_pickle)
    if outcome == "success":
        return JobState(job_id, "completed", "success")
    if outcome == "error":
        return JobState(job_id, "failed", "error", "the stage raised an exception")
    if job_id.isdigit() and _pid_is_submitit(int(job_id)):
        return JobState(job_id, "running", "running")
    return JobState(job_id, "failed", "no result", "the job process ended without a result")


def tail(path: str | Path | None, lines: int = 15) -> str:
    """The last `lines` lines of a log file ('' when it does not exist)."""
    if not path or not Path(path).exists():
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 64 * 1024))
        text = f.read().decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


SRUN_TASK_ERROR = re.compile(r"^srun: error: (\S+): tasks? ([\d,\-]+): (.+)$")


def first_task_failure(path: str | Path | None) -> str:
    """In a multi-task job's log, srun's report of the first task that ended badly, as
    'task 1 on node-2: Killed' ('' when there is none). The tasks after it fail because their peer is gone
    or because srun stops them (--kill-on-bad-exit), so the first one is the cause."""
    if not path or not Path(path).exists():
        return ""
    for line in _tail_bytes(Path(path), TASK_ERROR_WINDOW).splitlines():
        m = SRUN_TASK_ERROR.match(line.strip())
        if m:
            node, tasks, what = m.groups()
            return f"task{'s' if not tasks.isdigit() else ''} {tasks} on {node}: {what}"
    return ""


TASK_ERROR_WINDOW = 1 << 20  # srun reports task ends as the job ends: the last MiB of a long log holds them


def _tail_bytes(path: Path, size: int) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, 2) - size))
        return f.read().decode(errors="replace")
