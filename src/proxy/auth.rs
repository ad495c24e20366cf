//! Client authentication by the proxy against `[[proxy.users]]`:
//! SCRAM-SHA-256 (verifiers computed once at start), md5 or trust.

use std::collections::HashMap;

use bytes::Buf;
use tokio::io::AsyncWriteExt;

use crate::config::{AuthMethod, ProxyUser, Secret};
use crate::wire::auth::{ScramServer, ScramVerifier, md5_check};
use crate::wire::frame::{FrameReader, get_cstr};
use crate::wire::{PgStream, WireError, messages};

/// Client authentication messages are small; anything larger is hostile.
const MAX_AUTH_MESSAGE: usize = 64 * 1024;

struct UserEntry {
    password: Secret,
    verifier: ScramVerifier,
}

/// The configured users, with their SCRAM verifiers.
pub(crate) struct Users {
    method: AuthMethod,
    map: HashMap<String, UserEntry>,
    /// Used for unknown users so a SCRAM exchange fails the same way as a wrong password.
    dummy: ScramVerifier,
}

impl Users {
    pub(crate) fn new(method: AuthMethod, users: &[ProxyUser]) -> Users {
        let map = users
            .iter()
            .map(|u| {
                let verifier = ScramVerifier::from_password(u.password.expose());
                (
                    u.name.clone(),
                    UserEntry {
                        password: u.password.clone(),
                        verifier,
                    },
                )
            })
            .collect();
        let mut random = [0u8; 24];
        rand::fill(&mut random[..]);
        let dummy = ScramVerifier::from_password(&format!("{random:?}"));
        Users { method, map, dummy }
    }

    /// The password the proxy logs into servers with (None: none configured).
    pub(crate) fn server_password(&self, user: &str) -> Option<Secret> {
        self.map
            .get(user)
            .map(|u| u.password.clone())
            .filter(|p| !p.expose().is_empty())
    }

    /// Runs the exchange with the client. Does not send AuthenticationOk
    /// (that follows once the backend is connected).
    pub(crate) async fn authenticate(
        &self,
        stream: &mut PgStream,
        reader: &mut FrameReader,
        user: &str,
    ) -> Result<(), WireError> {
        match self.method {
            AuthMethod::Trust => Ok(()),
            AuthMethod::Md5 => self.md5(stream, reader, user).await,
            AuthMethod::ScramSha256 => self.scram(stream, reader, user).await,
        }
    }

    async fn md5(
        &self,
        stream: &mut PgStream,
        reader: &mut FrameReader,
        user: &str,
    ) -> Result<(), WireError> {
        let mut salt = [0u8; 4];
        rand::fill(&mut salt[..]);
        stream.write_all(&messages::auth_md5(salt)).await?;
        let answer = read_password_message(stream, reader).await?;
        let ok = self
            .map
            .get(user)
            .is_some_and(|u| md5_check(user, u.password.expose(), salt, &answer));
        if ok { Ok(()) } else { Err(auth_failed(user)) }
    }

    async fn scram(
        &self,
        stream: &mut PgStream,
        reader: &mut FrameReader,
        user: &str,
    ) -> Result<(), WireError> {
        let verifier = self.map.get(user).map(|u| &u.verifier);
        stream
            .write_all(&messages::auth_sasl(&["SCRAM-SHA-256"]))
            .await?;
        let initial = read_password_message(stream, reader).await?;
        let data = sasl_initial_response(&initial)?;
        let (server, first) = ScramServer::start(verifier.unwrap_or(&self.dummy), data)?;
        stream
            .write_all(&messages::auth_sasl_continue(first.as_bytes()))
            .await?;
        let final_msg = read_password_message(stream, reader).await?;
        let server_final = match server.finish(&final_msg) {
            Ok(f) if verifier.is_some() => f,
            Ok(_) | Err(WireError::Auth(_)) => return Err(auth_failed(user)),
            Err(e) => return Err(e),
        };
        stream
            .write_all(&messages::auth_sasl_final(server_final.as_bytes()))
            .await?;
        Ok(())
    }
}

/// The client-first-message in a SASLInitialResponse body (mechanism name,
/// int32 length, data), checking the mechanism is SCRAM-SHA-256.
pub(crate) fn sasl_initial_response(body: &[u8]) -> Result<&[u8], WireError> {
    let mut b = body;
    let mechanism = get_cstr(&mut b)?;
    if mechanism != "SCRAM-SHA-256" {
        // Never echoed: a client answering with a cleartext password
        // sends it here.
        return Err(WireError::Protocol(
            "client selected an invalid SASL authentication mechanism (expected SCRAM-SHA-256)"
                .into(),
        ));
    }
    if b.len() < 4 {
        return Err(WireError::Protocol("short SASLInitialResponse".into()));
    }
    let len = b.get_i32();
    if len < 0 {
        return Ok(&[]);
    }
    b.get(..len as usize)
        .ok_or_else(|| WireError::Protocol("SASLInitialResponse length is wrong".into()))
}

fn auth_failed(user: &str) -> WireError {
    WireError::Auth(format!(
        "password authentication failed for user \"{user}\""
    ))
}

/// Reads one 'p' message (PasswordMessage / SASL responses) and returns its body.
async fn read_password_message(
    stream: &mut PgStream,
    reader: &mut FrameReader,
) -> Result<Vec<u8>, WireError> {
    let saved = reader.max;
    reader.max = MAX_AUTH_MESSAGE;
    let f = reader.read_required(stream).await;
    reader.max = saved;
    let f = f?;
    if f.tag() != b'p' {
        return Err(WireError::Protocol(format!(
            "expected password response, got message type {:?}",
            f.tag() as char
        )));
    }
    Ok(f.body().to_vec())
}
