//! Connecting to a PostgreSQL server as a client: TCP, optional TLS, the
//! startup message, answering whatever authentication the server asks
//! (cleartext, md5, SCRAM-SHA-256), up to the first ReadyForQuery.
//! Used for proxy backends and replication connections.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use super::WireError;
use super::auth::ScramClient;
use super::frame::{FrameReader, get_cstr};
use super::messages::{self, ErrorFields, TxStatus};
use super::stream::PgStream;
use super::tls::SslMode;

/// Where to connect and how.
#[derive(Clone)]
pub struct ConnectOptions {
    pub host: String,
    pub port: u16,
    pub sslmode: SslMode,
    pub connect_timeout: Duration,
    pub max_message_size: usize,
    /// CA certificates (PEM) to verify the server against; see [`super::tls::client_config_for`].
    pub sslrootcert: Option<PathBuf>,
    /// A ready TLS config, used instead of the one sslmode/sslrootcert call for.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// An authenticated server connection, positioned after the first ReadyForQuery.
pub struct ServerConnection {
    pub stream: PgStream,
    pub reader: FrameReader,
    /// ParameterStatus values the server sent during startup, in order.
    pub params: Vec<(String, String)>,
    /// The server's BackendKeyData (pid, secret).
    pub key: Option<(i32, i32)>,
    pub status: TxStatus,
}

/// One row of a simple query result, as text (None = NULL).
pub(crate) type TextRow = Vec<Option<String>>;

impl ServerConnection {
    /// Connects and authenticates. `startup` must include `user` and usually `database`.
    pub async fn connect(
        opts: &ConnectOptions,
        startup: &[(String, String)],
        password: Option<&str>,
    ) -> Result<ServerConnection, WireError> {
        tokio::time::timeout(
            opts.connect_timeout,
            Self::connect_inner(opts, startup, password),
        )
        .await
        .map_err(|_| {
            WireError::Timeout(format!(
                "connecting to {}:{} took longer than {:?}",
                opts.host, opts.port, opts.connect_timeout
            ))
        })?
    }

    async fn connect_inner(
        opts: &ConnectOptions,
        startup: &[(String, String)],
        password: Option<&str>,
    ) -> Result<ServerConnection, WireError> {
        let tcp = TcpStream::connect((opts.host.as_str(), opts.port)).await?;
        tcp.set_nodelay(true)?;
        let mut stream = negotiate_tls(tcp, opts).await?;
        stream
            .write_all(&messages::startup_message(startup))
            .await?;
        let user = startup
            .iter()
            .find(|(k, _)| k == "user")
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        let mut reader = FrameReader::new(opts.max_message_size);
        authenticate(&mut stream, &mut reader, user, password).await?;

        let mut params = Vec::new();
        let mut key = None;
        loop {
            let f = reader.read_required(&mut stream).await?;
            match f.tag() {
                b'S' => params.push(messages::parse_parameter_status(f.body())?),
                b'K' => key = Some(messages::parse_backend_key(f.body())?),
                b'N' => {}
                b'E' => return Err(WireError::Server(ErrorFields::parse(&f.bytes)?)),
                b'Z' => {
                    let status = f
                        .body()
                        .first()
                        .and_then(|b| TxStatus::from_byte(*b))
                        .ok_or_else(|| WireError::Protocol("bad ReadyForQuery".into()))?;
                    return Ok(ServerConnection {
                        stream,
                        reader,
                        params,
                        key,
                        status,
                    });
                }
                t => {
                    return Err(WireError::Protocol(format!(
                        "unexpected message {:?} during startup",
                        t as char
                    )));
                }
            }
        }
    }

    /// Runs one simple query and returns its rows as text. Server errors are
    /// returned as [`WireError::Server`] after the connection is ready again.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<TextRow>, WireError> {
        let mut out = BytesMut::new();
        postgres_protocol::message::frontend::query(sql, &mut out)?;
        self.stream.write_all(&out).await?;
        let mut rows = Vec::new();
        let mut err = None;
        loop {
            let f = self.reader.read_required(&mut self.stream).await?;
            match f.tag() {
                b'D' => rows.push(parse_data_row(f.body())?),
                b'E' => err = Some(ErrorFields::parse(&f.bytes)?),
                b'Z' => {
                    self.status = f
                        .body()
                        .first()
                        .and_then(|b| TxStatus::from_byte(*b))
                        .unwrap_or(TxStatus::Idle);
                    return match err {
                        Some(e) => Err(WireError::Server(e)),
                        None => Ok(rows),
                    };
                }
                // CopyIn/CopyOut/CopyBoth cannot be driven by a simple query helper.
                b'G' | b'H' | b'W' => {
                    return Err(WireError::Protocol("simple_query started a COPY".into()));
                }
                _ => {}
            }
        }
    }

    /// Sends Terminate and closes the socket.
    pub async fn terminate(mut self) {
        let _ = self.stream.write_all(&messages::message(b'X', &[])).await;
        let _ = self.stream.shutdown().await;
    }
}

/// Parses a DataRow body into text columns.
pub(crate) fn parse_data_row(body: &[u8]) -> Result<TextRow, WireError> {
    let mut b = body;
    if b.len() < 2 {
        return Err(WireError::Protocol("short DataRow".into()));
    }
    let n = b.get_i16();
    // Each column takes at least its 4-byte length: the count alone must not
    // size the allocation.
    let mut row = Vec::with_capacity((n.max(0) as usize).min(b.len() / 4));
    for _ in 0..n {
        if b.len() < 4 {
            return Err(WireError::Protocol("short DataRow".into()));
        }
        let len = b.get_i32();
        if len < 0 {
            row.push(None);
        } else {
            let len = len as usize;
            if b.len() < len {
                return Err(WireError::Protocol("short DataRow".into()));
            }
            row.push(Some(String::from_utf8_lossy(&b[..len]).into_owned()));
            b.advance(len);
        }
    }
    Ok(row)
}

async fn negotiate_tls(mut tcp: TcpStream, opts: &ConnectOptions) -> Result<PgStream, WireError> {
    if opts.sslmode == SslMode::Disable {
        return Ok(PgStream::Plain(tcp));
    }
    let cfg = match &opts.tls {
        Some(cfg) => cfg.clone(),
        None => super::tls::client_config_for(opts.sslmode, opts.sslrootcert.as_deref())?,
    };
    let mut req = BytesMut::new();
    postgres_protocol::message::frontend::ssl_request(&mut req);
    tcp.write_all(&req).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {
            let name = rustls::pki_types::ServerName::try_from(opts.host.clone())
                .map_err(|e| WireError::Tls(format!("bad server name {}: {e}", opts.host)))?;
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .map_err(|e| {
                    WireError::Tls(format!(
                        "TLS handshake with {}:{} failed: {e}",
                        opts.host, opts.port
                    ))
                })?;
            Ok(PgStream::Tls(Box::new(tokio_rustls::TlsStream::Client(
                tls,
            ))))
        }
        b'N' if !opts.sslmode.requires_tls() => Ok(PgStream::Plain(tcp)),
        b'N' => Err(WireError::Tls(format!(
            "server {}:{} does not support SSL, but sslmode={}",
            opts.host,
            opts.port,
            opts.sslmode.as_str()
        ))),
        other => Err(WireError::Protocol(format!(
            "unexpected answer {other:#x} to SSLRequest"
        ))),
    }
}

/// Answers the server's authentication requests until AuthenticationOk.
async fn authenticate(
    stream: &mut PgStream,
    reader: &mut FrameReader,
    user: &str,
    password: Option<&str>,
) -> Result<(), WireError> {
    let need_pw = || {
        password.ok_or_else(|| {
            WireError::Auth(format!(
                "server asks for a password for user \"{user}\" but none is configured"
            ))
        })
    };
    let mut scram: Option<ScramClient> = None;
    loop {
        let f = reader.read_required(stream).await?;
        match f.tag() {
            b'E' => return Err(WireError::Server(ErrorFields::parse(&f.bytes)?)),
            b'R' => {}
            t => {
                return Err(WireError::Protocol(format!(
                    "expected authentication request, got {:?}",
                    t as char
                )));
            }
        }
        let mut body = f.body();
        if body.len() < 4 {
            return Err(WireError::Protocol("short authentication request".into()));
        }
        let code = body.get_i32();
        let mut out = BytesMut::new();
        match code {
            0 => return Ok(()),
            3 => {
                postgres_protocol::message::frontend::password_message(
                    need_pw()?.as_bytes(),
                    &mut out,
                )?;
            }
            5 => {
                if body.len() < 4 {
                    return Err(WireError::Protocol("short md5 salt".into()));
                }
                let salt = [body[0], body[1], body[2], body[3]];
                let hash = super::auth::md5_response(user, need_pw()?, salt);
                postgres_protocol::message::frontend::password_message(hash.as_bytes(), &mut out)?;
            }
            10 => {
                let mut mechs = Vec::new();
                let mut b = body;
                while !b.is_empty() && b[0] != 0 {
                    mechs.push(get_cstr(&mut b)?);
                }
                if !mechs.iter().any(|m| m == "SCRAM-SHA-256") {
                    return Err(WireError::Auth(format!(
                        "server offers no supported SASL mechanism ({mechs:?})"
                    )));
                }
                let (s, first) = ScramClient::start(need_pw()?);
                postgres_protocol::message::frontend::sasl_initial_response(
                    "SCRAM-SHA-256",
                    first.as_bytes(),
                    &mut out,
                )?;
                scram = Some(s);
            }
            11 => {
                let s = scram
                    .as_mut()
                    .ok_or_else(|| WireError::Protocol("SASLContinue without SASL".into()))?;
                let fin = s.server_first(body)?;
                postgres_protocol::message::frontend::sasl_response(fin.as_bytes(), &mut out)?;
            }
            12 => {
                let s = scram
                    .take()
                    .ok_or_else(|| WireError::Protocol("SASLFinal without SASL".into()))?;
                s.server_final(body)?;
                continue;
            }
            other => {
                return Err(WireError::Auth(format!(
                    "unsupported authentication method {other}"
                )));
            }
        }
        stream.write_all(&out).await?;
    }
}

/// Sends a CancelRequest for (pid, secret) to a server.
pub(crate) async fn send_cancel(
    opts: &ConnectOptions,
    pid: i32,
    secret: i32,
) -> Result<(), WireError> {
    let mut tcp = tokio::time::timeout(
        opts.connect_timeout,
        TcpStream::connect((opts.host.as_str(), opts.port)),
    )
    .await
    .map_err(|_| WireError::Timeout("connecting to send a cancel request".into()))??;
    tcp.write_all(&messages::cancel_request(pid, secret))
        .await?;
    // The server closes the connection without answering.
    let mut sink = [0u8; 1];
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut sink)).await;
    Ok(())
}
