#!/usr/bin/env bash
# A real two-node SLURM cluster for the tests, as plain processes (no systemd):
# munge, MariaDB, slurmdbd (accounting, so that sacct works as on a real
# cluster), slurmctld and one slurmd per node, with two fake GPUs per node as
# gres. Both nodes are this machine (slurmd -N NODE), each with all its CPUs
# and half its memory, so that a job can span two nodes.
#
#   tests/slurm/cluster.sh start [STATE_DIR]   # default: /tmp/lopd-slurm
#   tests/slurm/cluster.sh stop  [STATE_DIR]
#
# Installs nothing (Debian: slurm-wlm slurmdbd munge mariadb-server); run as
# root. All state lives under STATE_DIR, which must be traversable by all
# (munge checks its socket's directories), except /etc/slurm/slurm.conf: a
# link to STATE_DIR/etc/slurm.conf, because client commands inside jobs read
# the config there (the SLURM executor plugin's job step drops SLURM_CONF).
# The daemons find gres.conf and slurmdbd.conf next to STATE_DIR/etc/slurm.conf.
set -euo pipefail

CLUSTER=lopdtest       # cluster, account and partition of the test cluster
DB_PORT=${LOPD_SLURM_DB_PORT:-33061}
CTLD_PORT=${LOPD_SLURM_CTLD_PORT:-6817}
SLURMD_PORTS=${LOPD_SLURM_SLURMD_PORTS:-6821-6822}  # first-last: one port per node
NODES=(lopd1 lopd2)
DBD_PORT=${LOPD_SLURM_DBD_PORT:-6819}
ETC_CONF=/etc/slurm/slurm.conf

cmd=${1:-}
S=$(realpath -m "${2:-/tmp/lopd-slurm}")
export SLURM_CONF=$S/etc/slurm.conf

die() { echo "cluster.sh: $*" >&2; exit 1; }

# wait_for SECONDS WHAT LOGFILE COMMAND...: retry COMMAND, fail with the log's tail
wait_for() {
    local secs=$1 what=$2 log=$3; shift 3
    for _ in $(seq "$secs"); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 1
    done
    echo "cluster.sh: $what not up after ${secs}s; last lines of $log:" >&2
    tail -n 20 "$log" >&2 || true
    exit 1
}

running() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_configs() {
    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(nproc)
    mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.4)}' /proc/meminfo)  # per node
    mkdir -p "$S"/{etc,munge,state,run,log} "${NODES[@]/#/$S/spool/}"
    chmod 755 "$S" "$S/munge"
    cat >"$S/etc/slurm.conf" <<EOF
# Written by tests/slurm/cluster.sh for a throw-away test cluster.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
AuthType=auth/munge
AuthInfo=socket=$S/munge/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool/%n
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd-%n.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd-%n.log
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# for connections to slurmdbd, the munge socket goes here, not in AuthInfo
AccountingStoragePass=$S/munge/munge.socket
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
GresTypes=gpu
NodeName=lopd[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=[$SLURMD_PORTS] CPUs=$cpus RealMemory=$mem_mb Gres=gpu:2 State=UNKNOWN
# The cluster's defaults, for jobs that ask for no time or memory:
PartitionName=$CLUSTER Nodes=ALL Default=YES MaxTime=INFINITE DefaultTime=00:10:00 DefMemPerCPU=512 State=UP
EOF
    # fake GPUs: any device files will do, but without File= the node goes INVAL
    echo "NodeName=lopd[1-2] Name=gpu File=/dev/tty[0-1]" >"$S/etc/gres.conf"
    cat >"$S/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$S/munge/munge.socket
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$S/run/slurmdbd.pid
LogFile=$S/log/slurmdbd.log
EOF
    chmod 600 "$S/etc/slurmdbd.conf"
}

link_etc_conf() {
    if [[ -e $ETC_CONF && ! -L $ETC_CONF ]]; then
        die "$ETC_CONF exists and is not a link made by this script; refusing to replace a real cluster's config"
    fi
    mkdir -p "$(dirname "$ETC_CONF")"
    ln -sfn "$SLURM_CONF" "$ETC_CONF"
}

start_munge() {
    running "$S/munge/munged.pid" && return
    [[ -s $S/munge/munge.key ]] || { head -c 1024 /dev/urandom >"$S/munge/munge.key"; chmod 400 "$S/munge/munge.key"; }
    munged --socket="$S/munge/munge.socket" --key-file="$S/munge/munge.key" --pid-file="$S/munge/munged.pid" \
        --log-file="$S/log/munged.log" --seed-file="$S/munge/munged.seed" \
        || { tail -n 5 "$S/log/munged.log" >&2; die "munged did not start"; }
    wait_for 10 munge "$S/log/munged.log" sh -c "munge -n -S '$S/munge/munge.socket' | unmunge -S '$S/munge/munge.socket'"
}

mysql() { mariadb --no-defaults --socket="$S/mysql.sock" -u root "$@"; }

start_mariadb() {
    if ! running "$S/run/mysqld.pid"; then
        if [[ ! -d $S/mysql/mysql ]]; then
            mariadb-install-db --no-defaults --datadir="$S/mysql" --user=root --skip-test-db \
                >"$S/log/mariadb-install.log" 2>&1 \
                || { tail -n 20 "$S/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
        fi
        setsid mariadbd --no-defaults --user=root --datadir="$S/mysql" --socket="$S/mysql.sock" \
            --pid-file="$S/run/mysqld.pid" --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
            --log-error="$S/log/mariadb.log" </dev/null >/dev/null 2>&1 &
        wait_for 30 MariaDB "$S/log/mariadb.log" mysql -e "SELECT 1"
    fi
    mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
              CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

start_slurmdbd() {
    running "$S/run/slurmdbd.pid" || slurmdbd || die "slurmdbd did not start; see $S/log/slurmdbd.log"
    wait_for 30 slurmdbd "$S/log/slurmdbd.log" sacctmgr -n list cluster
}

# The association root -> account is the user's default account: the SLURM
# executor plugin, given no account, submits without one and SLURM uses it.
add_associations() {
    sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    sacctmgr -n -P list account format=account | grep -qx "$CLUSTER" \
        || sacctmgr -i add account "$CLUSTER" Cluster="$CLUSTER" Description=tests Organization=tests >/dev/null
    sacctmgr -n -P list assoc user=root account="$CLUSTER" format=account | grep -qx "$CLUSTER" \
        || sacctmgr -i add user root Account="$CLUSTER" Cluster="$CLUSTER" >/dev/null
    [[ $(sacctmgr -n -P list user root format=defaultaccount) == "$CLUSTER" ]] \
        || sacctmgr -i modify user root set DefaultAccount="$CLUSTER" >/dev/null
}

nodes_idle() { [[ $(sinfo -h -N -o %t | sort -u) == idle && $(sinfo -h -N -o %N | wc -l) == "${#NODES[@]}" ]]; }

start_slurm() {
    running "$S/run/slurmctld.pid" || slurmctld || die "slurmctld did not start; see $S/log/slurmctld.log"
    wait_for 30 slurmctld "$S/log/slurmctld.log" scontrol ping
    local node
    for node in "${NODES[@]}"; do
        running "$S/run/slurmd-$node.pid" || slurmd -N "$node" || die "slurmd -N $node did not start; see $S/log/slurmd-$node.log"
    done
    wait_for 60 "the nodes (idle in sinfo)" "$S/log/slurmd-${NODES[0]}.log" nodes_idle
}

start() {
    [[ $(id -u) == 0 ]] || die "run as root (the daemons run as root on this throw-away cluster)"
    for bin in munged mariadbd slurmdbd slurmctld slurmd sacctmgr; do
        command -v "$bin" >/dev/null || die "$bin not found: apt-get install -y slurm-wlm slurmdbd munge mariadb-server"
    done
    write_configs
    link_etc_conf
    start_munge
    start_mariadb
    start_slurmdbd
    add_associations
    start_slurm
    echo "SLURM cluster $CLUSTER is up (state in $S)"
}

# stop_pid NAME PIDFILE: TERM the process, wait for it to exit, KILL after 30 s
stop_pid() {
    local pid
    running "$2" || return 0
    pid=$(cat "$2")
    kill "$pid"
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 1; done
    echo "cluster.sh: $1 (pid $pid) ignored TERM for 30 s; killing it" >&2
    kill -9 "$pid" 2>/dev/null || true
}

stop() {
    if running "$S/run/slurmctld.pid"; then
        scancel --partition "$CLUSTER" 2>/dev/null || true
    fi
    local node
    for node in "${NODES[@]}"; do stop_pid "slurmd $node" "$S/run/slurmd-$node.pid"; done
    stop_pid slurmctld "$S/run/slurmctld.pid"
    stop_pid slurmdbd "$S/run/slurmdbd.pid"
    stop_pid mariadbd "$S/run/mysqld.pid"
    stop_pid munged "$S/munge/munged.pid"
    if [[ -L $ETC_CONF && $(readlink "$ETC_CONF") == "$SLURM_CONF" ]]; then
        rm "$ETC_CONF"
    fi
    echo "SLURM cluster $CLUSTER stopped"
}

case $cmd in
    start) start ;;
    stop) stop ;;
    *) die "usage: $0 start|stop [STATE_DIR]" ;;
esac
