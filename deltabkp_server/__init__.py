"""deltabkp_server: see README; filled in by issue 4."""
