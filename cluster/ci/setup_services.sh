#!/usr/bin/env bash
# Installs, configures and starts the system services the cluster tests use, on one Debian machine, as root:
#
#   munge       the key SLURM authenticates with
#   SLURM       a one-host cluster: slurmctld + slurmd, this host the only node (CPUs = max(2, nproc)),
#               JobRequeue=1, a short requeue delay, finished jobs kept visible to `scontrol show job`
#   sshd        key authentication for root; two extra host names on loopback addresses,
#               mt-node1 (127.0.0.2) and mt-node2 (127.0.0.3), reachable by `ssh` without prompts
#   pdsh        over ssh (PDSH_RCMD_TYPE=ssh), which is what the DeepSpeed multi-node launcher uses
#
# Idempotent (a second run checks and returns in a few seconds), and every step that could wait is
# bounded by `timeout`, so it never hangs. Works without systemd (containers, gVisor): daemons are started
# directly and the SLURM plugins chosen need no cgroups (proctrack/linuxproc, task/none).
#
#   bash cluster/ci/setup_services.sh            # install + configure + start
#   MT_SKIP_APT=1 bash cluster/ci/setup_services.sh   # never call apt-get (packages already there)
set -uo pipefail

log() { printf 'setup_services: %s\n' "$*"; }
die() { printf 'setup_services: FAILED: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts daemons)"
export DEBIAN_FRONTEND=noninteractive

NODE1_NAME=mt-node1; NODE1_ADDR=127.0.0.2
NODE2_NAME=mt-node2; NODE2_ADDR=127.0.0.3
SLURM_CONF=/etc/slurm/slurm.conf
SLURM_STATE=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
SLURM_LOG=/var/log/slurm
PROFILE_SNIPPET=/etc/profile.d/managertower-cluster.sh

# --- 1. packages ------------------------------------------------------------------------------------------
need_install=0
for binary in sbatch slurmctld slurmd munged pdsh sshd ssh ssh-keygen; do
  command -v "$binary" >/dev/null 2>&1 || [ -x "/usr/sbin/$binary" ] || need_install=1
done
if [ "$need_install" = 1 ]; then
  [ "${MT_SKIP_APT:-0}" = 1 ] && die "packages missing and MT_SKIP_APT=1"
  log "installing slurm-wlm munge pdsh openssh-server openssh-client"
  timeout 300 apt-get update -qq || log "apt-get update failed (continuing with the cached lists)"
  timeout 600 apt-get install -y -qq --no-install-recommends \
      slurm-wlm slurm-client munge pdsh openssh-server openssh-client procps iproute2 >/dev/null \
    || die "apt-get install failed"
else
  log "packages already installed"
fi
export PATH="$PATH:/usr/sbin:/sbin"

# --- 2. host names on loopback ----------------------------------------------------------------------------
add_host() {  # add_host ADDR NAME: one /etc/hosts line, only when the name is not there yet
  if ! grep -Eq "^[[:space:]]*[0-9.]+[[:space:]]+([^#]*[[:space:]])?$2([[:space:]]|\$)" /etc/hosts; then
    printf '%s\t%s\n' "$1" "$2" >> /etc/hosts || die "cannot write /etc/hosts"
    log "added $2 -> $1 to /etc/hosts"
  fi
}
add_host "$NODE1_ADDR" "$NODE1_NAME"
add_host "$NODE2_ADDR" "$NODE2_NAME"
HOST_SHORT=$(hostname -s 2>/dev/null || hostname)
getent hosts "$HOST_SHORT" >/dev/null || add_host 127.0.0.1 "$HOST_SHORT"

# --- 3. munge ---------------------------------------------------------------------------------------------
munge_ok() { timeout 10 munge -n 2>/dev/null | timeout 10 unmunge >/dev/null 2>&1; }
if ! munge_ok; then
  install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
  install -d -o munge -g munge -m 0755 /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating the munge key"
    if command -v mungekey >/dev/null 2>&1 || [ -x /usr/sbin/mungekey ]; then
      timeout 30 runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key \
        || timeout 10 dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    else
      timeout 10 dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
  fi
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  # A stale pid/socket from a previous container life makes munged refuse to start.
  if [ -f /run/munge/munged.pid ] && ! kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
  fi
  log "starting munged"
  timeout 20 runuser -u munge -- /usr/sbin/munged --force || log "munged start returned non-zero"
  for _ in $(seq 20); do munge_ok && break; sleep 0.5; done
  munge_ok || die "munge does not work (see /var/log/munge/munged.log)"
fi
log "munge: OK"

# --- 4. SLURM ---------------------------------------------------------------------------------------------
cpus=$(nproc 2>/dev/null || echo 2); [ "$cpus" -lt 2 ] && cpus=2
mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo); [ -n "$mem_mb" ] || mem_mb=1024
install -d -m 0755 /etc/slurm "$SLURM_STATE" "$SLURMD_SPOOL" "$SLURM_LOG" /run/slurm
new_conf=$(mktemp)
cat > "$new_conf" <<EOF
# Written by cluster/ci/setup_services.sh: a one-host SLURM cluster for the cluster tests.
ClusterName=managertower
SlurmctldHost=${HOST_SHORT}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again after cred_expire seconds (default 120); the tests requeue on purpose.
AuthInfo=cred_expire=10
StateSaveLocation=${SLURM_STATE}
SlurmdSpoolDir=${SLURMD_SPOOL}
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=${SLURM_LOG}/slurmctld.log
SlurmdLogFile=${SLURM_LOG}/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
# No cgroups in containers / gVisor: track processes through /proc, bind no tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# Look at pending jobs every 2 s (default 60/30 s): a requeued job starts again as soon as it may.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
# Preemption / time-limit handling: a requeued batch job runs again (resume=auto continues it).
JobRequeue=1
# Seconds between SIGTERM and SIGKILL on cancel/requeue: time for the run to save its checkpoint.
KillWait=60
# Keep finished jobs visible to 'scontrol show job' for an hour (there is no accounting database, no sacct).
MinJobAge=3600
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
Waittime=0
SlurmctldParameters=enable_configless
SlurmdParameters=config_overrides
NodeName=${HOST_SHORT} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=${HOST_SHORT} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
conf_changed=0
if ! cmp -s "$new_conf" "$SLURM_CONF"; then
  install -m 0644 "$new_conf" "$SLURM_CONF"; conf_changed=1; log "wrote $SLURM_CONF (CPUs=$cpus)"
fi
rm -f "$new_conf"
[ -f /etc/slurm/cgroup.conf ] || printf 'CgroupPlugin=autodetect\nIgnoreSystemd=yes\n' > /etc/slurm/cgroup.conf

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_daemon() {  # stop_daemon PIDFILE: by its own pid file only
  if pid_alive "$1"; then
    kill "$(cat "$1")" 2>/dev/null
    for _ in $(seq 40); do pid_alive "$1" || break; sleep 0.25; done
    pid_alive "$1" && kill -9 "$(cat "$1")" 2>/dev/null
  fi
  rm -f "$1"
}
if [ "$conf_changed" = 1 ]; then
  stop_daemon /run/slurm/slurmd.pid
  stop_daemon /run/slurm/slurmctld.pid
fi
if ! pid_alive /run/slurm/slurmctld.pid; then
  log "starting slurmctld"
  timeout 30 /usr/sbin/slurmctld || die "slurmctld did not start (see $SLURM_LOG/slurmctld.log)"
fi
ping_ok() { timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; }
for _ in $(seq 60); do ping_ok && break; sleep 0.5; done
ping_ok || die "slurmctld does not answer 'scontrol ping' (see $SLURM_LOG/slurmctld.log)"
if ! pid_alive /run/slurm/slurmd.pid; then
  log "starting slurmd"
  timeout 30 /usr/sbin/slurmd || die "slurmd did not start (see $SLURM_LOG/slurmd.log)"
fi
node_state() { timeout 10 sinfo -h -n "$HOST_SHORT" -o '%T' 2>/dev/null | head -1; }
for _ in $(seq 60); do
  case "$(node_state)" in idle*|alloc*|mix*|comp*) break ;; esac
  sleep 0.5
done
case "$(node_state)" in
  down*|drain*|fail*) timeout 10 scontrol update nodename="$HOST_SHORT" state=resume >/dev/null 2>&1 ;;
esac
case "$(node_state)" in
  idle*|alloc*|mix*|comp*) log "slurm: OK (node $HOST_SHORT $(node_state))" ;;
  *) die "slurm node $HOST_SHORT is '$(node_state)' (see $SLURM_LOG/slurmd.log)" ;;
esac

# --- 5. sshd + root's key + ssh client config ---------------------------------------------------------------
install -d -m 0700 /root/.ssh
[ -f /root/.ssh/id_ed25519 ] || timeout 30 ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/id_ed25519 \
  || die "ssh-keygen failed"
touch /root/.ssh/authorized_keys; chmod 0600 /root/.ssh/authorized_keys
grep -qxF "$(cat /root/.ssh/id_ed25519.pub)" /root/.ssh/authorized_keys \
  || cat /root/.ssh/id_ed25519.pub >> /root/.ssh/authorized_keys
timeout 60 ssh-keygen -A >/dev/null || die "ssh-keygen -A (host keys) failed"
install -d -m 0755 /etc/ssh/sshd_config.d /run/sshd
cat > /etc/ssh/sshd_config.d/managertower.conf <<'EOF'
# Written by cluster/ci/setup_services.sh: root logs in with its key (pdsh / the DeepSpeed launcher).
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
UseDNS no
# pdsh opens one connection per node at once; the default 10:30:100 drops some under load.
MaxStartups 200:30:400
MaxSessions 200
EOF
ssh_marker="# managertower cluster hosts (cluster/ci/setup_services.sh)"
if ! grep -qF "$ssh_marker" /root/.ssh/config 2>/dev/null; then
  cat >> /root/.ssh/config <<EOF
$ssh_marker
Host $NODE1_NAME $NODE2_NAME localhost 127.0.0.1 $NODE1_ADDR $NODE2_ADDR $HOST_SHORT
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
    BatchMode yes
    ConnectTimeout 10
    IdentityFile /root/.ssh/id_ed25519
EOF
fi
chmod 0600 /root/.ssh/config
ssh_ok() { timeout 20 ssh "$1" true </dev/null >/dev/null 2>&1; }
if ! ssh_ok "$NODE1_NAME"; then
  timeout 10 /usr/sbin/sshd -t || die "sshd configuration invalid"
  if [ -f /run/sshd.pid ] && kill -0 "$(cat /run/sshd.pid)" 2>/dev/null; then
    kill -HUP "$(cat /run/sshd.pid)"; log "reloaded sshd"
  else
    timeout 20 /usr/sbin/sshd || die "sshd did not start"; log "started sshd"
  fi
  for _ in $(seq 20); do ssh_ok "$NODE1_NAME" && break; sleep 0.5; done
fi
for host in "$NODE1_NAME" "$NODE2_NAME"; do
  ssh_ok "$host" || die "ssh $host fails (key authentication for root on loopback)"
done
log "sshd: OK ($NODE1_NAME, $NODE2_NAME reachable without prompts)"

# --- 6. pdsh over ssh ---------------------------------------------------------------------------------------
install -d -m 0755 /etc/pdsh
echo ssh > /etc/pdsh/rcmd_default
cat > "$PROFILE_SNIPPET" <<'EOF'
# Written by cluster/ci/setup_services.sh
export PDSH_RCMD_TYPE=ssh
EOF
export PDSH_RCMD_TYPE=ssh
out=$(timeout 30 pdsh -S -w "$NODE1_NAME,$NODE2_NAME" hostname 2>&1) || die "pdsh over ssh failed: $out"
log "pdsh: OK ($(echo "$out" | tr '\n' ' '))"
log "all services up"
