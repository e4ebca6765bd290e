"""``deltabkp-agent``: command line, logging, signals; the daemon itself is ``Agent``.

Prints exactly one line on stdout, ``deltabkp-agent listening on HOST:PORT``, once the port
is open (port 0 resolves to the real port, which tests and scripts parse); everything else
goes to stderr.  SIGTERM and SIGINT shut down cleanly: running builds stop at their next
chunk, nothing half-written is cached.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from deltabkp import _config, net
from deltabkp.net import _http as net_http
from deltabkp_agent.agent import Agent, AgentConfig
from deltabkp_agent.allowlist import Allowlist

DEFAULT_LISTEN = f"127.0.0.1:{net.DEFAULT_AGENT_PORT}"

EPILOG = """\
examples:
  # serve two application directories to the server on this machine
  deltabkp-agent --listen 0.0.0.0:7471 --allow /srv/app1 --allow /srv/app2 \\
      --server backup.example.com:7470

  # a throw-away agent on a free port (prints the port it got)
  deltabkp-agent --listen 127.0.0.1:0 --allow ./demo --cache-dir /tmp/agent-cache

then, from anywhere with the same key:
  deltabkp ctl register NODE_HOST:7471 /srv/app1 --every 5

The agent only serves directories whose real path (symlinks and '..' resolved) lies under an
--allow root; anything else is refused with 'path-not-allowed'. Every connection is TLS 1.3
with a certificate on both sides from the CA derived from the cluster key (--key-file, else
$DELTABKP_KEY_FILE, else ~/.config/deltabkp/cluster.key), or from your own PKI (--tls-cert,
--tls-key, --tls-ca), and must also prove the cluster key before a byte of its request is
read. See docs/security.md.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deltabkp-agent",
        description=(
            "The deltabkp agent: serves hot, rsync-style delta backups of allowed directories "
            "on this node to deltabkp servers. It builds a deterministic rsyncable tgz, answers "
            "'unchanged' without reading files when the tree's metadata has not changed, and "
            "otherwise sends only the blocks that differ from the server's last archive."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    net.add_daemon_arguments(
        p, listen=DEFAULT_LISTEN, listen_help=f"address to listen on (default {DEFAULT_LISTEN}; "
        "port 0 picks a free port, printed on stdout)",
    )
    p.add_argument(
        "--allow", action="append", default=[], metavar="ROOT", required=True,
        help="a directory this agent may back up (with everything under it); repeatable",
    )
    p.add_argument(
        "--server", action="append", default=[], metavar="HOST:PORT",
        help="a server to announce this agent to at start-up, so its pending retries run at "
        "once (retried quietly in the background while the server is down); repeatable",
    )
    p.add_argument(
        "--cache-dir", metavar="DIR", default=None,
        help="where signatures and tree fingerprints of produced archives are kept (default "
        "$XDG_CACHE_HOME/deltabkp/agent-PORT, i.e. ~/.cache/deltabkp/agent-PORT)",
    )
    p.add_argument(
        "--exclude", action="append", default=[], metavar="PATTERN",
        help="leave matching files out of every archive (archive exclude pattern); repeatable",
    )
    p.add_argument("--max-builds", type=int, default=2, metavar="N",
                   help="archive builds running at once (default 2; each uses about one core)")
    p.add_argument("--max-signature-mb", type=int, default=128, metavar="MB",
                   help="largest signature accepted from a server, MiB (default 128)")
    p.add_argument("--no-archive-cache", action="store_true",
                   help="do not keep the last archive built per path in the cache dir (it "
                   "makes the next build incremental; costs about one archive of disk per path)")
    p.add_argument("--keep", type=int, default=3, metavar="N",
                   help="cache entries (archive signatures) kept per path (default 3)")
    net_http.add_metrics_arguments(p)
    p.add_argument("--bwlimit", metavar="RATE", default=None,
                   help="cap on the bytes per second this agent sends, all backups together "
                   "(e.g. '1M' = 1 MiB/s, '500K'; KB/MB are powers of 10; default: no cap); a "
                   "target registered with its own --bwlimit gets the lower of the two")
    return p


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    listen = net.Address.parse(args.listen, net.DEFAULT_AGENT_PORT)
    net.at_least_one(args, "max_builds", "max_signature_mb", "keep")
    servers = tuple(net.Address.parse(s, net.DEFAULT_SERVER_PORT) for s in args.server)
    if args.insecure_plaintext:
        for server in servers:
            net.check_plaintext_address(server.host, "--server")
    return AgentConfig(
        key=net.load_key(args.key_file),
        allow=Allowlist.from_args(args.allow),
        host=listen.host,
        port=listen.port,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        servers=servers,
        exclude=tuple(args.exclude),
        max_builds=args.max_builds,
        max_signature=args.max_signature_mb * 1024 * 1024,
        keep=args.keep,
        keep_archives=not args.no_archive_cache,
        max_handshakes=args.max_handshakes,
        metrics_listen=net_http.metrics_address(args),
        bwlimit=net.parse_rate(args.bwlimit) if args.bwlimit else None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    # Flags, then $DELTABKP_*, then the [agent] table of --config, then defaults.
    args = _config.parse_args(build_parser(), argv, "agent")

    def build() -> tuple[net.Starter, None]:
        return Agent(config_from_args(args)).run, None

    return net.daemon_main("deltabkp-agent", args, build)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
