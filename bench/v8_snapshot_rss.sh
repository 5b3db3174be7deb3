#!/bin/sh
# Agent memory while it streams a V8 heap snapshot of a large JavaScript heap, and the pause
# of the target while V8 takes it. As root, from the workspace, after
# `cargo build --release -p profiler-user`:
#   sh bench/v8_snapshot_rss.sh [HEAP_MB]      (default 500)
# Prints the target's heap, the snapshot's size, the time to the first byte (the pause: V8
# walks the heap with the target stopped before it streams), the total time, and the agent's
# peak RSS (VmHWM) before and after.
set -eu
MB=${1:-500}
BIN=${MEMSCOPE:-target/release/memscope}
DIR=$(mktemp -d)
trap 'kill $NODE $AGENT 2>/dev/null || true; rm -rf "$DIR"' EXIT
# ~MB MiB of small live objects (strings and objects in arrays).
node --max-old-space-size=$((MB * 3)) -e "
const keep = []; const per = 1 << 20;
for (let m = 0; m < $MB; m++) { const a = []; for (let i = 0; i < per / 64; i++) a.push({ i, s: 'x' + i }); keep.push(a);
  if (process.memoryUsage().heapUsed > $MB * per) break; }
console.log('heap', Math.round(process.memoryUsage().heapUsed / per), 'MiB'); setInterval(() => {}, 1000);" > "$DIR/node.out" &
NODE=$!
while ! grep -q heap "$DIR/node.out"; do sleep 1; done
cat "$DIR/node.out"
umask 077; printf 'bench admin %s\n' "bench-admin-token-0123456789" > "$DIR/tokens"
$BIN agent --tokens "$DIR/tokens" --listen 127.0.0.1:7499 --data-dir "$DIR/data" --request-timeout 900s --pid $NODE 2> "$DIR/agent.log" &
AGENT=$!
until curl -fsS http://127.0.0.1:7499/healthz > /dev/null 2>&1; do sleep 0.5; done
hwm() { awk '/VmHWM/ {print $2}' /proc/$AGENT/status; }
echo "agent VmHWM before: $(hwm) kB"
curl -fsS -H "Authorization: Bearer bench-admin-token-0123456789" -o /dev/null \
  -w 'snapshot: %{size_download} bytes, first byte after %{time_starttransfer} s, total %{time_total} s\n' \
  http://127.0.0.1:7499/v1/targets/$NODE/v8/heap-snapshot
echo "agent VmHWM after:  $(hwm) kB"
