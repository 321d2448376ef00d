"""The test suite's real servers: the same ones the demo starts (appliance.sandbox)."""

from appliance.sandbox import (  # noqa: F401
    PG_BIN,
    SUPERUSER_PASSWORD,
    OpenBaoServer,
    PostgresServer,
    bao_binary,
    free_port,
    wait_for_port,
)
