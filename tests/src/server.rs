//! Listener plumbing shared by the fakes: bind `127.0.0.1:0`, serve an axum router in a task,
//! and stop it on drop or on an explicit shutdown.
//!
//! Shutdown is graceful first (idle keep-alive connections close, the listener stops
//! accepting) and then forceful after a short grace period, because a client may be in the
//! middle of an endless-looking multi-gigabyte download when a test ends.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A bound listener that has not started serving yet, so a router can be built that knows its
/// own address (the fakes put absolute URLs in their answers).
pub(crate) struct Bound {
    listener: TcpListener,
    addr: SocketAddr,
}

impl Bound {
    pub(crate) async fn new() -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        Ok(Self { listener, addr })
    }

    pub(crate) fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn serve(self, router: Router) -> Running {
        let (tx, mut rx) = watch::channel(false);
        let join = tokio::spawn(async move {
            let shutdown = async move {
                // Either an explicit signal or the handle being dropped ends the server.
                let _ = rx.wait_for(|stop| *stop).await;
            };
            let _ = axum::serve(self.listener, router)
                .with_graceful_shutdown(shutdown)
                .await;
        });
        Running {
            stop: tx,
            join: Some(join),
            addr: self.addr,
        }
    }
}

/// A serving listener; dropping it stops the server.
pub(crate) struct Running {
    stop: watch::Sender<bool>,
    join: Option<JoinHandle<()>>,
    addr: SocketAddr,
}

impl Running {
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
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
