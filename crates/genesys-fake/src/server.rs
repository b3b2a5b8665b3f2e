//! The two loopback listeners.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::handler::{handle, Host};
use crate::state::Inner;

/// HTTP/2 streams allowed at once on one connection.
const MAX_CONCURRENT_STREAMS: u32 = 20_000;

fn conn_builder() -> Builder<TokioExecutor> {
    let mut b = Builder::new(TokioExecutor::new());
    b.http1().keep_alive(true).timer(TokioTimer::new());
    b.http2()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(Some(MAX_CONCURRENT_STREAMS as usize))
        .initial_stream_window_size(Some(2 * 1024 * 1024))
        .initial_connection_window_size(Some(32 * 1024 * 1024))
        .timer(TokioTimer::new());
    b
}

/// Binds `127.0.0.1:0` and spawns its accept loop.
pub(crate) async fn listen(
    inner: Arc<Inner>,
    host: Host,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(accept_loop(listener, inner, host));
    Ok((addr, task))
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>, host: Host) {
    let builder = Arc::new(conn_builder());
    // Dropping the set (when this task is aborted) aborts every connection task.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    inner.connections.fetch_add(1, Ordering::Relaxed);
                    let inner = inner.clone();
                    let builder = builder.clone();
                    conns.spawn(async move {
                        let svc = service_fn(move |req: hyper::Request<Incoming>| {
                            handle(inner.clone(), host, req)
                        });
                        if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                            tracing::trace!(error = %e, "genesys-fake connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // e.g. too many open files: back off instead of spinning.
                    tracing::debug!(error = %e, "genesys-fake accept failed");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}
