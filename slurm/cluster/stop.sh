#!/usr/bin/env bash
# Stop the throw-away Slurm started by start.sh: cancel its jobs, then kill exactly the daemons whose
# pids start.sh recorded (checked against their program name), newest first. Idempotent.
#
#   slurm/cluster/stop.sh            # keep $STATE (job ids keep counting up on the next start)
#   slurm/cluster/stop.sh --purge    # also delete $STATE (next start begins at job id 1 again)
#
# Environment: MOCOBENCH_SLURM_DIR (default /tmp/mocobench-slurm), as for start.sh.
set -uo pipefail

STATE=${MOCOBENCH_SLURM_DIR:-/tmp/mocobench-slurm}
MARKER="# mocobench-throwaway-slurm"
log() { echo "[slurm-stop] $*" >&2; }

pid_of() {  # pid recorded as $1 (slurmctld, slurmd-NODE, ...) if alive and still that program, else nothing
    local f=$STATE/pids/$1.pid
    [[ -f $f ]] || return 0
    local pid; pid=$(cat "$f")
    if [[ -r /proc/$pid/comm && $(cat "/proc/$pid/comm") == "${1%%-*}"* ]]; then echo "$pid"; fi
}

# Cancel the jobs of our cluster so that no slurmstepd outlives slurmd (all jobs here are ours).
if [[ -n $(pid_of slurmctld) ]]; then
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u)
    if [[ -n $jobs ]]; then
        log "cancelling jobs: $(echo $jobs)"
        scancel $jobs 2>/dev/null
        for _ in $(seq 50); do [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break; sleep 0.2; done
    fi
fi

# Two waves (Slurm daemons, then what they talk to); SIGTERM each wave together, SIGKILL stragglers.
stop_wave() {
    local -A pids=()
    local name pid
    for name in "$@"; do
        pid=$(pid_of "$name")
        if [[ -n $pid ]]; then kill -TERM "$pid"; pids[$name]=$pid; fi
        rm -f "$STATE/pids/$name.pid"
    done
    for name in "${!pids[@]}"; do
        pid=${pids[$name]}
        for _ in $(seq 150); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
        if [[ -d /proc/$pid ]]; then log "$name ($pid) ignored SIGTERM; SIGKILL"; kill -KILL "$pid"; fi
        log "stopped $name (pid $pid)"
    done
}
slurmds=()  # one slurmd per node: pids/slurmd-NODE.pid (not slurmdbd.pid: the database goes in the second wave)
for f in "$STATE"/pids/slurmd-*.pid "$STATE"/pids/slurmd.pid; do [[ -e $f ]] && slurmds+=("$(basename "$f" .pid)"); done
stop_wave "${slurmds[@]}" slurmctld
stop_wave slurmdbd mariadbd munged

for conf in /etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf; do
    if [[ -f $conf ]] && grep -q "^$MARKER" "$conf"; then rm -f "$conf"; fi
done
if [[ ${1:-} == --purge ]]; then
    rm -rf "$STATE"
    log "purged $STATE"
fi
exit 0
