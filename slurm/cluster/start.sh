#!/usr/bin/env bash
# Start a throw-away Slurm cluster on loopback, for tests and the local demo: N compute nodes on this one
# host (one slurmd per node, each with its own NodeName and port; Slurm's multiple-slurmd mode).
#
#   slurm/cluster/start.sh            # idempotent: does nothing if our cluster is already up
#
# Daemons: munged (as user munge, private socket), MariaDB on 127.0.0.1 + slurmdbd (accounting, so
# `sacct` works and submitit can see a job's final state), slurmctld, one slurmd per node. No systemd is needed:
# each daemon runs in the foreground under setsid and its pid is recorded in $STATE/pids/; stop.sh
# kills exactly those pids. State (job-id counter, accounting DB) lives in $STATE and survives
# stop/start, so job ids keep counting up and a reused submitit folder never sees a recycled id.
#
# Environment:
#   MOCOBENCH_SLURM_DIR         state dir (default /tmp/mocobench-slurm)
#   MOCOBENCH_SLURM_ACCOUNTING  1 (default): slurmdbd + MariaDB; 0: no accounting (sacct fails)
#   MOCOBENCH_SLURM_DB_PORT     MariaDB TCP port on 127.0.0.1 (default 3307)
#   MOCOBENCH_SLURM_NODES       compute nodes (default 2). One node is named after the host (`hostname -s`);
#                               N > 1 are HOST-1 .. HOST-N, all at 127.0.0.1, slurmd ports 6831 .. Jobs
#                               find a node's address with `scontrol show node` (slurm/rendezvous.py), since
#                               the names HOST-i resolve nowhere.
#   MOCOBENCH_SLURM_CPUS        CPUs each node advertises (default: max(detected, 4) / nodes, at least 1:
#                               test jobs mostly wait on imports and I/O, so 2x oversubscription lets the
#                               test sweeps overlap; set it to `nproc` for a faithful single node)
# Needs root and Debian packages (installed with apt-get when missing). Exit codes: 0 up,
# 3 not root, 4 packages unavailable, 5 a foreign slurm.conf exists, 6 a daemon failed to start,
# 7 a running cluster has another node set (stop.sh first), 2 bad MOCOBENCH_SLURM_NODES.
set -euo pipefail

STATE=${MOCOBENCH_SLURM_DIR:-/tmp/mocobench-slurm}
ACCOUNTING=${MOCOBENCH_SLURM_ACCOUNTING:-1}
DB_PORT=${MOCOBENCH_SLURM_DB_PORT:-3307}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
DBD_CONF=$CONF_DIR/slurmdbd.conf
MARKER="# mocobench-throwaway-slurm"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

log() { echo "[slurm-start] $*" >&2; }
die() { local code=$1; shift; log "ERROR: $*"; exit "$code"; }

# Is the daemon whose pid file is $1 alive and still the program named $2?
alive() {
    local f=$STATE/pids/$1.pid
    [[ -f $f ]] || return 1
    local pid; pid=$(cat "$f")
    [[ -r /proc/$pid/comm ]] && [[ $(cat "/proc/$pid/comm") == "$2"* ]]
}

NNODES=${MOCOBENCH_SLURM_NODES:-2}
[[ $NNODES =~ ^[1-9][0-9]*$ ]] || die 2 "MOCOBENCH_SLURM_NODES=$NNODES: expected a whole number >= 1"

node_state() { sinfo -h -N -n "$1" -o %T 2>/dev/null | head -1; }
node_up() { [[ "$(node_state "$1")" =~ ^(idle|mixed|allocated) ]]; }

# ---------------------------------------------------------------- already up?
# $STATE/nodes: one node name per line, as this script last configured them
if [[ -f $STATE/nodes ]] && alive slurmctld slurmctld; then
    mapfile -t NODES <"$STATE/nodes"
    up=1
    for n in "${NODES[@]}"; do alive "slurmd-$n" slurmd && node_up "$n" || up=0; done
    if (( up )) && (( ${#NODES[@]} == NNODES )); then
        log "already running (state dir $STATE, nodes ${NODES[*]})"
        exit 0
    fi
fi

[[ $(id -u) -eq 0 ]] || die 3 "must run as root to start daemons (uid $(id -u))"

# ---------------------------------------------------------------- packages
need=()
command -v slurmctld >/dev/null || need+=(slurmctld)
command -v slurmd >/dev/null || need+=(slurmd)
command -v sbatch >/dev/null || need+=(slurm-client)
command -v munged >/dev/null || need+=(munge)
if [[ $ACCOUNTING == 1 ]]; then
    command -v slurmdbd >/dev/null || need+=(slurmdbd)
    command -v mariadbd >/dev/null || need+=(mariadb-server)
fi
if (( ${#need[@]} )); then
    command -v apt-get >/dev/null || die 4 "missing ${need[*]} and no apt-get to install them"
    log "installing ${need[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"; } \
        >"/tmp/mocobench-slurm-apt.log" 2>&1 \
        || die 4 "apt-get install ${need[*]} failed; see /tmp/mocobench-slurm-apt.log"
fi

# ---------------------------------------------------------------- layout + config
if [[ -f $CONF ]] && ! grep -q "^$MARKER" "$CONF"; then
    die 5 "$CONF exists and was not written by this script; refusing to replace a real Slurm config"
fi
mkdir -p "$STATE"/{pids,log,ctld,spool,munge,mysql-run}
chown munge:munge "$STATE/munge"; chmod 755 "$STATE/munge"   # munged: socket dir must be o+x
HOST=$(hostname -s)
if (( NNODES == 1 )); then NODES=("$HOST"); else NODES=(); for i in $(seq "$NNODES"); do NODES+=("$HOST-$i"); done; fi
if alive slurmctld slurmctld && [[ "$(cat "$STATE/nodes" 2>/dev/null)" != "$(printf '%s\n' "${NODES[@]}")" ]]; then
    die 7 "the running cluster has other nodes ($(echo $(cat "$STATE/nodes" 2>/dev/null || echo unknown))); run stop.sh first to start ${NODES[*]}"
fi
MUNGE_SOCK=$STATE/munge/munge.socket.2

hw=$(slurmd -C | head -1)                   # NodeName=vm CPUs=2 Boards=1 ... RealMemory=24105
detected=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
total=$(( detected > 4 ? detected : 4 ))
cpus=${MOCOBENCH_SLURM_CPUS:-$(( total / NNODES > 1 ? total / NNODES : 1 ))}
hw="CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem"

mkdir -p "$CONF_DIR"
if [[ $ACCOUNTING == 1 ]]; then
    acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
AccountingStoragePass=$MUNGE_SOCK
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
    acct="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi
cat >"$CONF.tmp" <<CONF
$MARKER: written by slurm/cluster/start.sh (state in $STATE); stop.sh removes it.
ClusterName=mocobench
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/log/slurmctld.pidfile
SlurmdPidFile=$STATE/log/slurmd-%n.pidfile
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2
ReturnToService=2
MpiDefault=none
SlurmdParameters=config_overrides
MailProg=/bin/true
KillWait=10
MinJobAge=600
InactiveLimit=0
$acct
$(for i in "${!NODES[@]}"; do
    echo "NodeName=${NODES[$i]} NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((6831 + i)) $hw State=UNKNOWN"
done)
PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP
CONF
mv "$CONF.tmp" "$CONF"; chmod 644 "$CONF"
printf '%s\n' "${NODES[@]}" >"$STATE/nodes"

# Start "$@" detached in its own session, pid recorded as $1 (the program must stay in the foreground).
launch() {
    local name=$1; shift
    setsid "$@" >>"$STATE/log/$name.out" 2>&1 </dev/null &
    echo $! >"$STATE/pids/$name.pid"
}

# Poll "$@" until it succeeds; fail with the daemon's log tail after $2 seconds.
wait_for() {
    local name=$1 secs=$2; shift 2
    local t0=$SECONDS
    until "$@" >/dev/null 2>&1; do
        if (( SECONDS - t0 > secs )); then
            log "$name did not come up in ${secs}s; last log lines:"
            tail -n 20 "$STATE/log/$name"* >&2 || true
            exit 6
        fi
        sleep 0.3
    done
}

# ---------------------------------------------------------------- munge
if ! alive munged munged; then
    [[ -s /etc/munge/munge.key ]] || { mungekey -c -k /etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; }
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
    launch munged setpriv --reuid=munge --regid=munge --init-groups \
        munged -F --socket="$MUNGE_SOCK" --pid-file="$STATE/munge/munged.pid" \
        --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/munged.seed" --num-threads=10
fi
munge_ok() { munge -n -S "$MUNGE_SOCK" | unmunge -S "$MUNGE_SOCK"; }
wait_for munged 20 munge_ok

# ---------------------------------------------------------------- accounting: MariaDB + slurmdbd
if [[ $ACCOUNTING == 1 ]]; then
    DB_SOCK=$STATE/mysql-run/mysqld.sock
    if ! alive mariadbd mariadbd; then
        if [[ ! -d $STATE/mysql/mysql ]]; then
            log "initialising private MariaDB in $STATE/mysql"
            mariadb-install-db --user=root --datadir="$STATE/mysql" --skip-test-db \
                --auth-root-authentication-method=socket >"$STATE/log/mariadb-install.log" 2>&1 \
                || { tail -n 20 "$STATE/log/mariadb-install.log" >&2; die 6 "mariadb-install-db failed"; }
        fi
        launch mariadbd mariadbd --no-defaults --user=root --datadir="$STATE/mysql" --socket="$DB_SOCK" \
            --bind-address=127.0.0.1 --port="$DB_PORT" --pid-file="$STATE/mysql-run/mariadbd.pid" \
            --log-error="$STATE/log/mariadbd.log" --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 --skip-name-resolve
    fi
    wait_for mariadbd 60 mariadb --no-defaults -S "$DB_SOCK" -u root -e "select 1"
    DB_PASS_FILE=$STATE/mysql-run/slurm.pass
    [[ -s $DB_PASS_FILE ]] || { head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$DB_PASS_FILE"; chmod 600 "$DB_PASS_FILE"; }
    DB_PASS=$(cat "$DB_PASS_FILE")
    mariadb --no-defaults -S "$DB_SOCK" -u root <<SQL
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL
    cat >"$DBD_CONF.tmp" <<DBD
$MARKER: written by slurm/cluster/start.sh (state in $STATE); stop.sh removes it.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$STATE/log/slurmdbd.pidfile
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
DBD
    chmod 600 "$DBD_CONF.tmp"; mv "$DBD_CONF.tmp" "$DBD_CONF"
    alive slurmdbd slurmdbd || launch slurmdbd slurmdbd -D
    wait_for slurmdbd 60 sacctmgr -n list cluster
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx mocobench; then
        sacctmgr -i add cluster mocobench >/dev/null
    fi
fi

# ---------------------------------------------------------------- slurmctld + slurmd
# No -c: the saved state keeps the job-id counter counting up across restarts.
alive slurmctld slurmctld || launch slurmctld slurmctld -D -i
wait_for slurmctld 60 bash -c 'scontrol ping | grep -q UP'
for n in "${NODES[@]}"; do
    mkdir -p "$STATE/spool/$n"
    alive "slurmd-$n" slurmd || launch "slurmd-$n" slurmd -D -N "$n"
done
t0=$SECONDS
for n in "${NODES[@]}"; do
    until node_up "$n"; do
        st=$(node_state "$n")
        if [[ $st == down* || $st == drain* ]] && (( SECONDS - t0 > 3 )); then
            scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true
        fi
        if (( SECONDS - t0 > 60 )); then
            log "node $n not idle after 60s (state '$st'); slurmd log tail:"
            tail -n 20 "$STATE/log/slurmd-$n.log" "$STATE/log/slurmd-$n.out" >&2 || true
            exit 6
        fi
        sleep 0.3
    done
done
log "up: nodes ${NODES[*]} ($cpus CPUs each), state dir $STATE, accounting=$ACCOUNTING"
