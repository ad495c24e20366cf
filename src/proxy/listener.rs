//! Accepting clients: the startup phase (SSLRequest, GSSENCRequest,
//! CancelRequest, StartupMessage) and client authentication, all under
//! `proxy.startup_timeout` and holding a startup slot ([`super::admission`]);
//! only an authenticated client takes a place under
//! `proxy.max_client_connections`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UnixStream};

use super::Shared;
use super::admission::{self, Peer, StartupSlot};
use super::unix::UnixSocket;
use crate::wire::frame::{FrameReader, read_startup_packet};
use crate::wire::messages::StartupPacket;
use crate::wire::{ErrorFields, PgStream, WireError};

/// PostgreSQL's own limit for startup packets.
const MAX_STARTUP_PACKET: usize = 10_000;

/// A client that finished startup and authentication.
pub(crate) struct Authed {
    pub stream: PgStream,
    /// Bytes the client already sent after its last authentication message.
    pub leftover: BytesMut,
    pub params: Vec<(String, String)>,
    pub user: String,
    pub database: String,
    pub peer: Peer,
    pub slot: ClientSlot,
}

/// One place under `proxy.max_client_connections`; released on drop.
pub(crate) struct ClientSlot(Arc<Shared>);

impl ClientSlot {
    fn acquire(shared: &Arc<Shared>) -> Option<ClientSlot> {
        let before = shared.clients.fetch_add(1, Ordering::SeqCst);
        if before >= shared.limits.max_clients {
            shared.clients.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        shared.metrics.client_connections.inc();
        Some(ClientSlot(shared.clone()))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::SeqCst);
        self.0.metrics.client_connections.dec();
    }
}

pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        tokio::select! {
            _ = shared.stop_accepting.cancelled() => break,
            _ = shared.ctx.shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((tcp, peer)) => admit(&shared, Accepted::Tcp(tcp), Peer::Tcp(peer)),
                Err(e) => accept_failed(e).await,
            }
        }
    }
    tracing::info!("proxy stopped accepting connections");
}

/// The accept loop of the Unix-domain socket: the same path from here on as
/// a TCP client's, but TLS is never offered (as PostgreSQL does not on its
/// sockets). The socket file is removed when the loop ends.
pub(crate) async fn accept_unix_loop(shared: Arc<Shared>, socket: UnixSocket) {
    let listener = match socket.listener() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(path = %socket.path().display(), "cannot poll the Unix socket: {e}");
            return;
        }
    };
    tracing::info!(path = %socket.path().display(), "proxy listening");
    loop {
        tokio::select! {
            _ = shared.stop_accepting.cancelled() => break,
            _ = shared.ctx.shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((unix, _)) => admit(&shared, Accepted::Unix(unix), Peer::Unix),
                Err(e) => accept_failed(e).await,
            }
        }
    }
    drop(listener);
    drop(socket);
}

/// Out of file descriptors and the like: back off, keep serving.
async fn accept_failed(e: std::io::Error) {
    tracing::warn!("accept failed: {e}");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
}

/// An accepted connection, before it moves to its relay thread.
enum Accepted {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// The same, detached from the accepting thread's poller.
enum Detached {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Accepted {
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Accepted::Tcp(s) => s.try_write(buf),
            Accepted::Unix(s) => s.try_write(buf),
        }
    }

    fn detach(self) -> std::io::Result<Detached> {
        Ok(match self {
            Accepted::Tcp(s) => Detached::Tcp(s.into_std()?),
            Accepted::Unix(s) => Detached::Unix(s.into_std()?),
        })
    }
}

impl Detached {
    /// Registers the socket with the current thread's poller.
    fn attach(self) -> std::io::Result<PgStream> {
        Ok(match self {
            Detached::Tcp(s) => {
                let tcp = TcpStream::from_std(s)?;
                let _ = tcp.set_nodelay(true);
                PgStream::Plain(tcp)
            }
            Detached::Unix(s) => PgStream::Unix(UnixStream::from_std(s)?),
        })
    }
}

/// Takes a startup slot for the connection, or refuses it.
fn admit(shared: &Arc<Shared>, conn: Accepted, peer: Peer) {
    shared.metrics.client_connections_total.inc();
    match shared.startup_slots.acquire(peer) {
        Ok(slot) => hand_over(shared, conn, peer, slot),
        Err(full) => refuse_full(shared, &conn, peer, full),
    }
}

/// Refuses a connection over a startup limit at once, without reading from
/// it: a flood costs an accept and a close each.
fn refuse_full(shared: &Shared, conn: &Accepted, peer: Peer, full: admission::Full) {
    shared.metrics.error("startup_limit");
    // A flood must not flood the log too: one warning per interval.
    static LAST_WARNED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if crate::logging::once_per(&LAST_WARNED, 10) {
        tracing::warn!(%peer, "refusing connections: {} (more are counted in pgshift_proxy_errors_total{{kind=\"startup_limit\"}})", full.message());
    } else {
        tracing::debug!(%peer, "connection refused: {}", full.message());
    }
    let frame = ErrorFields::new("FATAL", "53300", full.message()).to_frame();
    // A fresh socket's send buffer takes this at once; if not, the close says enough.
    let _ = conn.try_write(&frame);
}

/// Moves an accepted connection to a relay thread ([`super::workers`]): its
/// socket is registered with that thread's poller, so the session never
/// wakes another thread.
fn hand_over(shared: &Arc<Shared>, conn: Accepted, peer: Peer, slot: StartupSlot) {
    let conn = match conn.detach() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%peer, "cannot hand the connection to a relay thread: {e}");
            return;
        }
    };
    let shared = shared.clone();
    shared.workers.next().clone().spawn(async move {
        match conn.attach() {
            Ok(stream) => handle(shared, stream, peer, slot).await,
            Err(e) => {
                tracing::warn!(%peer, "cannot register the connection on a relay thread: {e}")
            }
        }
    });
}

async fn handle(shared: Arc<Shared>, stream: PgStream, peer: Peer, slot: StartupSlot) {
    let limit = shared.limits.startup_timeout;
    let started = {
        let startup = startup(&shared, stream, peer);
        tokio::pin!(startup);
        tokio::select! {
            r = &mut startup => r,
            _ = tokio::time::sleep(limit) => {
                // Counted before the connection closes (when `startup` is
                // dropped), so whoever sees the close sees the count.
                tracing::debug!(%peer, "client did not finish startup within {limit:?}");
                shared.metrics.error("startup_timeout");
                None
            }
        }
    };
    // Startup is over, however it ended.
    drop(slot);
    if let Some(client) = started {
        super::session::run(shared, client).await;
    }
}

/// Sends a FATAL ErrorResponse and closes.
pub(crate) async fn reject(stream: &mut PgStream, code: &str, message: &str) {
    let frame = ErrorFields::new("FATAL", code, message).to_frame();
    let _ = stream.write_all(&frame).await;
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
}

/// Negotiation, authentication and the client limit. None: the connection
/// is done (cancel request, rejected, or gone).
async fn startup(shared: &Arc<Shared>, stream: PgStream, peer: Peer) -> Option<Authed> {
    let (mut stream, params) = negotiate(shared, stream, peer).await?;
    let (user, database) = match admission::check_startup(&params) {
        Ok(names) => names,
        Err(refusal) => {
            shared.metrics.error("protocol");
            tracing::info!(%peer, "startup packet refused: {}", refusal.message);
            reject(&mut stream, refusal.code, &refusal.message).await;
            return None;
        }
    };
    if shared.is_draining() {
        reject(&mut stream, "57P03", "the database system is shutting down").await;
        return None;
    }
    let mut reader = FrameReader::new(shared.limits.max_message_size);
    if let Err(e) = shared
        .users
        .authenticate(&mut stream, &mut reader, &user)
        .await
    {
        match e {
            WireError::Auth(msg) => {
                tracing::info!(%peer, %user, "client authentication failed");
                shared.metrics.error("auth");
                reject(&mut stream, "28P01", &msg).await;
            }
            WireError::Protocol(msg) | WireError::Tls(msg) => {
                shared.metrics.error("protocol");
                reject(&mut stream, "08P01", &msg).await;
            }
            e @ WireError::TooLarge { .. } => {
                shared.metrics.error("too_large");
                reject(&mut stream, "08P01", &e.to_string()).await;
            }
            _ => shared.metrics.error("client_lost"),
        }
        return None;
    }
    let Some(slot) = ClientSlot::acquire(shared) else {
        shared.metrics.error("limit");
        reject(
            &mut stream,
            "53300",
            &format!(
                "sorry, too many clients already (proxy.max_client_connections = {})",
                shared.limits.max_clients
            ),
        )
        .await;
        return None;
    };
    Some(Authed {
        stream,
        leftover: reader.buf,
        params,
        user,
        database,
        peer,
        slot,
    })
}

/// Reads startup packets until a StartupMessage, answering SSL and GSSENC
/// requests and serving CancelRequests.
async fn negotiate(
    shared: &Arc<Shared>,
    mut stream: PgStream,
    peer: Peer,
) -> Option<(PgStream, Vec<(String, String)>)> {
    let mut ssl_answered = false;
    let mut gss_answered = false;
    loop {
        let body = match read_startup_packet(&mut stream, MAX_STARTUP_PACKET).await {
            Ok(b) => b,
            // A port probe or a client that gave up: nothing to say.
            Err(WireError::Closed) | Err(WireError::Io(_)) => return None,
            Err(e) => {
                shared.metrics.error("protocol");
                reject(&mut stream, "08P01", &e.to_string()).await;
                return None;
            }
        };
        match StartupPacket::parse(&body) {
            Ok(StartupPacket::Startup { params }) => return Some((stream, params)),
            Ok(StartupPacket::Cancel { pid, secret }) => {
                super::cancel::forward(shared.clone(), pid, secret).await;
                return None;
            }
            Ok(StartupPacket::Ssl) if !ssl_answered && !stream.is_tls() => {
                ssl_answered = true;
                stream = upgrade_tls(shared, stream, peer).await?;
            }
            Ok(StartupPacket::GssEnc) if !gss_answered => {
                gss_answered = true;
                stream.write_all(b"N").await.ok()?;
            }
            Ok(_) => {
                shared.metrics.error("protocol");
                reject(
                    &mut stream,
                    "08P01",
                    "unexpected repeated encryption request",
                )
                .await;
                return None;
            }
            Err(e) => {
                shared.metrics.error("protocol");
                reject(&mut stream, "08P01", &e.to_string()).await;
                return None;
            }
        }
    }
}

/// Answers an SSLRequest: 'S' and a TLS handshake when configured, else
/// 'N'; always 'N' on the Unix socket, as PostgreSQL answers there.
async fn upgrade_tls(shared: &Arc<Shared>, stream: PgStream, peer: Peer) -> Option<PgStream> {
    let mut tcp = match stream {
        PgStream::Plain(tcp) => tcp,
        PgStream::Unix(mut unix) => {
            unix.write_all(b"N").await.ok()?;
            return Some(PgStream::Unix(unix));
        }
        PgStream::Tls(_) => return None,
    };
    let Some(cfg) = shared.tls.clone() else {
        tcp.write_all(b"N").await.ok()?;
        return Some(PgStream::Plain(tcp));
    };
    tcp.write_all(b"S").await.ok()?;
    match tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await {
        Ok(tls) => Some(PgStream::Tls(Box::new(tokio_rustls::TlsStream::Server(
            tls,
        )))),
        Err(e) => {
            tracing::debug!(%peer, "TLS handshake failed: {e}");
            shared.metrics.error("tls");
            None
        }
    }
}
