"""Wait for a submitted (Slurm) sweep: poll every stage's state until none is pending or running,
printing each change."""
from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from mocobench.slurm import status


def wait_slurm(root: Path, poll: float, timeout: float | None) -> list[status.StageStatus]:
    """Poll until no stage is pending or running; print each state change; TimeoutError after `timeout` s."""
    seen: dict[str, str] = {}
    start = time.monotonic()
    rows = status.collect(root)
    bar = tqdm(total=len(rows), desc="stages", unit="stage", disable=None)
    while True:
        rows = status.collect(root)
        for r in rows:
            if seen.get(r.id) != r.state:
                if r.id in seen or r.state not in ("done",):
                    bar.write(f"[{time.strftime('%H:%M:%S')}] {r.id}: {r.state}"
                              + (f" (job {r.job_id})" if r.job_id else ""))
                seen[r.id] = r.state
        bar.n = sum(not r.active for r in rows)
        bar.refresh()
        if not any(r.active for r in rows):
            break
        if timeout is not None and time.monotonic() - start > timeout:
            bar.close()
            raise TimeoutError(f"sweep {root} still has active stages after {timeout:.0f}s")
        time.sleep(poll)
    bar.close()
    return rows
