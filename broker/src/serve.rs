//! The broker's HTTP/2 serving loop over the connections [`crate::tls::incoming`] accepts.
//!
//! tonic's own loop ends a connection only by dropping it, and gives no handle on one
//! connection. Serving each connection here lets the broker end an idle one with GOAWAY, the
//! way gRPC servers do (`MaxConnectionIdle`): a client's next call then goes to a new
//! connection instead of racing an abrupt close that would lose it, whatever language the
//! client is written in. It also lets shutdown cut connections that outlive its grace.

use crate::tls::{ConnSvc, HttpRequest, HttpResponse, Tracked};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::io;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt;

/// What the loop serves on each connection: the broker's routes.
pub trait Routes:
    tower::Service<HttpRequest, Response = HttpResponse, Error = Infallible, Future: Send>
    + Clone
    + Send
    + 'static
{
}

impl<S> Routes for S where
    S: tower::Service<HttpRequest, Response = HttpResponse, Error = Infallible, Future: Send>
        + Clone
        + Send
        + 'static
{
}

/// How connections are served: HTTP/2 only, as gRPC is.
fn builder(max_concurrent_streams: u32) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    // The timer is what lets hyper keep its own HTTP/2 timeouts.
    b.timer(TokioTimer::new())
        .max_concurrent_streams(max_concurrent_streams);
    b
}

/// Serves `routes` on every connection `incoming` yields until `shutdown` resolves; then stops
/// accepting, asks every connection to go away (GOAWAY: calls in flight finish) and returns
/// once all have closed. Dropping the future cuts the connections still open.
pub async fn serve<S: Routes>(
    routes: S,
    mut incoming: impl tokio_stream::Stream<Item = io::Result<TlsStream<Tracked>>> + Unpin,
    max_concurrent_streams: u32,
    shutdown: impl Future<Output = ()>,
) {
    let builder = builder(max_concurrent_streams);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            io = incoming.next() => match io {
                Some(Ok(io)) => {
                    conns.spawn(connection(io, routes.clone(), builder.clone(), stop_rx.clone()));
                }
                Some(Err(e)) => tracing::debug!(error = %e, "accepting a connection failed"),
                None => break,
            },
            // Reaps ended connections, so that the set holds only open ones.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    // The accepting side (and with it the listening socket) goes now, not after the drain.
    drop(incoming);
    let _ = stop_tx.send(true);
    while conns.join_next().await.is_some() {}
}

/// Serves one connection until it ends; sends GOAWAY once it falls idle or the broker stops.
async fn connection<S: Routes>(
    io: TlsStream<Tracked>,
    routes: S,
    builder: hyper::server::conn::http2::Builder<TokioExecutor>,
    mut stop: watch::Receiver<bool>,
) {
    let idle = io.get_ref().0.idle_notice();
    let svc = ConnSvc::new(routes, &io);
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    let mut conn = std::pin::pin!(conn);
    let mut going = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended");
                }
                return;
            }
            _ = idle.notified(), if !going => {
                tracing::debug!("connection idle; sending GOAWAY");
                going = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = stop.wait_for(|s| *s), if !going => {
                going = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}
