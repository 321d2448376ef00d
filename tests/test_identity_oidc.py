"""OIDC validation against a real issuer: OpenBao's identity tokens, discovered over HTTP."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

import pytest
from joserfc import jwk

from appliance.config import OIDCSettings
from appliance.identity import IdentityRefused, OIDCValidator
from tests.idsec_fixtures import (
    BaoIssuer, b64url, hs256_with_secret, setup_bao_issuer, sign_with, token_parts, unsigned,
)
from tests.servers import OpenBaoServer, free_port


@pytest.fixture(scope="module")
def issuer(bao_server) -> BaoIssuer:
    return setup_bao_issuer(bao_server)


@pytest.fixture(scope="module")
def other_issuer() -> BaoIssuer:
    # A second, independent real issuer (its own dev server) for the wrong-issuer case.
    server = OpenBaoServer().start()
    try:
        yield setup_bao_issuer(server)
    finally:
        server.stop()


@pytest.fixture()
def settings(issuer) -> OIDCSettings:
    return OIDCSettings(issuer=issuer.issuer, audience=(issuer.client_id,), leeway_s=5)


@pytest.fixture(scope="module")
def attacker_key() -> jwk.RSAKey:
    return jwk.RSAKey.generate_key(2048, private=True)


def refused(validator: OIDCValidator, token: str) -> IdentityRefused:
    with pytest.raises(IdentityRefused) as err:
        validator.validate(token)
    return err.value


def test_openbao_token_validates_through_discovery(issuer, settings):
    token = issuer.mint()
    validator = OIDCValidator(settings)
    info = validator.validate(token)
    header, claims, _ = token_parts(token)
    assert info.subject == issuer.entity_id
    assert info.kid == header["kid"]
    assert info.issuer == issuer.issuer
    assert info.expires_at is not None and int(info.expires_at.timestamp()) == claims["exp"]
    assert info.groups == ("deployers", "ci")
    assert info.claims["team"] == "ops"
    assert validator.fetch_count == 1
    # Keys are cached: a second token costs no fetch.
    validator.validate(issuer.mint())
    assert validator.fetch_count == 1


def test_avalidate_runs_off_the_event_loop(issuer, settings):
    validator = OIDCValidator(settings)
    token = issuer.mint()

    async def main():
        import threading
        loop_thread = threading.get_ident()
        seen = []
        orig = validator.validate

        def spy(tok):
            seen.append(threading.get_ident())
            return orig(tok)

        validator.validate = spy
        info = await validator.avalidate(token)
        return info, seen, loop_thread

    info, seen, loop_thread = asyncio.run(main())
    assert info.subject == issuer.entity_id
    assert seen and seen[0] != loop_thread


def test_key_rotation_is_followed_without_a_new_validator(issuer, settings):
    validator = OIDCValidator(settings)
    before = issuer.mint()
    validator.validate(before)
    known = {k["kid"] for k in issuer.jwks()["keys"]}
    # OpenBao pre-publishes the next key, so rotate twice to sign with a key the cache never saw.
    issuer.rotate()
    issuer.rotate()
    after = issuer.mint()
    new_kid = token_parts(after)[0]["kid"]
    assert new_kid not in known
    info = validator.validate(after)
    assert info.kid == new_kid
    assert validator.fetch_count == 2
    # Tokens signed before the rotation still verify while OpenBao publishes the old key.
    assert validator.validate(before).kid == token_parts(before)[0]["kid"]


def test_expired_token_refused_and_leeway_applies(issuer, settings):
    token = issuer.mint()
    exp = token_parts(token)[1]["exp"]
    within = OIDCValidator(replace(settings, leeway_s=30), clock=lambda: exp + 10)
    assert within.validate(token).subject == issuer.entity_id
    err = refused(OIDCValidator(replace(settings, leeway_s=30), clock=lambda: exp + 31), token)
    assert err.reason == "expired" and err.sqlstate == "28P01"
    assert "expired" in err.message


def test_not_yet_valid_token_refused(issuer, settings):
    token = issuer.mint()
    nbf = token_parts(token)[1]["nbf"]
    err = refused(OIDCValidator(settings, clock=lambda: nbf - 3600), token)
    assert err.reason == "not_yet_valid"


def test_wrong_audience_refused(issuer, settings):
    err = refused(OIDCValidator(replace(settings, audience=("some-other-service",))), issuer.mint())
    assert err.reason == "audience"
    assert issuer.client_id in err.message


def test_token_from_another_real_issuer_refused(issuer, other_issuer, settings):
    err = refused(OIDCValidator(settings), other_issuer.mint())
    assert err.reason == "issuer"
    assert other_issuer.issuer in err.message


def test_discovery_naming_another_issuer_is_refused(issuer, other_issuer, settings):
    # Discovery fetched from the other server while the config names ours: misconfiguration, fail closed.
    validator = OIDCValidator(replace(settings, discovery_url=other_issuer.issuer))
    err = refused(validator, issuer.mint())
    assert err.reason == "issuer"
    assert "discovery" in err.message


def test_altered_payload_fails_signature(issuer, settings):
    token = issuer.mint()
    h, p, s = token.split(".")
    _, claims, _ = token_parts(token)
    claims["sub"] = "someone-else"
    import json
    forged = f"{h}.{b64url(json.dumps(claims).encode())}.{s}"
    err = refused(OIDCValidator(settings), forged)
    assert err.reason == "signature"


def test_token_signed_by_another_key_under_the_real_kid_fails_signature(issuer, settings, attacker_key):
    header, claims, _ = token_parts(issuer.mint())
    forged = sign_with(attacker_key, {"alg": "RS256", "kid": header["kid"]}, claims)
    assert refused(OIDCValidator(settings), forged).reason == "signature"


def test_alg_none_refused(issuer, settings):
    header, claims, _ = token_parts(issuer.mint())
    for alg in ("none", "None", "NONE"):
        err = refused(OIDCValidator(settings), unsigned({"alg": alg, "kid": header["kid"]}, claims))
        assert err.reason == "algorithm"


def test_hs256_with_public_key_as_secret_refused(issuer, settings):
    header, claims, _ = token_parts(issuer.mint())
    public = next(k for k in issuer.jwks()["keys"] if k["kid"] == header["kid"])
    pem = jwk.import_key(public).as_pem(private=False)
    forged = hs256_with_secret({"alg": "HS256", "kid": header["kid"]}, claims, pem)
    err = refused(OIDCValidator(settings), forged)
    assert err.reason == "algorithm"
    # The allow-list itself cannot be configured to accept HMAC or none.
    with pytest.raises(ValueError):
        replace(settings, algorithms=("RS256", "HS256"))


def test_algorithm_not_in_allow_list_refused(issuer, settings):
    # RS256 is what OpenBao signs with; an allow-list without it refuses a genuine token.
    err = refused(OIDCValidator(replace(settings, algorithms=("ES256",))), issuer.mint())
    assert err.reason == "algorithm"


def test_rs_algorithm_against_ec_key_refused(issuer, settings, attacker_key):
    # An ES256 token naming an RSA key id: the algorithm does not fit the key type.
    header, claims, _ = token_parts(issuer.mint())
    ec = jwk.ECKey.generate_key("P-256", private=True)
    forged = sign_with(ec, {"alg": "ES256", "kid": header["kid"]}, claims)
    assert refused(OIDCValidator(settings), forged).reason == "algorithm"


def test_unknown_kid_refused_after_one_rate_limited_refresh(issuer, settings, attacker_key):
    validator = OIDCValidator(replace(settings, jwks_min_refresh_s=3600))
    validator.validate(issuer.mint())
    assert validator.fetch_count == 1
    _, claims, _ = token_parts(issuer.mint())
    forged = sign_with(attacker_key, {"alg": "RS256", "kid": "bw-forged-kid"}, claims)
    err = refused(validator, forged)
    assert err.reason == "unknown_kid"
    assert validator.fetch_count == 2  # refreshed once before refusing
    for _ in range(5):
        assert refused(validator, forged).reason == "unknown_kid"
    assert validator.fetch_count == 2  # the burst did not reach the issuer


@pytest.mark.parametrize("garbage", ["", "   ", "garbage", "a.b", "a.b.c", "e30.e30", "bm90anNvbg.e30.",
                                     "W10.e30.", "x" * 20000])
def test_garbage_refused_as_malformed(settings, garbage):
    err = refused(OIDCValidator(settings), garbage)
    assert err.reason == "malformed" and err.sqlstate == "28P01"


def test_required_claim_missing_refused(issuer, settings):
    validator = OIDCValidator(replace(settings, required_claims=("sub", "exp", "iat", "email")))
    err = refused(validator, issuer.mint())
    assert err.reason == "missing_claim" and "email" in err.message


def test_issuer_unreachable_refused(settings, issuer):
    dead = f"http://127.0.0.1:{free_port()}/v1/identity/oidc"
    err = refused(OIDCValidator(replace(settings, issuer=dead, http_timeout_s=2)), issuer.mint())
    assert err.reason == "issuer"  # the token names the real issuer, not the configured one
    # With our issuer named but discovery pointing nowhere, it is unreachable (and 28000).
    err = refused(OIDCValidator(replace(settings, discovery_url=dead, http_timeout_s=2)), issuer.mint())
    assert err.reason == "issuer_unreachable" and err.sqlstate == "28000"


def test_session_expiry_helper(issuer, settings):
    token = issuer.mint()
    exp = token_parts(token)[1]["exp"]
    now = [time.time()]
    validator = OIDCValidator(settings, clock=lambda: now[0])
    info = validator.validate(token)
    expiry = validator.session_expiry(info)
    assert expiry.policy == "end"
    assert 0 < expiry.remaining() <= 600
    assert expiry.check() is None
    now[0] = exp + 1
    message = expiry.check()
    assert message and "expired" in message and "on_expiry" in message
    assert asyncio.run(asyncio.wait_for(expiry.wait(), 5)) == message
    recheck = OIDCValidator(replace(settings, on_expiry="recheck")).session_expiry(info)
    assert recheck.policy == "recheck"


def test_no_token_text_in_errors_or_logs(issuer, settings, attacker_key, caplog):
    caplog.set_level(logging.DEBUG)
    real = issuer.mint()
    header, claims, sig = token_parts(real)
    _, payload_part, _ = real.split(".")
    forged_sig = sign_with(attacker_key, {"alg": "RS256", "kid": header["kid"]}, claims)
    bad = [
        real[:-4] + "AAAA",
        sign_with(attacker_key, {"alg": "RS256", "kid": "bw-unknown"}, claims),
        forged_sig,
        unsigned({"alg": "none", "kid": header["kid"]}, claims),
        "garbage." + payload_part + ".x",
    ]
    validators = [OIDCValidator(settings), OIDCValidator(replace(settings, audience=("nope",))),
                  OIDCValidator(settings, clock=lambda: claims["exp"] + 3600)]
    errors = []
    for v in validators:
        for tok in [real, *bad]:
            try:
                v.validate(tok)
            except IdentityRefused as e:
                errors.append((tok, e))
    assert len(errors) >= 15
    texts = [m.getMessage() for m in caplog.records] + [str(e) + repr(e) + e.message for _, e in errors]
    secrets = {sig, payload_part, forged_sig.split(".")[2], real}
    for text in texts:
        for s in secrets:
            assert s not in text


def test_fuzzed_tokens_only_ever_raise_identity_refused():
    from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

    # The issuer is a closed port: a fuzzed token that got as far as fetching keys is refused as
    # unreachable, still an IdentityRefused. Nothing else may escape.
    dead = f"http://127.0.0.1:{free_port()}/v1/identity/oidc"
    validator = OIDCValidator(OIDCSettings(issuer=dead, audience=("a",), http_timeout_s=1, jwks_min_refresh_s=3600))
    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                               lambda xs: st.lists(xs, max_size=3) | st.dictionaries(st.text(max_size=5), xs,
                                                                                     max_size=3), max_leaves=6)
    headers = st.fixed_dictionaries({"alg": st.sampled_from(["RS256", "ES256", "EdDSA", "none", "HS256", 1])},
                                    optional={"kid": json_values, "crit": json_values})
    claims = st.fixed_dictionaries({}, optional={"iss": st.sampled_from([dead, "x", 5]), "exp": json_values,
                                                 "nbf": json_values, "iat": json_values, "aud": json_values,
                                                 "sub": json_values})
    import json as _json

    def compact(h, c, sig):
        return f"{b64url(_json.dumps(h).encode())}.{b64url(_json.dumps(c).encode())}.{sig}"

    tokens = st.text(max_size=64) | st.builds(compact, headers, claims, st.text(
        alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", max_size=40))

    @hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(tokens)
    def check(token):
        with pytest.raises(IdentityRefused):
            validator.validate(token)

    check()


@pytest.mark.filterwarnings("ignore:EdDSA is deprecated")  # pytest resets the module-level filter
@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA"])
def test_ec_and_eddsa_issuers(bao_server, algorithm):
    issuer = setup_bao_issuer(bao_server, algorithm=algorithm)
    token = issuer.mint()
    assert token_parts(token)[0]["alg"] == algorithm
    settings = OIDCSettings(issuer=issuer.issuer, audience=(issuer.client_id,))
    assert OIDCValidator(settings).validate(token).subject == issuer.entity_id
    # Not on the allow-list: refused even though the signature is genuine.
    only_rsa = replace(settings, algorithms=("RS256",))
    assert refused(OIDCValidator(only_rsa), token).reason == "algorithm"
