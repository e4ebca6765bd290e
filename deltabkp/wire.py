"""IN PROGRESS (lead): the wire codec. PROTOCOL_PLACEHOLDER = the contract in docs/formats.md,
section "Wire protocol". Code against that contract; this module lands within ~30 minutes."""
