#!/usr/bin/env bash
# The whole system on a real tree: server + agent processes, a first backup, then a ~1% change
# set (bench_archive.py's trees: a real ~106 MB source tree and a changed copy); prints bytes on
# the wire against the archive size, the original design (whole archive on change) and
# `rsync --no-whole-file --stats` of the same archive pair, of the raw trees and of `gzip
# --rsyncable` tgzs of them, and the backup's time (the execution, and ctl's end to end) against
# a full build. Run by hand; asserts nothing.
#   bash benchmarks/bench_system.sh
#
# --append (issue 10: "a tree with a file appended every 100 ms: five consecutive backups each
# <= 1/5 of a full build; each stores an archive identical to a fresh build of what it
# captured"; "an unchanged check after a racy build is a quick check"):
#   bash benchmarks/bench_system.sh --append [--repeat N] [--backups 5] [--period 0.1]
#                                   [--tree DIR] [--log REL] [--log-size B] [--keep-dir]
# The same daemons on a copy of the base tree plus a 1 MiB log, a first backup, then a writer
# process appending a line to the log every 100 ms through five consecutive `backup-now
# --wait`: per backup the execution and end-to-end time against a full build (wall; the
# daemons' CPU against the build's), wire bytes, both daemons' phases, and a check that the
# stored version (`ctl fetch`) is byte-identical to a fresh build of the tree holding what
# it captured (the log at its captured length and mtime, which must be a state the writer
# journalled); then, the writer stopped and the racy window (2 s) past, the check of the
# unchanged tree: its time and whether it was a quick check. Exits 1 only if a stored archive
# is not what it should be. Driver and details: benchmarks/_append.py.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# Bytecode as an installed package has it (pip compiles a wheel's modules): without it
# every short-lived ctl command (and PYTHONDONTWRITEBYTECODE=1 machines) compiles the
# modules it imports on each run, ~0.2 s that no installed system pays.
python -m compileall -q "$HERE/../deltabkp" "$HERE/../deltabkp_server" "$HERE/../deltabkp_agent" >/dev/null
case "${1:-}" in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    --append)
        shift
        # The driver's temp dir goes in here: removed whatever happened (kept with --keep-dir
        # or when the driver says so); the pids it writes there are killed, should the
        # driver itself be killed with -9 before it stopped them.
        W=$(mktemp -d "${TMPDIR:-/tmp}/bench-system-XXXXXX")
        KEEP=0
        case " $* " in *" --keep-dir "*) KEEP=1 ;; esac
        cleanup() {
            [ -s "$W/pids" ] && kill $(cat "$W/pids") 2>/dev/null || true
            [ "$KEEP" = 1 ] || [ -e "$W/keep" ] || rm -rf "$W"
        }
        trap cleanup EXIT
        # In the background so that a TERM or Ctrl-C to this script reaches it at once (it
        # then stops what it started itself); the wait is repeated because a trap interrupts it.
        python "$HERE/_append.py" --work-dir "$W" "$@" & DRIVER=$!
        trap 'kill -TERM "$DRIVER" 2>/dev/null || true' INT TERM
        while :; do
            status=0; wait "$DRIVER" || status=$?
            kill -0 "$DRIVER" 2>/dev/null || break
        done
        exit "$status" ;;
esac
python "$HERE/archive_data.py" >/dev/null   # builds the trees once under _work/archive/
TREES="$HERE/_work/archive"; export TREES
W=$(mktemp -d)
export DELTABKP_KEY_FILE=$W/key; head -c 32 /dev/urandom | xxd -p > $W/key
cp -a "$TREES/base" $W/app
deltabkp-server --listen 127.0.0.1:0 --data-dir $W/data > $W/server.log 2>&1 & SP=$!
deltabkp-agent --listen 127.0.0.1:0 --allow $W/app --cache-dir $W/cache > $W/agent.log 2>&1 & AP=$!
trap 'kill $SP $AP 2>/dev/null; rm -rf "$W"' EXIT
for i in $(seq 600); do grep -q "listening on" $W/server.log $W/agent.log 2>/dev/null && [ $(grep -h "listening on" $W/server.log $W/agent.log | wc -l) = 2 ] && break; sleep 0.1; done
S=$(grep -ho "listening on [0-9.:]*" $W/server.log | awk '{print $3}')
A=$(grep -ho "listening on [0-9.:]*" $W/agent.log | awk '{print $3}')
export S
deltabkp ctl --server $S register $A $W/app --every 60 >/dev/null
for i in $(seq 600); do n=$(deltabkp ctl --server $S --json list $A $W/app | python -c "import json,sys; print(len(json.load(sys.stdin)))"); [ "$n" -ge 1 ] && break; sleep 0.2; done
# --checksum: the change set has a same-size same-mtime edit (archive_data.py) that
# rsync's quick check would skip; the agent sees it by its ctime.
rsync -a --checksum --delete "$TREES/new/" $W/app/
# End to end, as an operator sees it: ctl's start-up, the request, the execution, the answer.
T0=$(date +%s.%N)
deltabkp ctl --server $S --json backup-now $A $W/app --wait > $W/ex.json
T1=$(date +%s.%N)
export E2E_S=$(python -c "print($T1 - $T0)")
deltabkp ctl --server $S list $A $W/app
python - $W <<'PY'
import json, sys, subprocess, glob, os
w = sys.argv[1]
ex = json.load(open(f"{w}/ex.json"))
print("execution:", {k: ex.get(k) for k in ("outcome", "archive_size", "transferred", "changed")})
# The server keeps only the newest whole (older ones become reverse deltas): the old
# archive is rebuilt from the base tree (deterministic: the same bytes as archive 1).
from deltabkp.archive import TgzBuilder
new = max(glob.glob(f"{w}/data/archives/*/*.tgz"), key=lambda p: int(os.path.basename(p)[:-4]))
os.makedirs(f"{w}/rs", exist_ok=True)
with open(f"{w}/rs/a.tgz", "wb") as f:
    f.writelines(TgzBuilder(os.path.join(os.environ["TREES"], "base")))
out = subprocess.run(["rsync", "--no-whole-file", "--stats", new, f"{w}/rs/a.tgz"], capture_output=True, text=True).stdout
sent = [l for l in out.splitlines() if "Total bytes sent" in l or "Total bytes received" in l]
print("rsync:", sent)
tot = sum(int(l.split(":")[1].strip().replace(",", "")) for l in sent)
size = ex["archive_size"]
print(f"archive {size} B; deltabkp on the wire {ex['transferred']} B = {100*ex['transferred']/size:.2f}%; "
      f"whole archive (original design) {size} B = {size/ex['transferred']:.1f}x more; rsync --stats total {tot} B = {100*tot/size:.2f}%")

# Side by side (same run; the machine may be shared: ratios, not absolute times):
# wire bytes both directions as % of our archive, against rsync of the raw tree and of an
# rsyncable tgz (tar | gzip --rsyncable) of the same two trees; and the backup's wall time
# against a full build of the new tree.
import re, shutil, time, datetime
from pathlib import Path
trees = Path(os.environ["TREES"])
def rsync_total(args):
    out = subprocess.run(["rsync", "--no-whole-file", "--stats", *args], capture_output=True, text=True, check=True).stdout
    got = [int(re.sub(r"[,.]", "", m)) for m in re.findall(r"Total bytes (?:sent|received): ([\d,.]+)", out)]
    return sum(got)
shutil.copytree(trees / "base", f"{w}/rs/raw", symlinks=True)
raw = rsync_total(["-a", "--checksum", "--delete", f"{trees}/new/", f"{w}/rs/raw/"])
for name in ("base", "new"):
    subprocess.run(f"tar -C {trees / name} --sort=name -cf - . | gzip --rsyncable -6 > {w}/rs/{name}.rs.tgz", shell=True, check=True)
rsz = os.path.getsize(f"{w}/rs/new.rs.tgz")
rtgz = rsync_total([f"{w}/rs/new.rs.tgz", f"{w}/rs/base.rs.tgz"])
wire = ex["transferred"]
print(f"wire, both directions, % of the archive: deltabkp {100*wire/size:.2f}% ({wire} B) | "
      f"rsync raw tree {100*raw/size:.2f}% ({raw} B) | rsync of gzip --rsyncable tgz {100*rtgz/size:.2f}% "
      f"({rtgz} B; {100*rtgz/rsz:.2f}% of that tgz)")
def when(v):
    return datetime.datetime.fromisoformat(v).timestamp() if isinstance(v, str) else float(v)
took = when(ex["ended"]) - when(ex["started"])
t = time.monotonic()
for _ in TgzBuilder(trees / "new"):
    pass
full = time.monotonic() - t
print(f"backup after the change {took:.2f} s (execution, server side) vs a full build of the new tree "
      f"{full:.2f} s: {took/full:.3f} of a full build")
e2e = float(os.environ["E2E_S"])
print(f"end to end (ctl backup-now --wait: start-up, request, execution, answer) {e2e:.2f} s: "
      f"{e2e/full:.3f} of a full build")
# ctl's own cost (issue 10: < 0.25 s of CPU for a command that talks to a server): user+sys
# of `ctl status`, median of 5, beside a bare interpreter's start-up.
import resource, statistics
def cpu(argv):
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
from deltabkp.testing import console_script  # the installed script, not a version manager's shim
ctl = statistics.median(cpu([console_script("deltabkp"), "ctl", "--server", os.environ["S"], "status"])
                        for _ in range(5))
bare = statistics.median(cpu([sys.executable, "-c", "pass"]) for _ in range(5))
print(f"ctl status: {ctl:.3f} s of CPU (python -c pass: {bare:.3f} s)")
print("load average:", " ".join(f"{x:.1f}" for x in os.getloadavg()), "on", os.cpu_count(), "CPUs")
PY
# Where the backup after the change spent its time, each daemon's per-phase timeline
# (deltabkp._phases; ms wall/cpu).
echo "phases of the backup after the change:"
python "$HERE/_daemonlog.py" $W/agent.log $W/server.log
