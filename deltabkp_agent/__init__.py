"""deltabkp_agent: the agent that runs on each application node and serves its backups.

A Trio daemon (``deltabkp-agent``) that a deltabkp server connects to: it authenticates the
server (shared cluster key), serves only directories under its ``--allow`` roots, answers
"unchanged" from a metadata fingerprint without reading files when nothing changed, and
otherwise streams the delta of a fresh deterministic tgz against the server's last archive.
Modules: ``agent`` (listener, dispatch, announce), ``backup`` (one request), ``allowlist``,
``cache`` (signatures and fingerprints on disk), ``__main__`` (command line).
"""

from __future__ import annotations

from deltabkp_agent.agent import Agent, AgentConfig
from deltabkp_agent.allowlist import Allowlist
from deltabkp_agent.cache import AgentCache, default_cache_dir

__all__ = ["Agent", "AgentConfig", "Allowlist", "AgentCache", "default_cache_dir"]
