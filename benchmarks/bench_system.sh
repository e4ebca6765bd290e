#!/usr/bin/env bash
# The whole system on a real tree: server + agent processes, a first backup, then a ~1% change
# set (bench_archive.py's trees: a real ~106 MB source tree and a changed copy); prints bytes on
# the wire against the archive size, the original design (whole archive on change) and
# `rsync --no-whole-file --stats` of the same archive pair. Run by hand; asserts nothing.
#   bash benchmarks/bench_system.sh
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
python "$HERE/archive_data.py" >/dev/null   # builds the trees once under _work/archive/
TREES="$HERE/_work/archive"
W=$(mktemp -d)
export DELTABKP_KEY_FILE=$W/key; head -c 32 /dev/urandom | xxd -p > $W/key
cp -a "$TREES/base" $W/app
deltabkp-server --listen 127.0.0.1:0 --data-dir $W/data > $W/server.log 2>&1 & SP=$!
deltabkp-agent --listen 127.0.0.1:0 --allow $W/app --cache-dir $W/cache > $W/agent.log 2>&1 & AP=$!
trap 'kill $SP $AP 2>/dev/null; rm -rf "$W"' EXIT
for i in $(seq 100); do grep -q "listening on" $W/server.log $W/agent.log 2>/dev/null && [ $(grep -h "listening on" $W/server.log $W/agent.log | wc -l) = 2 ] && break; sleep 0.1; done
S=$(grep -ho "listening on [0-9.:]*" $W/server.log | awk '{print $3}')
A=$(grep -ho "listening on [0-9.:]*" $W/agent.log | awk '{print $3}')
deltabkp ctl --server $S register $A $W/app --every 60 >/dev/null
for i in $(seq 600); do n=$(deltabkp ctl --server $S --json list $A $W/app | python -c "import json,sys; print(len(json.load(sys.stdin)))"); [ "$n" -ge 1 ] && break; sleep 0.2; done
rsync -a --delete "$TREES/new/" $W/app/
deltabkp ctl --server $S --json backup-now $A $W/app --wait > $W/ex.json
deltabkp ctl --server $S list $A $W/app
python - $W <<'PY'
import json, sys, subprocess, glob, os
w = sys.argv[1]
ex = json.load(open(f"{w}/ex.json"))
print("execution:", {k: ex.get(k) for k in ("outcome", "archive_size", "transferred", "changed")})
tgz = sorted(glob.glob(f"{w}/data/archives/*/*.tgz"))
old, new = tgz[0], tgz[1]
os.makedirs(f"{w}/rs", exist_ok=True)
subprocess.run(["cp", old, f"{w}/rs/a.tgz"], check=True)
out = subprocess.run(["rsync", "--no-whole-file", "--stats", new, f"{w}/rs/a.tgz"], capture_output=True, text=True).stdout
sent = [l for l in out.splitlines() if "Total bytes sent" in l or "Total bytes received" in l]
print("rsync:", sent)
tot = sum(int(l.split(":")[1].strip().replace(",", "")) for l in sent)
size = ex["archive_size"]
print(f"archive {size} B; deltabkp on the wire {ex['transferred']} B = {100*ex['transferred']/size:.2f}%; "
      f"whole archive (original design) {size} B = {size/ex['transferred']:.1f}x more; rsync --stats total {tot} B = {100*tot/size:.2f}%")
PY
