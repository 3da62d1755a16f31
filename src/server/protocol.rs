//! hyper's side of one client connection: HTTP/1.1 (with upgrades) or
//! HTTP/2, told apart by what TLS's ALPN chose or, on plain listeners, by
//! whether the client opens with the HTTP/2 preface (h2c "prior
//! knowledge", RFC 9113 §3.3 and §3.4), as hyper-util's auto builder does.
//! Unlike it:
//!
//! - on TLS, ALPN decides, and is binding: a client that agreed on
//!   `http/1.1`, or on nothing, cannot switch to HTTP/2 by sending the
//!   preface, and one that agreed on `h2` cannot speak HTTP/1.1;
//! - a connection served again after parking is known to be HTTP/1.1;
//! - an HTTP/1.1 connection gives back its socket and the bytes hyper read
//!   but had not parsed yet ([`Connection::into_parts`]), so parking loses
//!   nothing whatever the client has sent.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::idle::Tracked;

/// What an HTTP/2 client opens with (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol of a client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    Http1,
    Http2,
}

impl Protocol {
    /// What ALPN agreed on. A TLS client that offered no ALPN gets
    /// HTTP/1.1, as from nginx: HTTP/2 over TLS is negotiated (RFC 9113
    /// §3.2), never assumed.
    pub(super) fn from_alpn(alpn: Option<&[u8]>) -> Protocol {
        match alpn {
            Some(b"h2") => Protocol::Http2,
            _ => Protocol::Http1,
        }
    }
}

/// How connections are served, from `[server]`.
#[derive(Debug, Clone)]
pub(super) struct Builders {
    pub http1: http1::Builder,
    pub http2: http2::Builder<TokioExecutor>,
}

type Error = Box<dyn StdError + Send + Sync>;

type Http1<IO, S> = http1::UpgradeableConnection<TokioIo<Tracked<IO>>, S>;
type Http2<IO, S> = http2::Connection<TokioIo<Tracked<IO>>, S, TokioExecutor>;

/// One client connection in hyper's hands: a future that ends with it.
pub(super) enum Connection<IO, S>
where
    S: HttpService<Incoming>,
{
    /// Reading the first bytes, to tell the HTTP/2 preface from HTTP/1.
    Sniffing(Box<Sniffing<IO, S>>),
    Http1(Box<Http1<IO, S>>),
    Http2(Pin<Box<Http2<IO, S>>>),
    /// Only for the moment sniffing hands over to the protocol.
    Gone,
}

pub(super) struct Sniffing<IO, S> {
    io: Tracked<IO>,
    read: [u8; PREFACE.len()],
    len: usize,
    service: S,
    builders: std::sync::Arc<Builders>,
    /// [`Connection::graceful_shutdown`] came first: applied to the
    /// connection once its protocol is known.
    graceful: bool,
}

impl<IO, S, B> Connection<IO, S>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = B> + Unpin,
    S::Error: Into<Error>,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Error>,
{
    /// Serves `io` with `service`, as `protocol`, or as what the client's
    /// first bytes say when `None`.
    pub(super) fn new(
        io: Tracked<IO>,
        service: S,
        protocol: Option<Protocol>,
        builders: std::sync::Arc<Builders>,
    ) -> Self {
        match protocol {
            Some(protocol) => Self::serve(io, service, protocol, &builders),
            None => Connection::Sniffing(Box::new(Sniffing {
                io,
                read: [0; PREFACE.len()],
                len: 0,
                service,
                builders,
                graceful: false,
            })),
        }
    }

    fn serve(mut io: Tracked<IO>, service: S, protocol: Protocol, builders: &Builders) -> Self {
        match protocol {
            Protocol::Http1 => Connection::Http1(Box::new(
                builders
                    .http1
                    .serve_connection(TokioIo::new(io), service)
                    .with_upgrades(),
            )),
            Protocol::Http2 => {
                io.multiplexed();
                Connection::Http2(Box::pin(
                    builders.http2.serve_connection(TokioIo::new(io), service),
                ))
            }
        }
    }

    /// HTTP/2: a GOAWAY, then the end once open streams are done.
    /// HTTP/1.1: keep-alive off; closes at once if between requests.
    pub(super) fn graceful_shutdown(&mut self) {
        match self {
            Connection::Sniffing(sniffing) => sniffing.graceful = true,
            Connection::Http1(conn) => Pin::new(&mut **conn).graceful_shutdown(),
            Connection::Http2(conn) => conn.as_mut().graceful_shutdown(),
            Connection::Gone => {}
        }
    }

    /// The socket of an HTTP/1.1 connection that has ended, or been
    /// dropped unfinished, and the bytes hyper had read past the last
    /// request (the start of the next one, or nothing). `None` for an
    /// upgraded connection, HTTP/2, or one still sniffing.
    ///
    /// `pending` is the upgrade hyper armed for an HTTP/1.1 request with
    /// `Upgrade` (or CONNECT) that got no 101: hyper keeps it armed and
    /// hands it the connection as the connection ends, and the socket is
    /// taken back from it (see `idle::Busy::keep_upgrade`).
    pub(super) async fn into_parts(
        self,
        pending: Option<hyper::upgrade::OnUpgrade>,
    ) -> Option<(IO, Bytes)> {
        let Connection::Http1(conn) = self else {
            return None;
        };
        if let Some(parts) = conn.into_parts() {
            return Some((parts.io.into_inner().into_inner(), parts.read_buf));
        }
        // Fulfilled as the connection's future ended: ready at once, or
        // never (a tunnel took the connection, or its request is gone).
        let handed = tokio::time::timeout(std::time::Duration::from_millis(100), pending?);
        let parts = handed
            .await
            .ok()?
            .ok()?
            .downcast::<TokioIo<Tracked<IO>>>()
            .ok()?;
        Some((parts.io.into_inner().into_inner(), parts.read_buf))
    }

    /// The connection sniffing found to speak `protocol`: served with the
    /// bytes read so far first, and closing gracefully if that was asked
    /// for meanwhile.
    fn sniffed(sniffing: Sniffing<IO, S>, protocol: Protocol) -> Self {
        let Sniffing {
            mut io,
            read,
            len,
            service,
            builders,
            graceful,
        } = sniffing;
        io.rewind(Bytes::copy_from_slice(&read[..len]));
        let mut connection = Self::serve(io, service, protocol, &builders);
        if graceful {
            connection.graceful_shutdown();
        }
        connection
    }

    /// Reads until the bytes so far either differ from the preface or are
    /// all of it; the protocol then takes them first, as if unread.
    fn poll_sniff(
        sniffing: &mut Sniffing<IO, S>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Protocol>> {
        while sniffing.len < PREFACE.len() {
            let mut buf = ReadBuf::new(&mut sniffing.read[sniffing.len..]);
            ready!(Pin::new(&mut sniffing.io).poll_read(cx, &mut buf))?;
            let (from, to) = (sniffing.len, sniffing.len + buf.filled().len());
            sniffing.len = to;
            // The end of the stream, or not the preface: HTTP/1.1 (which
            // reads the end, or answers what came).
            if from == to || sniffing.read[from..to] != PREFACE[from..to] {
                return Poll::Ready(Ok(Protocol::Http1));
            }
        }
        Poll::Ready(Ok(Protocol::Http2))
    }
}

impl<IO, S, B> Future for Connection<IO, S>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = B> + Unpin,
    S::Error: Into<Error>,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Error>,
{
    type Output = Result<(), Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Connection::Sniffing(sniffing) = this {
            let protocol = ready!(Self::poll_sniff(sniffing, cx))?;
            let Connection::Sniffing(sniffing) = std::mem::replace(this, Connection::Gone) else {
                unreachable!("matched as sniffing above")
            };
            *this = Self::sniffed(*sniffing, protocol);
        }
        match this {
            Connection::Http1(conn) => {
                crate::proxy::body::in_connection_poll(|| Pin::new(&mut **conn).poll(cx))
                    .map_err(Into::into)
            }
            Connection::Http2(conn) => conn.as_mut().poll(cx).map_err(Into::into),
            // Sniffing has just handed over.
            Connection::Sniffing(_) | Connection::Gone => Poll::Ready(Ok(())),
        }
    }
}
