#!/bin/sh
# /init of the project's test guest (busybox ash). scripts/guest/build-image copies this file into the
# initramfs. It loads the virtio modules, brings the network up from the kernel command line, runs the
# steps named in vnet.run and prints markers on the serial console, then powers off.
#
# Kernel command line (the last occurrence of a key wins):
#   vnet.ip=198.18.0.2/24      IPv4 address of eth0          vnet.peer=198.18.0.1   host side (ping/iperf3)
#   vnet.ip6=fd00::2/64        IPv6 address (optional)       vnet.peer6=fd00::1     pinged too when set
#   vnet.mtu=9000              eth0 MTU (optional; default: what the virtio device offers)
#   vnet.run=NAME[,NAME...]    steps, in order (default: wait)
#   vnet.iperf_time=10         seconds per iperf3 client run
#   vnet.iperf_tests=2         tests the background iperf3 server serves before iperf-server-wait ends
#   vnet.iperf_wait=600        seconds iperf-server-wait waits at most
#   vnet.ping_deadline=60      seconds the ping steps wait for a first answer
#   vnet.ping_big_size=8972    payload of ping-big
#   vnet.ping_time=30          seconds ping-fast-bg pings (every 50 ms)
#   vnet.queue_delay=5         seconds before each change of queues-cycle
#   vnet.queue_period=120      seconds between the changes of queues-loop-bg
# Steps: ping ping-big ping-each-cpu iperf-server iperf-server-bg iperf-server-wait iperf-client iperf-client-reverse
#        iperf-client-parallel stats mtu wait sleep-loop-ping ping-fast-bg ping-fast-wait queues-cycle
#        queues-loop-bg shell
# Markers (one per line): VNET-BOOTED, VNET-NET-UP ip=.. mtu=.. queues=N, VNET-STEP-BEGIN name,
# VNET-STEP-OK name, VNET-STEP-FAIL name reason, VNET-IPERF name bits_per_second=.., VNET-PING ..,
# VNET-IPERF-SERVER-READY name, VNET-PING-FAST .., VNET-PING-GAP .., VNET-QUEUES .., VNET-WAITING,
# VNET-DONE result=ok|fail.
# After the first failed step the remaining steps are skipped and the guest powers off.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TMPDIR=/tmp
# busybox ash prefers its own applets to PATH: name iproute2's ip by its path
IP=/usr/bin/ip

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /tmp /run
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1

uptime_s() { local up; read -r up _ </proc/uptime; echo "$up"; }
say() { echo "$*"; }

say "VNET-BOOTED kernel=$(uname -r) t=$(uptime_s)"

# ---- configuration from /proc/cmdline ------------------------------------------------------------
cfg_ip=198.18.0.2/24
cfg_peer=198.18.0.1
cfg_ip6=
cfg_peer6=
cfg_mtu=
cfg_run='wait'
cfg_iperf_time=10
cfg_iperf_tests=2
cfg_iperf_wait=600
cfg_ping_deadline=60
cfg_ping_big_size=8972
cfg_ping_time=30
cfg_queue_delay=5
cfg_queue_period=120
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    vnet.*=*)
      key=${arg%%=*}
      key=${key#vnet.}
      value=${arg#*=}
      case "$key" in
        *[!a-z0-9_]*|'') say "VNET-WARN ignoring kernel argument $arg" ;;
        *) eval "cfg_$key=\$value" ;;
      esac
      ;;
  esac
done

# ---- helpers ---------------------------------------------------------------------------------------
now_cs() { # uptime in centiseconds
  local up
  read -r up _ </proc/uptime
  echo "${up%.*}${up#*.}" | sed 's/^0*//;s/^$/0/'
}

is_number() { case "$1" in ''|*[!0-9]*) return 1 ;; *) return 0 ;; esac; }

snmp_ip() { # snmp_ip FIELD: a counter from the Ip: lines of /proc/net/snmp
  awk -v field="$1" '$1 == "Ip:" { if (!n) { for (i = 2; i <= NF; i++) col[$i] = i; n = 1 } else print $col[field] }' /proc/net/snmp
}

listening_on() { # listening_on PORT: is a TCP socket listening on PORT (v4 or v6)?
  local hex
  hex=$(printf '%04X' "$1")
  awk -v port=":$hex" '$4 == "0A" && substr($2, length($2) - 4) == port { found = 1 } END { exit !found }' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

FAIL_REASON=
fail() { FAIL_REASON="$*"; return 1; }

# ping_until_answer HOST DEADLINE_S [ping args]: one ping a second until one is answered
ping_until_answer() {
  local host deadline start attempts waited
  host=$1 deadline=$2
  shift 2
  start=$(now_cs)
  attempts=0
  while :; do
    attempts=$((attempts + 1))
    if ping -c 1 -W 1 "$@" "$host" >/dev/null 2>&1; then
      waited=$(( $(now_cs) - start ))
      say "VNET-PING-FIRST host=$host attempts=$attempts after_cs=$waited"
      return 0
    fi
    if [ $(( $(now_cs) - start )) -ge $((deadline * 100)) ]; then
      return 1
    fi
    sleep 1
  done
}

# ping_count HOST COUNT [ping args]: prints transmitted/received, succeeds when all came back
ping_count() {
  local host count out line tx rx rtt
  host=$1 count=$2
  shift 2
  out=$(ping -c "$count" -i 0.2 -W 2 "$@" "$host" 2>&1)
  line=$(echo "$out" | grep 'packets transmitted')
  tx=$(echo "$line" | sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p')
  rx=$(echo "$line" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
  rtt=$(echo "$out" | sed -n 's/^round-trip min\/avg\/max = \([0-9./]*\) ms/\1/p')
  say "VNET-PING-RESULT host=$host transmitted=${tx:-0} received=${rx:-0} rtt_min_avg_max_ms=${rtt:-na}"
  [ -n "$tx" ] && [ "$tx" = "$rx" ]
}

iperf_report() { # iperf_report NAME JSONFILE: prints the VNET-IPERF marker, fails on an iperf3 error
  local summary status bps
  summary=$(awk -f /etc/vnet/iperf-summary.awk "$2")
  status=$?
  if [ $status -ne 0 ]; then
    fail "iperf3 $summary"
    return 1
  fi
  bps=$(echo "$summary" | sed -n 's/^bits_per_second=\([0-9]*\).*/\1/p')
  say "VNET-IPERF $1 $summary mbit_per_second=$((bps / 1000000))"
}

check_config() {
  local key value
  for key in iperf_time iperf_tests iperf_wait ping_deadline ping_big_size ping_time queue_delay queue_period; do
    eval "value=\$cfg_$key"
    is_number "$value" || { fail "vnet.$key=$value-is-not-a-number"; return 1; }
  done
  [ -z "$cfg_mtu" ] || is_number "$cfg_mtu" || { fail "vnet.mtu=$cfg_mtu-is-not-a-number"; return 1; }
}

# ---- steps -----------------------------------------------------------------------------------------
step_ping() {
  ping_until_answer "$cfg_peer" "$cfg_ping_deadline" || { fail "no-answer-from-$cfg_peer-within-${cfg_ping_deadline}s"; return 1; }
  ping_count "$cfg_peer" 5 || { fail "lost-pings-to-$cfg_peer"; return 1; }
  if [ -n "$cfg_peer6" ]; then
    ping_until_answer "$cfg_peer6" "$cfg_ping_deadline" -6 || { fail "no-answer-from-$cfg_peer6-within-${cfg_ping_deadline}s"; return 1; }
    ping_count "$cfg_peer6" 5 -6 || { fail "lost-pings-to-$cfg_peer6"; return 1; }
  fi
}

# One ping burst pinned to each online CPU: virtio_net maps each CPU to its own TX queue (XPS), so
# with as many queue pairs as CPUs every TX queue carries traffic.
step_ping_each_cpu() {
  local cpu cpus
  cpus=$(grep -c '^processor' /proc/cpuinfo)
  cpu=0
  while [ "$cpu" -lt "$cpus" ]; do
    taskset -c "$cpu" ping -c 10 -i 0.1 -W 2 "$cfg_peer" >/dev/null 2>&1 || { fail "lost-pings-from-cpu-$cpu"; return 1; }
    say "VNET-PING-CPU cpu=$cpu ok"
    cpu=$((cpu + 1))
  done
}

# busybox ping has no "-M do": the fragmentation counters prove instead that the big echo requests
# and replies crossed the link whole (no fragments made here, none reassembled here).
step_ping_big() {
  local frag0 reasm0 ok frag reasm
  ping_until_answer "$cfg_peer" "$cfg_ping_deadline" || { fail "no-answer-from-$cfg_peer"; return 1; }
  frag0=$(snmp_ip FragCreates) reasm0=$(snmp_ip ReasmReqds)
  ping_count "$cfg_peer" 3 -s "$cfg_ping_big_size"
  ok=$?
  frag=$(( $(snmp_ip FragCreates) - frag0 )) reasm=$(( $(snmp_ip ReasmReqds) - reasm0 ))
  say "VNET-PING-BIG size=$cfg_ping_big_size fragments_created=$frag reassemblies=$reasm"
  [ $ok -eq 0 ] || { fail "lost-big-pings"; return 1; }
  if [ $frag -ne 0 ] || [ $reasm -ne 0 ]; then
    fail "fragmented(mtu-too-small-on-a-path)"
    return 1
  fi
}

wait_listening() { # wait_listening PID: until iperf3 listens on 5201 (10 s), or the process died
  local i
  i=0
  while ! listening_on 5201; do
    kill -0 "$1" 2>/dev/null || return 1
    i=$((i + 1))
    [ $i -le 200 ] || return 1
    sleep 0.05
  done
}

step_iperf_server() { # one test, in the foreground
  local json pid
  json=/tmp/iperf-server.json
  iperf3 -s -1 -J >"$json" 2>&1 &
  pid=$!
  wait_listening $pid || { fail "iperf3-server-did-not-start"; return 1; }
  say "VNET-IPERF-SERVER-READY iperf-server port=5201"
  wait $pid
  iperf_report iperf-server "$json"
}

IPERF_BG_LOG=/tmp/iperf-server-bg.log
step_iperf_server_bg() { # a persistent server in the background, text output in $IPERF_BG_LOG
  iperf3 -s --forceflush >"$IPERF_BG_LOG" 2>&1 &
  IPERF_BG_PID=$!
  wait_listening $IPERF_BG_PID || { fail "iperf3-server-did-not-start"; return 1; }
  say "VNET-IPERF-SERVER-READY iperf-server-bg port=5201"
}

step_iperf_server_wait() { # until the background server has served vnet.iperf_tests tests
  local start done_tests
  [ -n "${IPERF_BG_PID:-}" ] || { fail "no-iperf-server-bg-step-before"; return 1; }
  start=$(now_cs)
  while :; do
    # iperf3 announces "Server listening" at start and again after each finished test
    done_tests=$(( $(grep -c 'Server listening' "$IPERF_BG_LOG") - 1 ))
    [ "$done_tests" -ge "$cfg_iperf_tests" ] && break
    kill -0 "$IPERF_BG_PID" 2>/dev/null || { fail "iperf3-server-exited"; return 1; }
    if [ $(( $(now_cs) - start )) -ge $((cfg_iperf_wait * 100)) ]; then
      fail "only-$done_tests-of-$cfg_iperf_tests-tests-within-${cfg_iperf_wait}s"
      return 1
    fi
    sleep 0.2
  done
  grep -E 'sender|receiver' "$IPERF_BG_LOG" | sed 's/^/VNET-IPERF-SERVER-LOG /'
  say "VNET-IPERF-SERVER-TESTS $done_tests"
}

iperf_client() { # iperf_client NAME [iperf3 args]
  local name json start
  name=$1
  shift
  json=/tmp/$name.json
  start=$(now_cs)
  while :; do
    iperf3 -c "$cfg_peer" -t "$cfg_iperf_time" -J --connect-timeout 3000 "$@" >"$json" 2>&1
    # the server may not be up yet: retry refused connections for 30 s
    grep -q 'unable to connect' "$json" || break
    [ $(( $(now_cs) - start )) -lt 3000 ] || break
    sleep 1
  done
  iperf_report "$name" "$json"
}

step_iperf_client() { iperf_client iperf-client; }
step_iperf_client_reverse() { iperf_client iperf-client-reverse -R; }
step_iperf_client_parallel() { iperf_client iperf-client-parallel -P 4; }

step_stats() {
  local dev name counter queue q
  say "== /proc/interrupts (virtio)"
  grep -i virtio /proc/interrupts
  for dev in /sys/class/net/eth*; do
    [ -e "$dev" ] || continue
    name=${dev##*/}
    say "== $name statistics"
    for counter in rx_packets rx_bytes rx_dropped rx_errors tx_packets tx_bytes tx_dropped tx_errors; do
      say "$name $counter $(cat "$dev/statistics/$counter")"
    done
    say "== $name queues"
    for queue in "$dev"/queues/*; do
      q=${queue##*/}
      case "$q" in
        tx-*) say "$name $q tx_timeout=$(cat "$queue/tx_timeout" 2>/dev/null) bql_inflight=$(cat "$queue/byte_queue_limits/inflight" 2>/dev/null) xps_cpus=$(cat "$queue/xps_cpus" 2>/dev/null)" ;;
        rx-*) say "$name $q rps_cpus=$(cat "$queue/rps_cpus" 2>/dev/null)" ;;
      esac
    done
    if command -v ethtool >/dev/null; then
      say "== ethtool -S $name"
      ethtool -S "$name" | grep -E 'queue_[0-9]+_(packets|bytes|kicks|drops|xdp)' | sed 's/^ *//'
    fi
  done
  say "== ip -s link"
  $IP -s link
  return 0
}

step_mtu() { say "VNET-MTU dev=eth0 mtu=$(cat /sys/class/net/eth0/mtu)"; }

step_wait() {
  say "VNET-WAITING"
  while :; do sleep 3600; done
}

step_sleep_loop_ping() { # forever: one ping a second, each result on its own line
  local seq out rtt
  seq=0
  while :; do
    seq=$((seq + 1))
    if out=$(ping -c 1 -W 1 "$cfg_peer" 2>&1); then
      rtt=$(echo "$out" | sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p')
      say "VNET-PING seq=$seq ok rtt_ms=${rtt:-na} t=$(uptime_s)"
      sleep 1
    else
      say "VNET-PING seq=$seq lost t=$(uptime_s)"
    fi
  done
}

PING_FAST_LOG=/tmp/ping-fast.log
step_ping_fast_bg() { # ping every 50 ms for vnet.ping_time seconds, in the background
  ping -i 0.05 -w "$cfg_ping_time" "$cfg_peer" >"$PING_FAST_LOG" 2>&1 &
  PING_FAST_PID=$!
  say "VNET-PING-FAST-STARTED interval_ms=50 seconds=$cfg_ping_time t=$(uptime_s)"
}

# Waits for ping-fast-bg to end and reports what was lost: each run of missing sequence numbers is
# a gap (VNET-PING-GAP, at most 40 lines, the longest first), then the totals (VNET-PING-FAST).
step_ping_fast_wait() {
  local start summary
  [ -n "${PING_FAST_PID:-}" ] || { fail "no-ping-fast-bg-step-before"; return 1; }
  start=$(now_cs)
  while kill -0 "$PING_FAST_PID" 2>/dev/null; do
    if [ $(( $(now_cs) - start )) -ge $(( (cfg_ping_time + 60) * 100 )) ]; then
      kill "$PING_FAST_PID"
      fail "ping-did-not-end"
      return 1
    fi
    sleep 0.2
  done
  # busybox ping's sequence numbers are 16 bits: unwrap them.
  awk '
    /packets transmitted/ { transmitted = $1 }
    /bytes from .*seq=/ {
      if (match($0, /seq=[0-9]+/)) {
        seq = substr($0, RSTART + 4, RLENGTH - 4) + 0
        if (seen_any && seq + base < last - 32768) base += 65536
        seq += base; last = seq; seen_any = 1
        if (!(seq in got)) { got[seq] = 1; received++ }
      }
    }
    /ping: / { error = $0 }
    END {
      # the last echo request may still be unanswered when -w ends it: not counted
      gaps = 0; lost = 0; longest = 0; run = 0; n = transmitted - 1
      for (s = 0; s <= n; s++) {
        if (s < n && !(s in got)) { if (run == 0) first = s; run++; continue }
        if (run > 0) {
          gaps++; lost += run; gap_first[gaps] = first; gap_len[gaps] = run
          if (run > longest) longest = run
          run = 0
        }
      }
      # the longest gaps first (a simple selection: there are few)
      for (n = 1; n <= gaps && n <= 40; n++) {
        best = 0
        for (g = 1; g <= gaps; g++) if (!(g in shown) && (best == 0 || gap_len[g] > gap_len[best])) best = g
        shown[best] = 1
        printf "VNET-PING-GAP first_seq=%d lost=%d\n", gap_first[best], gap_len[best]
      }
      printf "VNET-PING-FAST transmitted=%d received=%d lost=%d gaps=%d longest_gap=%d%s\n", \
        transmitted, received, lost, gaps, longest, (error != "" ? " error=\"" error "\"" : "")
    }' "$PING_FAST_LOG" >/tmp/ping-fast.summary
  cat /tmp/ping-fast.summary
  summary=$(tail -1 /tmp/ping-fast.summary)
  case "$summary" in
    *" error="*) fail "ping-failed"; return 1 ;;
  esac
  # ping must have run its whole time (busybox ping exits on a send error)
  [ "$(echo "$summary" | sed -n 's/.*transmitted=\([0-9]*\).*/\1/p')" -ge $((cfg_ping_time * 10)) ] || { fail "ping-ended-early"; return 1; }
}

max_combined() { ethtool -l eth0 | awk '/^Pre-set maximums/ { pre = 1 } pre && /^Combined:/ { print $2; exit }'; }

set_combined() { # set_combined N NUMBER: ethtool -L eth0 combined N, then a VNET-QUEUES marker
  local out
  if out=$(ethtool -L eth0 combined "$1" 2>&1); then
    say "VNET-QUEUES n=$2 combined=$1 result=ok t=$(uptime_s)"
  else
    say "VNET-QUEUES n=$2 combined=$1 result=fail error=\"$(echo "$out" | tr '\n' ' ')\" t=$(uptime_s)"
    return 1
  fi
}

step_queues_cycle() { # vnet.queue_delay s, combined 1, vnet.queue_delay s, combined back to the maximum
  local max
  max=$(max_combined)
  is_number "$max" && [ "$max" -ge 2 ] || { fail "the-device-has-${max:-no}-combined-channels"; return 1; }
  sleep "$cfg_queue_delay"
  set_combined 1 1 || { fail "ethtool-L-combined-1"; return 1; }
  sleep "$cfg_queue_delay"
  set_combined "$max" 2 || { fail "ethtool-L-combined-$max"; return 1; }
}

step_queues_loop_bg() { # in the background, for ever: every vnet.queue_period s, combined 1 <-> the maximum
  local max
  max=$(max_combined)
  is_number "$max" && [ "$max" -ge 2 ] || { fail "the-device-has-${max:-no}-combined-channels"; return 1; }
  (
    n=0
    while :; do
      sleep "$cfg_queue_period"
      n=$((n + 1))
      if [ $((n % 2)) -eq 1 ]; then set_combined 1 "$n"; else set_combined "$max" "$n"; fi
    done
  ) &
  say "VNET-QUEUES-LOOP period=$cfg_queue_period max=$max"
}

step_shell() { # an interactive shell on the console (boot --interactive); exit it to go on
  printf '%s\n' "alias ip=$IP" "PS1='vnet-guest# '" >/tmp/shrc
  ENV=/tmp/shrc setsid cttyhack sh
  return 0
}

# ---- modules and network -------------------------------------------------------------------------
finish() { # finish ok|fail
  sync
  say "VNET-DONE result=$1 t=$(uptime_s)"
  poweroff -f
  while :; do sleep 3600; done # not reached; PID 1 must never exit
}

bring_up_network() {
  local i queues mac dev module
  [ -n "$cfg_ip6" ] || echo 1 >/proc/sys/net/ipv6/conf/default/disable_ipv6 # no IPv6 chatter
  while read -r module; do
    [ -n "$module" ] || continue
    insmod "/lib/modules/vnet/$module.ko" || { fail "insmod-$module"; return 1; }
  done </etc/vnet/modules
  $IP link set lo up
  i=0
  while [ ! -e /sys/class/net/eth0 ]; do
    i=$((i + 1))
    [ $i -le 100 ] || { fail "no-eth0-after-10s(no-virtio-net-device?)"; return 1; }
    sleep 0.1
  done
  if [ -n "$cfg_mtu" ]; then
    $IP link set eth0 mtu "$cfg_mtu" || { fail "cannot-set-mtu-$cfg_mtu"; return 1; }
  fi
  if [ -n "$cfg_ip6" ]; then
    echo 0 >/proc/sys/net/ipv6/conf/eth0/disable_ipv6
    echo 0 >/proc/sys/net/ipv6/conf/eth0/accept_dad
    $IP -6 addr add "$cfg_ip6" dev eth0 nodad || { fail "cannot-add-$cfg_ip6"; return 1; }
  fi
  $IP addr add "$cfg_ip" dev eth0 || { fail "cannot-add-$cfg_ip"; return 1; }
  for dev in /sys/class/net/eth*; do
    $IP link set "${dev##*/}" up || { fail "cannot-bring-up-${dev##*/}"; return 1; }
  done
  i=0
  while [ "$(cat /sys/class/net/eth0/operstate)" != up ] && [ $i -lt 100 ]; do
    i=$((i + 1))
    sleep 0.1
  done
  queues=$(ls -d /sys/class/net/eth0/queues/rx-* | wc -l)
  mac=$(cat /sys/class/net/eth0/address)
  say "VNET-NET-UP ip=$cfg_ip${cfg_ip6:+ ip6=$cfg_ip6} mtu=$(cat /sys/class/net/eth0/mtu) queues=$queues mac=$mac link=$(cat /sys/class/net/eth0/operstate) t=$(uptime_s)"
}

if ! check_config; then
  say "VNET-STEP-FAIL config $FAIL_REASON"
  finish fail
fi
if ! bring_up_network; then
  say "VNET-STEP-FAIL net-up $FAIL_REASON"
  finish fail
fi

result=ok
for name in $(echo "$cfg_run" | tr ',' ' '); do
  fn=step_$(echo "$name" | tr '-' '_')
  say "VNET-STEP-BEGIN $name t=$(uptime_s)"
  if ! type "$fn" >/dev/null 2>&1; then
    say "VNET-STEP-FAIL $name unknown-step"
    result=fail
    break
  fi
  FAIL_REASON=
  if "$fn"; then
    say "VNET-STEP-OK $name t=$(uptime_s)"
  else
    say "VNET-STEP-FAIL $name ${FAIL_REASON:-failed}"
    result=fail
    break
  fi
done
finish "$result"
