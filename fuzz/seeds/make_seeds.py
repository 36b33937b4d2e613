#!/usr/bin/env python3
"""Writes the fuzz seed corpus: a few well-formed inputs per target, so the fuzzer
starts past the parsers' first checks. Run from this folder; needs `cryptography`."""
import base64, hashlib, json, os, pathlib
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives import serialization

ROOT = pathlib.Path(__file__).resolve().parent
EXAMPLES = ROOT.parent.parent / "examples"

def b64(b): return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
def seg(o): return b64(json.dumps(o, separators=(",", ":")).encode())

key = Ed25519PrivateKey.generate()
x = b64(key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
jwk = {"kty": "OKP", "crv": "Ed25519", "x": x}

def jws(header, claims):
    signing_input = f"{seg(header)}.{seg(claims)}"
    return f"{signing_input}.{b64(key.sign(signing_input.encode()))}"

def write(target, name, data):
    d = ROOT / target
    d.mkdir(exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())

now = 1_800_000_000
ath = b64(hashlib.sha256(b"token").digest())
write("dpop_proof", "valid", jws({"typ": "dpop+jwt", "alg": "EdDSA", "jwk": jwk},
      {"jti": "j1", "htm": "POST", "htu": "https://lapse.example/oauth/token", "iat": now, "ath": ath}))
write("dpop_proof", "no-ath", jws({"typ": "dpop+jwt", "alg": "EdDSA", "jwk": jwk},
      {"jti": "j2", "htm": "GET", "htu": "https://lapse.example/x", "iat": now - 100}))
write("identity_token", "jwt", jws({"alg": "EdDSA", "typ": "JWT", "kid": "k1"},
      {"iss": "https://issuer.example", "sub": "spiffe://example.org/ci", "aud": "lapse",
       "iat": now, "nbf": now, "exp": now + 600, "repository": "acme/shop"}))
write("access_token", "at", jws({"alg": "EdDSA", "typ": "at+jwt", "kid": "k1"},
      {"iss": "https://lapse.example", "sub": "spiffe://example.org/ci", "aud": "orders-db",
       "exp": now + 300, "iat": now, "nbf": now, "jti": "t1", "client_id": "spiffe://example.org/ci",
       "scope": "read", "cnf": {"jkt": "abc"}, "task": "T-1", "grant_id": "gr_" + "0" * 32}))
write("config", "replicas", (EXAMPLES / "replicas" / "lapse.toml").read_text())
write("config", "minimal", 'listen = "127.0.0.1:7800"\nstore = "sqlite://lapse.db"\npolicies = "p"\n'
      'max_ttl = "15m"\nsigning_key = "k.pem"\n[limits]\ntoken_per_source = "5/s"\n'
      '[[issuer]]\nissuer = "https://i"\njwks = "file://j.json"\naudience = "lapse"\n')
policies = sorted((EXAMPLES / "policies").glob("*.cedar"))
schema = "".join(p.read_text() for p in sorted((EXAMPLES / "policies").glob("*.cedarschema")))
for p in policies:
    write("policy", p.stem, p.read_text() + "\0" + schema)
# An exported chain: the checkpoint line, then entries linked by hash.
prev = "0" * 64
lines = []
for seq in range(1, 4):
    data = json.dumps({"n": seq}, separators=(",", ":"))
    canon = json.dumps([seq, 1000 + seq, "grant.issued", "gr_" + "1" * 32, "lapse", data, prev],
                       separators=(",", ":"))
    h = hashlib.sha256(canon.encode()).hexdigest()
    lines.append(json.dumps({"seq": seq, "at": 1000 + seq, "kind": "grant.issued",
                             "grant_id": "gr_" + "1" * 32, "actor": "lapse", "data": data,
                             "prev_hash": prev, "hash": h}))
    prev = h
checkpoint = json.dumps({"seq": 3, "hash": prev, "kid": "k1", "signature": "00" * 64, "at": 1})
write("audit_import", "chain", "\n".join([checkpoint] + lines) + "\n")
proof = (ROOT / "dpop_proof" / "valid").read_text()
form = ("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&subject_token="
        + (ROOT / "identity_token" / "jwt").read_text()
        + "&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt&audience=orders-db"
          "&scope=read&task=T-1&purpose=p")
write("http_api", "token", bytes([0]) + proof.encode() + b"\n" + form.encode())
write("http_api", "access-request", bytes([1]) + proof.encode() + b"\n" + json.dumps(
    {"identity_token": "x", "audience": "orders-db", "actions": ["read"],
     "task": {"id": "T", "purpose": "p"}, "ttl": "5m"}).encode())
write("http_api", "introspect", bytes([2]) + b"\ntoken=abc")
write("http_api", "signal", bytes([4]) + b"\n" + json.dumps(
    {"type": "task-ended", "subject": {"task": "T-1"}, "reason": "done"}).encode())
write("http_api", "usage", bytes([5]) + b"\n" + json.dumps(
    {"uses": [{"grant": "gr_" + "2" * 32, "at": 1}]}).encode())
write("http_api", "approve", bytes([7]) + b"\n" + json.dumps({"reason": "CHG-1", "ttl": "5m"}).encode())
