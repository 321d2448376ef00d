"""The test suite's real servers start and answer."""


def test_postgres_answers(pg_server):
    assert pg_server.psql("SELECT 1 + 1") == "2"
    assert pg_server.psql("SHOW ssl") == "on"


def test_openbao_answers(bao_server):
    client = bao_server.client()
    assert client.is_authenticated()
    client.secrets.kv.v2.create_or_update_secret(path="probe", secret={"k": "v"})
    got = client.secrets.kv.v2.read_secret_version(path="probe", raise_on_deleted_version=True)
    assert got["data"]["data"] == {"k": "v"}
