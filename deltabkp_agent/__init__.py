"""deltabkp_agent: see README; filled in by issue 4."""
