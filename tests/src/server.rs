//! Listener plumbing shared by the fakes: bind `127.0.0.1:0`, serve an axum router in a task
//! (over plain http, or https with a given certificate: [`TlsIdentity`]), and stop it on drop
//! or on an explicit shutdown.
//!
//! Shutdown is graceful first (idle keep-alive connections close, the listener stops
//! accepting) and then forceful after a short grace period, because a client may be in the
//! middle of an endless-looking multi-gigabyte download when a test ends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// A server certificate chain (leaf first, DER) and its PKCS#8 private key (DER): what a
/// fake presents when it serves https. Tests make one with a private CA (see the tests'
/// `common/tls.rs`).
#[derive(Clone)]
pub struct TlsIdentity {
    pub cert_chain: Vec<Vec<u8>>,
    pub key_pkcs8: Vec<u8>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("certificates", &self.cert_chain.len())
            .finish_non_exhaustive()
    }
}

impl TlsIdentity {
    fn server_config(&self) -> std::io::Result<Arc<ServerConfig>> {
        let invalid = |e: tokio_rustls::rustls::Error| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
        };
        let chain: Vec<CertificateDer<'static>> = self
            .cert_chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.clone()));
        // An explicit provider: the graph enables both of rustls's, so there is no default.
        let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(invalid)?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(invalid)?;
        Ok(Arc::new(config))
    }
}

/// What an https listener saw of TLS itself.
#[derive(Debug, Default)]
pub struct TlsStats {
    /// Handshakes completed.
    pub handshakes: AtomicU64,
    /// Handshakes that failed (e.g. the client did not trust the certificate).
    pub handshake_failures: AtomicU64,
}

impl TlsStats {
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::SeqCst)
    }

    pub fn handshake_failures(&self) -> u64 {
        self.handshake_failures.load(Ordering::SeqCst)
    }
}

/// An axum [`Listener`](axum::serve::Listener) that accepts TCP connections and hands on the
/// ones whose TLS handshake succeeded. Handshakes run in their own tasks, so a client that
/// never finishes one holds up nobody; a failed handshake is counted and dropped.
pub struct TlsListener {
    addr: SocketAddr,
    incoming: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    acceptor: JoinHandle<()>,
}

impl TlsListener {
    /// Serves TLS with `identity` on an already bound `listener`.
    pub fn new(
        listener: TcpListener,
        identity: &TlsIdentity,
    ) -> std::io::Result<(TlsListener, Arc<TlsStats>)> {
        let addr = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(identity.server_config()?);
        let stats = Arc::new(TlsStats::default());
        let (tx, incoming) = mpsc::channel(64);
        let counts = stats.clone();
        let acceptor = tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    // Back-off after a failed accept (e.g. out of file descriptors), so the
                    // loop does not spin; the next accept may succeed.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let (acceptor, tx, counts) = (acceptor.clone(), tx.clone(), counts.clone());
                tokio::spawn(async move {
                    let handshake = acceptor.accept(tcp);
                    match tokio::time::timeout(Duration::from_secs(10), handshake).await {
                        Ok(Ok(tls)) => {
                            counts.handshakes.fetch_add(1, Ordering::SeqCst);
                            let _ = tx.send((tls, peer)).await;
                        }
                        _ => {
                            counts.handshake_failures.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        Ok((
            TlsListener {
                addr,
                incoming,
                acceptor,
            },
            stats,
        ))
    }

    /// Binds `127.0.0.1:0` and serves TLS there.
    pub async fn bind(identity: &TlsIdentity) -> std::io::Result<(TlsListener, Arc<TlsStats>)> {
        TlsListener::new(TcpListener::bind(("127.0.0.1", 0)).await?, identity)
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.incoming.recv().await {
            Some(connection) => connection,
            // The acceptor task ended (it only does when aborted): accept nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

/// A bound listener that has not started serving yet, so a router can be built that knows its
/// own address (the fakes put absolute URLs in their answers).
pub(crate) struct Bound {
    listener: Listening,
    addr: SocketAddr,
}

enum Listening {
    Plain(TcpListener),
    Tls(TlsListener, Arc<TlsStats>),
}

impl Bound {
    pub(crate) async fn new() -> std::io::Result<Self> {
        Bound::on(0).await
    }

    /// A plain listener on `127.0.0.1:port` (0: any free port).
    pub(crate) async fn on(port: u16) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        Ok(Self {
            listener: Listening::Plain(listener),
            addr,
        })
    }

    /// A listener that serves https with `identity`.
    pub(crate) async fn new_tls(identity: &TlsIdentity) -> std::io::Result<Self> {
        let (listener, stats) = TlsListener::bind(identity).await?;
        Ok(Self {
            addr: listener.addr,
            listener: Listening::Tls(listener, stats),
        })
    }

    pub(crate) fn origin(&self) -> String {
        let scheme = match self.listener {
            Listening::Plain(_) => "http",
            Listening::Tls(..) => "https",
        };
        format!("{scheme}://{}", self.addr)
    }

    pub(crate) fn serve(self, router: Router) -> Running {
        let (tx, mut rx) = watch::channel(false);
        let shutdown = async move {
            // Either an explicit signal or the handle being dropped ends the server.
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let (join, tls) = match self.listener {
            Listening::Plain(listener) => {
                let join = tokio::spawn(async move {
                    let _ = axum::serve(listener, router)
                        .with_graceful_shutdown(shutdown)
                        .await;
                });
                (join, None)
            }
            Listening::Tls(listener, stats) => {
                let join = tokio::spawn(async move {
                    let _ = axum::serve(listener, router)
                        .with_graceful_shutdown(shutdown)
                        .await;
                });
                (join, Some(stats))
            }
        };
        Running {
            stop: tx,
            join: Some(join),
            addr: self.addr,
            tls,
        }
    }
}

/// A serving listener; dropping it stops the server.
pub(crate) struct Running {
    stop: watch::Sender<bool>,
    join: Option<JoinHandle<()>>,
    addr: SocketAddr,
    tls: Option<Arc<TlsStats>>,
}

impl Running {
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// TLS counters, when serving https.
    pub(crate) fn tls_stats(&self) -> Option<Arc<TlsStats>> {
        self.tls.clone()
    }

    /// Stops accepting, lets in-flight requests finish for up to two seconds, then aborts.
    pub(crate) async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(mut join) = self.join.take() {
            if tokio::time::timeout(Duration::from_secs(2), &mut join)
                .await
                .is_err()
            {
                join.abort();
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(join) = self.join.take() {
            // Without a runtime to wait on, the graceful path cannot finish; aborting the
            // accept loop at least frees the port.
            if tokio::runtime::Handle::try_current().is_err() {
                join.abort();
            }
        }
    }
}
