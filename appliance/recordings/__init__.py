"""Session recordings: what a bot sent and saw, kept as ``recordings`` rows, and read back.

A front writes its session's stream through ``SessionCore.record(direction, data)``: "in" (bot to
target), "out" (target to bot, after masking, with botwarden's own notices and errors) and
"event" (a JSON document). This package is pure (no I/O) and used on both sides of the store:

``pgstream``  PostgreSQL recordings: framing, the audit process's redaction of each chunk (no
              statement constant, parameter or error text a detector flags is kept), and the
              parse back into exchanges (statement → results) for replay and export
``render``    a PostgreSQL session as psql shows it, with the audit's decisions and approvals
``export``    asciicast v2, pcap (scapy) and JSON lines
``load``      a session's rows from the audit store, through the control API or the file
"""
