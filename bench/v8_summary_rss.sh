#!/bin/sh
# memscope's memory while it summarizes a V8 heap snapshot of a large JavaScript heap (what
# `--v8-summaries` does for every stored snapshot: the snapshot is parsed as it streams, never
# held). As root, from the workspace, after `cargo build --release -p profiler-user`:
#   sh bench/v8_summary_rss.sh [HEAP_MB]      (default 500)
# Prints the target's heap, the summary's top constructors, and memscope's max RSS and time
# (the time includes the target's pause while V8 walks its heap).
set -eu
MB=${1:-500}
BIN=${MEMSCOPE:-target/release/memscope}
DIR=$(mktemp -d)
# ~MB MiB of small live objects (strings and objects in arrays), as bench/v8_snapshot_rss.sh.
node --max-old-space-size=$((MB * 3)) -e "
const keep = []; const per = 1 << 20;
for (let m = 0; m < $MB; m++) { const a = []; for (let i = 0; i < per / 64; i++) a.push({ i, s: 'x' + i }); keep.push(a);
  if (process.memoryUsage().heapUsed > $MB * per) break; }
console.log('heap', Math.round(process.memoryUsage().heapUsed / per), 'MiB'); setInterval(() => {}, 1000);" > "$DIR/node.out" &
NODE=$!
trap 'kill $NODE 2>/dev/null || true; rm -rf "$DIR"' EXIT
while ! grep -q heap "$DIR/node.out"; do sleep 1; done
cat "$DIR/node.out"
/usr/bin/time -f 'memscope v8 summary: max RSS %M kB, %e s' "$BIN" v8 summary $NODE --top 3
