//! Authentication, server side (the proxy checking its clients: SCRAM-SHA-256,
//! md5) and client side helpers (pgshift logging into a server).

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use super::WireError;

type HmacSha256 = Hmac<Sha256>;

const SCRAM_ITERATIONS: u32 = 4096;

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data);
    m.finalize().into_bytes().into()
}

/// PBKDF2-HMAC-SHA256 with one output block ("Hi" in RFC 5802).
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut s = salt.to_vec();
    s.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(password, &s);
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
        for (o, x) in out.iter_mut().zip(u.iter()) {
            *o ^= x;
        }
    }
    out
}

/// A SCRAM-SHA-256 verifier: what a server stores instead of the password.
/// Computed once per configured user, so a login costs no PBKDF2.
#[derive(Clone)]
pub(crate) struct ScramVerifier {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramVerifier(***)")
    }
}

impl ScramVerifier {
    pub(crate) fn from_password(password: &str) -> ScramVerifier {
        let mut salt = vec![0u8; 16];
        rand::fill(&mut salt[..]);
        Self::with_salt(password, salt, SCRAM_ITERATIONS)
    }

    pub(crate) fn with_salt(password: &str, salt: Vec<u8>, iterations: u32) -> ScramVerifier {
        // SASLprep; PostgreSQL falls back to the raw bytes when it fails.
        let normalized = stringprep::saslprep(password)
            .map(|c| c.into_owned())
            .unwrap_or_else(|_| password.to_string());
        let salted = hi(normalized.as_bytes(), &salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let server_key = hmac(&salted, b"Server Key");
        ScramVerifier {
            salt,
            iterations,
            stored_key,
            server_key,
        }
    }
}

/// The keys a password yields for one salt and iteration count: what PBKDF2
/// costs. A server sends a role the same salt at every login, so they are
/// remembered: a pool of logins (pre-warming hundreds of backends, each on
/// the relay thread of its session) pays PBKDF2 once per role, not once per
/// backend. Keyed by the password's hash, never the password; bounded.
fn client_keys(password: &str, salt: &[u8], iterations: u32) -> ([u8; 32], [u8; 32]) {
    type Key = ([u8; 32], Vec<u8>, u32);
    type Keys = std::sync::Mutex<HashMap<Key, ([u8; 32], [u8; 32])>>;
    static KEYS: std::sync::LazyLock<Keys> = std::sync::LazyLock::new(Default::default);
    let key: Key = (Sha256::digest(password).into(), salt.to_vec(), iterations);
    if let Some(k) = KEYS.lock().ok().and_then(|m| m.get(&key).copied()) {
        return k;
    }
    // SASLprep; PostgreSQL falls back to the raw bytes when it fails.
    let normalized = stringprep::saslprep(password)
        .map(|c| c.into_owned())
        .unwrap_or_else(|_| password.to_string());
    let salted = hi(normalized.as_bytes(), salt, iterations);
    let keys = (hmac(&salted, b"Client Key"), hmac(&salted, b"Server Key"));
    if let Ok(mut m) = KEYS.lock() {
        if m.len() >= 256 {
            m.clear();
        }
        m.insert(key, keys);
    }
    keys
}

/// Client side of one SCRAM-SHA-256 exchange (no channel binding): pgshift
/// logging into a server.
pub(crate) struct ScramClient {
    password: String,
    client_first_bare: String,
    nonce: String,
    /// After the server-first-message: the AuthMessage and the server key.
    expect: Option<(String, [u8; 32])>,
}

impl std::fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramClient(***)")
    }
}

impl ScramClient {
    /// Starts an exchange; returns it and the client-first-message.
    pub fn start(password: &str) -> (ScramClient, String) {
        let mut raw = [0u8; 18];
        rand::fill(&mut raw[..]);
        let nonce = B64.encode(raw);
        // The user name is the startup packet's; PostgreSQL ignores this one.
        let client_first_bare = format!("n=,r={nonce}");
        let first = format!("n,,{client_first_bare}");
        (
            ScramClient {
                password: password.to_string(),
                client_first_bare,
                nonce,
                expect: None,
            },
            first,
        )
    }

    /// Takes the server-first-message; returns the client-final-message.
    pub fn server_first(&mut self, msg: &[u8]) -> Result<String, WireError> {
        let msg = std::str::from_utf8(msg)
            .map_err(|_| WireError::Protocol("SCRAM server-first-message is not UTF-8".into()))?;
        let field = |name: &str| msg.split(',').find_map(|kv| kv.strip_prefix(name));
        let bad = |what: &str| WireError::Protocol(format!("SCRAM server-first-message: {what}"));
        let nonce = field("r=").ok_or_else(|| bad("no nonce"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() <= self.nonce.len() {
            return Err(bad("the nonce does not extend the client's"));
        }
        let salt = field("s=")
            .and_then(|s| B64.decode(s).ok())
            .ok_or_else(|| bad("no valid salt"))?;
        let iterations: u32 = field("i=")
            .and_then(|i| i.parse().ok())
            .filter(|i| *i > 0)
            .ok_or_else(|| bad("no valid iteration count"))?;
        let (client_key, server_key) = client_keys(&self.password, &salt, iterations);
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{msg},{without_proof}", self.client_first_bare);
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature.iter())
            .map(|(k, s)| k ^ s)
            .collect();
        self.expect = Some((auth_message, server_key));
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server-final-message: the server knew the password too.
    pub fn server_final(self, msg: &[u8]) -> Result<(), WireError> {
        let msg = std::str::from_utf8(msg)
            .map_err(|_| WireError::Protocol("SCRAM server-final-message is not UTF-8".into()))?;
        if let Some(e) = msg.strip_prefix("e=") {
            return Err(WireError::Auth(format!("the server ended SCRAM: {e}")));
        }
        let (auth_message, server_key) = self
            .expect
            .ok_or_else(|| WireError::Protocol("SCRAM final message before the first".into()))?;
        let v = msg
            .split(',')
            .find_map(|kv| kv.strip_prefix("v="))
            .and_then(|v| B64.decode(v).ok())
            .ok_or_else(|| {
                WireError::Protocol("SCRAM server-final-message has no verifier".into())
            })?;
        let expected = hmac(&server_key, auth_message.as_bytes());
        if v.as_slice() != expected.as_slice() {
            return Err(WireError::Auth(
                "server signature invalid: the server does not know the password".into(),
            ));
        }
        Ok(())
    }
}

/// Server side of one SCRAM-SHA-256 exchange (no channel binding).
pub(crate) struct ScramServer<'a> {
    verifier: &'a ScramVerifier,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl<'a> ScramServer<'a> {
    /// Takes the client-first-message; returns the state and the server-first-message.
    pub fn start(
        verifier: &'a ScramVerifier,
        client_first: &[u8],
    ) -> Result<(Self, String), WireError> {
        let msg = std::str::from_utf8(client_first)
            .map_err(|_| WireError::Protocol("SCRAM client-first-message is not UTF-8".into()))?;
        // gs2-header: "n,," or "y,," (we offer no channel binding); "p=" is refused.
        let rest = if let Some(r) = msg.strip_prefix("n,") {
            r
        } else if let Some(r) = msg.strip_prefix("y,") {
            r
        } else {
            return Err(WireError::Protocol(
                "SCRAM channel binding is not supported by this server".into(),
            ));
        };
        let bare = rest
            .split_once(',')
            .map(|(_authzid, bare)| bare)
            .ok_or_else(|| WireError::Protocol("malformed SCRAM client-first-message".into()))?;
        let client_nonce = bare
            .split(',')
            .find_map(|kv| kv.strip_prefix("r="))
            .filter(|n| !n.is_empty())
            .ok_or_else(|| WireError::Protocol("SCRAM client-first-message has no nonce".into()))?;
        let mut raw = [0u8; 18];
        rand::fill(&mut raw[..]);
        let nonce = format!("{client_nonce}{}", B64.encode(raw));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        Ok((
            ScramServer {
                verifier,
                client_first_bare: bare.to_string(),
                server_first: server_first.clone(),
                nonce,
            },
            server_first,
        ))
    }

    /// Checks the client-final-message; returns the server-final-message on success.
    pub fn finish(self, client_final: &[u8]) -> Result<String, WireError> {
        let msg = std::str::from_utf8(client_final)
            .map_err(|_| WireError::Protocol("SCRAM client-final-message is not UTF-8".into()))?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or_else(|| WireError::Protocol("SCRAM client-final-message has no proof".into()))?;
        let nonce = without_proof
            .split(',')
            .find_map(|kv| kv.strip_prefix("r="))
            .ok_or_else(|| WireError::Protocol("SCRAM client-final-message has no nonce".into()))?;
        if nonce != self.nonce {
            return Err(WireError::Auth("SCRAM nonce mismatch".into()));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| WireError::Protocol("SCRAM proof is not base64".into()))?;
        if proof.len() != 32 {
            return Err(WireError::Protocol(
                "SCRAM proof has the wrong length".into(),
            ));
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ client_signature[i];
        }
        let check: [u8; 32] = Sha256::digest(client_key).into();
        if !constant_time_eq(&check, &self.verifier.stored_key) {
            return Err(WireError::Auth("password does not match".into()));
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

/// Compares secrets without leaking where they differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The md5 response a client must send: `md5` + md5(md5(password + user) + salt).
pub(crate) fn md5_response(user: &str, password: &str, salt: [u8; 4]) -> String {
    postgres_protocol::authentication::md5_hash(user.as_bytes(), password.as_bytes(), salt)
}

/// Checks an md5 password response from a client.
pub(crate) fn md5_check(user: &str, password: &str, salt: [u8; 4], response: &[u8]) -> bool {
    let expected = md5_response(user, password, salt);
    let got = response.strip_suffix(&[0]).unwrap_or(response);
    constant_time_eq(expected.as_bytes(), got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    #[test]
    fn scram_client_against_the_server_side() {
        let v = ScramVerifier::from_password("pencil");
        for _ in 0..2 {
            // The second login takes the keys from the cache.
            let (mut client, first) = ScramClient::start("pencil");
            let (server, server_first) = ScramServer::start(&v, first.as_bytes()).unwrap();
            let fin = client.server_first(server_first.as_bytes()).unwrap();
            let server_final = server.finish(fin.as_bytes()).unwrap();
            client.server_final(server_final.as_bytes()).unwrap();
        }
        // A wrong password is refused by the server.
        let (mut client, first) = ScramClient::start("pen");
        let (server, server_first) = ScramServer::start(&v, first.as_bytes()).unwrap();
        let fin = client.server_first(server_first.as_bytes()).unwrap();
        assert!(server.finish(fin.as_bytes()).is_err());
        // A server that does not know the password is refused by the client.
        let other = ScramVerifier::with_salt("other", v.salt.clone(), v.iterations);
        let (mut client, first) = ScramClient::start("pencil");
        let (server, server_first) = ScramServer::start(&other, first.as_bytes()).unwrap();
        let fin = client.server_first(server_first.as_bytes()).unwrap();
        assert!(server.finish(fin.as_bytes()).is_err());
        let (mut client, _) = ScramClient::start("pencil");
        assert!(client.server_first(b"r=forged,s=AAAA,i=4096").is_err());
    }

    #[test]
    fn scram_against_postgres_protocol_client() {
        let v = ScramVerifier::from_password("pencil");
        let mut client = ScramSha256::new(b"pencil", ChannelBinding::unsupported());
        let (server, first) = ScramServer::start(&v, client.message()).unwrap();
        client.update(first.as_bytes()).unwrap();
        let fin = server.finish(client.message()).unwrap();
        client.finish(fin.as_bytes()).unwrap();
    }

    #[test]
    fn scram_wrong_password_fails() {
        let v = ScramVerifier::from_password("pencil");
        let mut client = ScramSha256::new(b"crayon", ChannelBinding::unsupported());
        let (server, first) = ScramServer::start(&v, client.message()).unwrap();
        client.update(first.as_bytes()).unwrap();
        assert!(matches!(
            server.finish(client.message()),
            Err(WireError::Auth(_))
        ));
    }

    #[test]
    fn scram_garbage_is_protocol_error() {
        let v = ScramVerifier::from_password("pencil");
        assert!(ScramServer::start(&v, b"\xff\xfe").is_err());
        assert!(ScramServer::start(&v, b"p=tls-server-end-point,,n=,r=abc").is_err());
        assert!(ScramServer::start(&v, b"n,,n=,x=1").is_err());
        let (s, _) = ScramServer::start(&v, b"n,,n=,r=abc").unwrap();
        assert!(s.finish(b"c=biws,r=wrong,p=AAAA").is_err());
    }

    #[test]
    fn md5_matches_postgres_format() {
        let r = md5_response("app", "pw", [1, 2, 3, 4]);
        assert!(r.starts_with("md5") && r.len() == 35);
        assert!(md5_check(
            "app",
            "pw",
            [1, 2, 3, 4],
            format!("{r}\0").as_bytes()
        ));
        assert!(!md5_check("app", "px", [1, 2, 3, 4], r.as_bytes()));
    }
}
