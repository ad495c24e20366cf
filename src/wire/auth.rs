//! Authentication, server side (the proxy checking its clients: SCRAM-SHA-256,
//! md5) and client side helpers (pgshift logging into a server).

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
