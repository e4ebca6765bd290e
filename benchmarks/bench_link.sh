#!/usr/bin/env bash
# A backup over a 10 Mbit/s link, real daemons: deltabkp against the original design and rsync.
#
#   bash benchmarks/bench_link.sh [--repeat N] [--tree DIR] [--rate 10mbit] [--json OUT]
#                                 [--keep-dir]
#
# Two network namespaces, `server` and `agent` (deltabkp.testing.NetLab: veth pairs to a
# bridge), the agent's link shaped to 10 Mbit/s both ways with `tc tbf` (netem is not in this
# kernel). deltabkp-server runs in `server`, deltabkp-agent in `agent`; every client runs
# inside a namespace (`ip netns exec`). On the stdlib benchmark tree (benchmarks/archive_data.py,
# built once) or on `--tree DIR` (a seeded ~1 % change set is applied to a copy), each repeat
# starts from nothing and measures:
#   - a link check: 4 MiB of zeros over raw TCP (the shaping gives what it claims: ~9.5 Mbit/s
#     of payload at 10mbit);
#   - deltabkp's first (full) backup (`ctl register` until the server logs its end);
#   - ours: `ctl backup-now --wait` after the ~1 % change;
#   - the control: ours again, same daemons and change, the link unshaped (a second copy of
#     the base tree): what the link itself costs is the difference of the two rows;
#   - the original design: `tar | gzip -6` of the changed tree, the whole archive streamed
#     over the link into a receiver (python sockets, benchmarks/_link.py send|recv);
#   - `deltabkp archive` of the changed tree (the build rsync needs; its hash must be the
#     stored archive's), and `rsync --stats` of the archive pair: rsync daemon in `server`
#     holding the base archive, client in `agent`; alone and as build + rsync.
# It prints a markdown table per repeat — method, wall s, bytes on the wire each direction
# (the agent's eth0 counters: link layer, headers included), what the tool says it moved,
# wall / ours — and with --repeat > 1 the medians; under each table, where deltabkp's wall time
# went (until the server started the execution: ctl's start-up and the claim; the agent until
# it served the backup; the server after it; the end of --wait), both daemons' per-phase
# timelines of that backup (their "phases" log lines, ms wall/cpu) and the load average. Ratios
# are side by side in one run; on a shared machine, run it when it is quiet and quote the
# load next to any figure. --json OUT writes every row; --keep-dir keeps the daemons' logs.
# Needs root, iproute2, nftables, tc, rsync, tar, gzip. A benchmark: it asserts nothing about
# time (it fails only when a method did not do its job). The namespaces, the processes in
# them and the temp dir are removed on every exit path (the driver's own cleanup, and this
# script's trap for a driver killed with -9). Driver and details: benchmarks/_link.py.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# Bytecode as an installed package has it (pip compiles a wheel's modules): without it
# every short-lived ctl command (and PYTHONDONTWRITEBYTECODE=1 machines) compiles the
# modules it imports on each run, ~0.2 s that no installed system pays.
python -m compileall -q "$HERE/../deltabkp" "$HERE/../deltabkp_server" "$HERE/../deltabkp_agent" >/dev/null
ROOT=$(dirname "$HERE")
PY=${PYTHON:-python}
case "${1:-}" in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
# The working tree's code, whatever the installed copy points at.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
[ "$(id -u)" = 0 ] || { echo "bench_link.sh: network namespaces need root" >&2; exit 1; }
for tool in ip tc nft rsync tar gzip ss; do
    command -v "$tool" >/dev/null || { echo "bench_link.sh: $tool is not installed" >&2; exit 1; }
done
# The driver's temp dir goes in here, so that this script can remove it whatever happened.
W=$(mktemp -d "${TMPDIR:-/tmp}/bench-link-XXXXXX")
KEEP=0
case " $* " in *" --keep-dir "*) KEEP=1 ;; esac
# Sweeps this benchmark's namespaces whose creating process is gone (a driver killed with -9:
# the processes still inside them are killed with them), then removes the temp dir.
cleanup() {
    "$PY" -c "from deltabkp.testing._netns import sweep; sweep('dbklink-')" || true
    [ "$KEEP" = 1 ] || rm -rf "$W"
}
trap cleanup EXIT
# The driver runs in the background so that a TERM to this script reaches it at once (it then
# tears its lab down itself); the wait is repeated because a trap interrupts it.
"$PY" "$HERE/_link.py" --work-dir "$W" "$@" & DRIVER=$!
trap 'kill -TERM "$DRIVER" 2>/dev/null || true' INT TERM
while :; do
    status=0; wait "$DRIVER" || status=$?
    kill -0 "$DRIVER" 2>/dev/null || break
done
exit "$status"
