# shellcheck shell=bash
# Variables are shared with the script that sources this file:
# shellcheck disable=SC2034,SC2154
# The machinery of the systemd node lab, shared by scripts/test-systemd and
# scripts/test-migration: Debian containers booted with systemd-nspawn over
# an overlay of the cached roots (scripts/debian-root), systemd as PID 1,
# sharing this machine's network namespace; the test masters and the load
# clients of testkit/examples/node_lab.rs on the host; Ansible entering the
# containers through tests/systemd/connection_plugins/lab_nsenter.py; a
# teardown that leaves nothing running, failure included.
#
# Sourced by a script that has defined lab_tag (its name, for messages),
# say and fail, and set suites (the Debian suites it boots). In order, it
# calls: lab_tools, lab_build DIR, (takes /tmp/apilb-timing.lock,)
# lab_setup WORKDIR_PREFIX, lab_start_masters; then boots nodes with
# mount_root/boot_node and checks them with the helpers below.

# Installs systemd-container, python3, procps and cargo-deb when missing;
# sets venv (scripts/ansible-venv) and lower[SUITE] (the cached roots).
lab_tools() {
  local missing=() s
  command -v systemd-nspawn >/dev/null 2>&1 || missing+=(systemd-container)
  command -v python3 >/dev/null 2>&1 || missing+=(python3)
  command -v pgrep >/dev/null 2>&1 || missing+=(procps)
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]} from the distribution"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  export PATH="$HOME/.cargo/bin:$PATH"
  if ! cargo deb --version >/dev/null 2>&1; then
    say "installing cargo-deb from crates.io (once; takes a few minutes)"
    cargo install cargo-deb --locked --version '^3.8' --quiet
  fi
  venv=$(scripts/ansible-venv)
  # Fetch or build the roots before anything runs (a cold one takes minutes).
  declare -gA lower
  for s in "${suites[@]}"; do
    lower[$s]=$(scripts/debian-root "$s")
  done
}

# Builds apilb, the test kit's node_lab example and two .debs of apilb into
# $target/DIR (first/: the version in Cargo.toml; upgrade/: a higher one);
# sets target, node_lab, deb1, deb2, v1 and v2. The .debs are made again
# only when the binary or what packaging puts around it changed since the
# last build (so scripts/test-migration reuses those of scripts/test-systemd). With
# APILB_LAB_PREBUILT=1 (a second run of the same script, under flock -o) it
# only finds them.
lab_build() { # dir under the target directory
  local t=$SECONDS debs stamp
  target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
  node_lab=$target/release/examples/node_lab
  debs=$target/$1
  if [ -z "${APILB_LAB_PREBUILT:-}" ]; then
    cargo build --release --locked --quiet --bin apilb
    # Apart, so the shipped binary is built exactly as scripts/test-package
    # builds it (no feature of the test kit's dependencies unified into it).
    cargo build --release --locked --quiet -p apilb-testkit --example node_lab
    stamp=$( (sha256sum "$target/release/apilb" Cargo.toml systemd/apilb.service; find packaging -type f -exec sha256sum {} +) \
      | sort -k2 | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$debs/.stamp" 2>/dev/null)" = "$stamp" ] && ls "$debs"/first/apilb_*.deb "$debs"/upgrade/apilb_*.deb >/dev/null 2>&1; then
      say "reusing the .debs in $debs (same binary and packaging)"
    else
      packaging/build-assets "$target/release/apilb" 2>/dev/null
      rm -rf "$debs"
      mkdir -p "$debs/first" "$debs/upgrade"
      cargo deb --no-build --locked --quiet --output "$debs/first/" >/dev/null
      v1=$(dpkg-deb -f "$(ls "$debs"/first/apilb_*.deb)" Version)
      cargo deb --no-build --locked --quiet --deb-version "$v1+lab2" --output "$debs/upgrade/" >/dev/null
      echo "$stamp" >"$debs/.stamp"
    fi
  fi
  deb1=$(ls "$debs"/first/apilb_*.deb)
  v1=$(dpkg-deb -f "$deb1" Version)
  deb2=$(ls "$debs"/upgrade/apilb_*.deb)
  v2=$(dpkg-deb -f "$deb2" Version)
  dpkg --compare-versions "$v2" gt "$v1" || fail "$v2 is not higher than $v1"
  [ -n "${APILB_LAB_PREBUILT:-}" ] || say "built $(basename "$deb1") and $(basename "$deb2") in $(( SECONDS - t ))s"
}

# The work directory (mktemp -d PREFIX.XXXXXX), its logs, the lab's state
# and the traps that tear everything down.
lab_setup() { # work directory prefix
  exec 8>&2 # where cleanup reports, whatever a trap interrupts
  work=$(mktemp -d "$1.XXXXXX")
  logs=$work/logs
  lab=$work/lab
  mkdir -p "$logs"
  masters_pid=""
  load_pid=""
  mounts=()
  cgroups=()
  node_name=""
  nspawn_pid=""
  node_pid=""
  pidns=()

  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

# Every process of a container, wherever its PID 1 is: its cgroup.
cg_procs() { # cgroup dir
  find "$1" -name cgroup.procs -exec cat {} + 2>/dev/null || true
}

kill_node() {
  [ -n "$nspawn_pid" ] || return 0
  if kill -0 "$nspawn_pid" 2>/dev/null; then
    save_journal
    echo "$lab_tag: killing container $node_name" >&2
    local cg i
    # The container's processes first: systemd-nspawn then exits by itself.
    for i in $(seq 100); do
      if [ -d /run/systemd/system ]; then
        systemctl kill --signal=SIGKILL "$node_name.scope" 2>/dev/null || true
      fi
      for cg in "${cgroups[@]}"; do
        cg_procs "$cg" | grep -vx "$nspawn_pid" | xargs -r kill -9 2>/dev/null || true
      done
      kill -0 "$nspawn_pid" 2>/dev/null || break
      # Then systemd-nspawn itself, if it hangs on.
      [ "$i" -lt 50 ] || kill -9 "$nspawn_pid" 2>/dev/null || true
      sleep 0.1
    done
  fi
  wait "$nspawn_pid" 2>/dev/null || true
  nspawn_pid=""
  node_pid=""
}

remove_cgroups() {
  local cg i
  for cg in "${cgroups[@]}"; do
    [ -d "$cg" ] || continue
    # Killed processes leave their cgroup once the kernel has reaped them.
    for i in $(seq 100); do
      [ -n "$(cg_procs "$cg")" ] || break
      [ "$i" -lt 20 ] || cg_procs "$cg" | xargs -r kill -9 2>/dev/null || true
      sleep 0.1
    done
    [ -z "$(cg_procs "$cg")" ] || echo "$lab_tag: WARNING: processes left in $cg: $(cg_procs "$cg" | tr '\n' ' ')" >&2
    find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
    [ ! -d "$cg" ] || echo "$lab_tag: WARNING: cannot remove cgroup $cg" >&2
  done
  cgroups=()
}

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  # A signal's trap may run inside a command whose output goes to a log.
  exec 2>&8
  if [ -n "$load_pid" ]; then kill "$load_pid" 2>/dev/null; wait "$load_pid" 2>/dev/null; fi
  kill_node
  remove_cgroups
  local m
  for m in "${mounts[@]}"; do
    mountpoint -q "$m" && umount "$m"
  done
  if [ -n "$masters_pid" ]; then kill "$masters_pid" 2>/dev/null; wait "$masters_pid" 2>/dev/null; fi
  # Nothing of the lab may outlive it: no process in a container's PID
  # namespace, none with its root in the work directory.
  local p ns left=""
  for p in /proc/[0-9]*; do
    ns=$(readlink "$p/ns/pid" 2>/dev/null) || continue
    # A zombie is dead already (its parent has not reaped it yet).
    [ "$(sed -n 's/^.*) \(.\) .*$/\1/p' "$p/stat" 2>/dev/null)" != Z ] || continue
    case " ${pidns[*]} " in *" $ns "*) left+=" ${p#/proc/}"; continue ;; esac
    case "$(readlink "$p/root" 2>/dev/null)" in "$work"/*) left+=" ${p#/proc/}" ;; esac
  done
  if [ -n "$left" ]; then
    echo "$lab_tag: processes of the lab were still running, killed:$left" >&2
    # shellcheck disable=SC2086
    kill -9 $left 2>/dev/null
    rc=1
  fi
  if [ "$rc" -ne 0 ] || [ -n "${APILB_TEST_KEEP:-}" ]; then
    local keep
    keep=$(mktemp -d "${work%.*}-logs.XXXXXX")
    cp -a "$logs"/. "$keep"/ 2>/dev/null
    echo "$lab_tag: logs kept in $keep" >&2
  fi
  for m in "${mounts[@]}"; do
    mountpoint -q "$m" || continue
    echo "$lab_tag: WARNING: $m is still mounted; $work is left in place" >&2
    exit "$rc"
  done
  rm -rf "$work"
  exit "$rc"
}

wait_for() { # seconds, what, command...
  local limit=$1 what=$2 deadline=$(( SECONDS + $1 ))
  shift 2
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || fail "timed out after ${limit}s waiting for $what"
    sleep 0.1
  done
}

in_node() { # command... (inside the container, with a clean environment)
  nsenter -t "$node_pid" -m -u -i -p -C -- env -i \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 TERM=dumb "$@"
}

booted() {
  local state
  state=$(in_node systemctl is-system-running 2>/dev/null) || true
  case $state in
    running) return 0 ;;
    degraded)
      say "booted degraded; failed units: $(in_node systemctl --failed --plain --no-legend | awk '{print $1}' | tr '\n' ' ')"
      return 0 ;;
  esac
  kill -0 "$nspawn_pid" 2>/dev/null || fail "the container exited while booting (console: $logs/$node_name.console)"
  return 1
}

# Boots the Debian root at $1 (an overlay mount) as container $2; sets
# nspawn_pid and node_pid (the container's PID 1 as this machine sees it).
boot_node() { # root dir, name
  local dir=$1 base cg
  node_name=$2
  local t=$SECONDS
  # A cgroup of its own: teardown empties it whatever happens inside. On a
  # host run by systemd, a transient scope is that cgroup.
  if [ ! -d /run/systemd/system ]; then
    for base in /sys/fs/cgroup /sys/fs/cgroup/unified /sys/fs/cgroup/systemd; do
      [ -f "$base/cgroup.procs" ] || continue
      mkdir -p "$base/$node_name"
      cgroups+=("$base/$node_name")
    done
  fi
  (
    exec 8>&- 9>&- </dev/null >>"$logs/$node_name.console" 2>&1
    for cg in "${cgroups[@]}"; do echo "$BASHPID" >"$cg/cgroup.procs"; done
    scope=()
    if [ -d /run/systemd/system ]; then
      scope=(systemd-run --scope --quiet --collect --unit="$node_name" -p Delegate=yes --)
    fi
    # Debian 12 and 13 nodes run the unified cgroup hierarchy (cgroup v2);
    # so do the containers, also on a host with the hybrid layout.
    SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 exec "${scope[@]}" systemd-nspawn -D "$dir" -M "$node_name" \
      --register=no --keep-unit --boot --console=pipe
  ) &
  nspawn_pid=$!
  node_pid=""
  local deadline=$(( SECONDS + 30 ))
  while [ -z "$node_pid" ]; do
    kill -0 "$nspawn_pid" 2>/dev/null || fail "systemd-nspawn exited (console: $logs/$node_name.console)"
    [ "$SECONDS" -lt "$deadline" ] || fail "no systemd in container $node_name after 30s"
    node_pid=$(pgrep -P "$nspawn_pid" -x systemd || true)
    [ -n "$node_pid" ] || sleep 0.05
  done
  pidns+=("$(readlink "/proc/$node_pid/ns/pid")")
  wait_for 90 "container $node_name to boot" booted
  say "booted $node_name in $(( SECONDS - t ))s ($(in_node systemctl --version | head -n1))"
}

exited() { ! kill -0 "$1" 2>/dev/null; }

save_journal() {
  [ -n "$node_pid" ] || return 0
  timeout 20 nsenter -t "$node_pid" -m -u -i -p -C -- env -i PATH=/usr/bin:/bin \
    journalctl -b --no-pager -o short-monotonic >>"$logs/$node_name.journal" 2>&1 || true
}

poweroff_node() {
  local t=$SECONDS rc=0
  save_journal
  in_node systemctl poweroff >/dev/null 2>&1 || true
  wait_for 90 "container $node_name to power off" exited "$nspawn_pid"
  wait "$nspawn_pid" || rc=$?
  nspawn_pid=""
  node_pid=""
  [ "$rc" -eq 0 ] || fail "systemd-nspawn exited with $rc on poweroff (console: $logs/$node_name.console)"
  say "powered off $node_name in $(( SECONDS - t ))s"
  remove_cgroups
}

# An overlayfs over the cached root: the container writes only into $1/upper.
mount_root() { # dir, suite
  mkdir -p "$1/upper" "$1/work" "$1/root"
  mount -t overlay overlay -o "lowerdir=${lower[$2]},upperdir=$1/upper,workdir=$1/work" "$1/root"
  mounts+=("$1/root")
}

unmount_root() { # dir
  umount "$1/root"
  local m kept=()
  for m in "${mounts[@]}"; do [ "$m" = "$1/root" ] || kept+=("$m"); done
  mounts=("${kept[@]}")
  rm -rf "$1"
}

prop() { in_node systemctl show --property="$1" --value apilb.service; }
substate_is() { [ "$(prop SubState)" = "$1" ]; }

# Evaluates a Python expression over `apilb status --json` of the node (s).
status() {
  in_node apilb status --json 2>/dev/null | python3 -c 'import json, sys; s = json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"
}
status_shows() { # regex: a line of `apilb status` as operators read it
  in_node apilb status 2>/dev/null | grep -q "$1"
}
# True when the Python expression over the status is true.
status_is() { [ "$(status "$1" 2>/dev/null)" = True ]; }
masters_are() { # names...: the masters apilb reports, all UP
  status_is "sorted(m['name'] for m in s['masters'] if m['state'] == 'UP') == sorted('$*'.split())"
}

haproxy_procs() { # HAProxy processes in the container
  in_node sh -c 'grep -lx haproxy /proc/[0-9]*/comm 2>/dev/null | wc -l'
}

# "uid CapPrm CapEff CapAmb" of each HAProxy process in the container, one per line.
haproxy_creds() {
  in_node sh -c 'for c in $(grep -lx haproxy /proc/[0-9]*/comm 2>/dev/null); do
    d=${c%/comm}; awk '"'"'/^Uid:/ {u=$2} /^CapPrm:/ {p=$2} /^CapEff:/ {e=$2} /^CapAmb:/ {a=$2} END {print u, p, e, a}'"'"' "$d/status"
  done'
}

# "uid CapPrm CapEff CapAmb" of the agent (the unit's main process).
agent_creds() {
  in_node awk '/^Uid:/ {u=$2} /^CapPrm:/ {p=$2} /^CapEff:/ {e=$2} /^CapAmb:/ {a=$2} END {print u, p, e, a}' \
    "/proc/$(prop MainPID)/status"
}

# Fails unless the agent runs as apilb with CAP_DAC_READ_SEARCH alone, and
# every HAProxy process as apilb with no capability.
unprivileged() { # what
  local uid agent line n=0
  uid=$(in_node id -u apilb) || fail "$1: no apilb user"
  agent=$(agent_creds)
  # CAP_DAC_READ_SEARCH is capability 2: mask 0x4.
  [ "$agent" = "$uid 0000000000000004 0000000000000004 0000000000000004" ] \
    || fail "$1: the agent runs with uid/CapPrm/CapEff/CapAmb $agent (want $uid and CAP_DAC_READ_SEARCH alone)"
  while read -r line; do
    [ -n "$line" ] || continue
    n=$((n + 1))
    [ "$line" = "$uid 0000000000000000 0000000000000000 0000000000000000" ] \
      || fail "$1: an HAProxy process runs with uid/CapPrm/CapEff/CapAmb $line (want $uid, no capability)"
  done < <(haproxy_creds)
  [ "$n" -ge 2 ] || fail "$1: $n HAProxy processes (want a master and a worker)"
  echo "agent uid $uid with CAP_DAC_READ_SEARCH, $n HAProxy processes uid $uid without capabilities"
}

probe() { # what
  local out
  out=$("$node_lab" probe --lab "$lab" 2>&1) || fail "$1: the endpoint did not serve: $out"
  echo "$out"
}

load_start() { # name
  load_name=$1
  rm -f "$work/load.stop" "$work/load.started"
  "$node_lab" load --lab "$lab" --stop-file "$work/load.stop" --started-file "$work/load.started" \
    --clients 2 --hold 40 --max-seconds 300 8>&- 9>&- >"$logs/$suite-$load_name.json" 2>"$logs/$suite-$load_name.err" &
  load_pid=$!
  wait_for 60 "the load ($load_name) to start" test -e "$work/load.started"
}

# Stops the load and requires that nothing failed; sets load_summary.
load_stop() {
  touch "$work/load.stop"
  local rc=0
  wait "$load_pid" || rc=$?
  load_pid=""
  [ "$rc" -eq 0 ] || fail "the load client ($load_name) failed: $(cat "$logs/$suite-$load_name.err")"
  load_summary=$(python3 - "$logs/$suite-$load_name.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
new, held = r["new"], r["held"]
print(f"{new['ok']} new connections, {new['failed']} failed; "
      f"{held['ok']}/{held['wanted']} held connections still answered "
      f"({held['closed']} closed, {held['failed']} failed) over {r['seconds']:.1f}s")
bad = []
if r["stopped_by"] != "stop file":
    bad.append("the load ran into --max-seconds")
if new["failed"] or new["ok"] < 10:
    bad.append(f"new connections: {new['ok']} ok, {new['failed']} failed: {new['errors'][:5]}")
if held["opened"] != held["wanted"] or held["ok"] != held["wanted"]:
    bad.append(f"held connections: {held}")
for b in bad:
    print("FAIL:", b, file=sys.stderr)
sys.exit(1 if bad else 0)
PY
) || fail "$load_name: connections failed (see above)"
}

# Waits until systemd runs a new main process of apilb (not $1) and the
# agent answers its status.
new_agent() { # old main pid
  local pid state
  pid=$(prop MainPID)
  state=$(prop ActiveState)
  [ "$state" = active ] && [ "$pid" != 0 ] && [ "$pid" != "$1" ] && in_node apilb status --json >/dev/null 2>&1
}

leftover_lines() {
  in_node journalctl -u apilb.service -o cat --no-pager | grep -c "Found left-over process" || true
}

timings=()
check() { # number, text
  check_n=$1
  check_text=$2
  check_t=$SECONDS
}
passed() { # details
  local line
  line=$(printf '%-8s %s. %-48s %3ss  %s' "$suite" "$check_n" "$check_text" $(( SECONDS - check_t )) "$1")
  timings+=("$line")
  say "PASS $check_n. $check_text: $1"
}

# Starts the test API servers (testkit/examples/node_lab.rs masters) into $lab;
# sets listen (the node's endpoint).
lab_start_masters() {
  say "starting the test API servers (testkit/examples/node_lab.rs)"
  "$node_lab" masters --out "$lab" --max-seconds 3600 8>&- 9>&- >"$logs/masters.log" 2>&1 &
  masters_pid=$!
  wait_for 30 "the test API servers" test -e "$lab/ready"
  listen=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["listen"])' "$lab/lab.json")
  say "masters: $(python3 -c 'import json, sys; print(" ".join(f"{n}={a}" for n, a in json.load(open(sys.argv[1]))["masters"]))' "$lab/lab.json"); node endpoint $listen"
}
