//! The listening sockets of a running proxy, kept in step with its config.
//! A reload binds the addresses it adds (all of them or none: a port in use
//! rejects the whole reload), stops accepting on the ones it removes (their
//! open connections drain as at shutdown: in-flight requests finish, then
//! they close, and what still runs `shutdown_grace` later is cut) and swaps
//! the certificates of TLS listeners in place, so no listener the reload
//! keeps in its kind ever drops a connection. One whose kind it switches
//! (plain to TLS or back) drains the connections of the old kind as a
//! removed one does. Listeners are keyed by their *configured* address, so
//! `127.0.0.1:0` keeps the port the OS picked across reloads.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpSocket};
use tokio_rustls::TlsAcceptor;

use super::shutdown::{self, DrainGuard, Shutdown, Trigger};
use super::Shared;
use crate::config::Config;
use crate::proxy::CutOff;

/// How a listener's connections start.
pub(super) enum Mode {
    Plain,
    Tls(TlsAcceptor),
}

impl Mode {
    fn describe(&self) -> &'static str {
        match self {
            Mode::Plain => "http, h2c",
            Mode::Tls(_) => "https: h2, http/1.1, http/1.0",
        }
    }
}

/// A listener's mode and the signals of the connections accepted under
/// it: the drain, which a reload that switches the mode (plain to TLS or
/// back) fires, as one that removes the listener does, and the cut,
/// `shutdown_grace` after it (ops54 M1: plaintext keep-alive connections
/// went on being served after a switch to HTTPS; nginx ends them).
pub(super) struct Kind {
    pub mode: Mode,
    pub stopped: Shutdown,
    pub cut: Shutdown,
    pub cut_off: Arc<CutOff>,
}

impl Kind {
    /// A kind for `mode` whose connections drain when the trigger fires.
    fn new(shared: &Arc<Shared>, cut: &Shutdown, mode: Mode) -> (Trigger, Kind) {
        let (trigger, stopped) = shutdown::channel();
        let (cut, cut_off) = cut_after_removal(shared, cut, stopped.clone());
        let kind = Kind {
            mode,
            stopped,
            cut,
            cut_off,
        };
        (trigger, kind)
    }
}

/// One accept loop: its configured address, its kind (swapped on reload)
/// and the switches that stop it and drain its connections.
struct Slot {
    configured: SocketAddr,
    kind: Arc<ArcSwap<Kind>>,
    stop: Trigger,
    /// Drains the connections of the current kind.
    drain: Trigger,
}

impl Slot {
    /// Stops accepting and drains the connections (at shutdown, or when a
    /// reload removes the listener).
    fn stop(&self) {
        self.stop.fire();
        self.drain.fire();
    }
}

/// What accept loops need from the server running them; present only while
/// it runs, so a reload after shutdown cannot start a listener.
#[derive(Clone)]
pub(super) struct Serving {
    pub shutdown: Shutdown,
    pub drain: DrainGuard,
    /// Fires when `shutdown_grace` runs out: what is still served is
    /// dropped, its connections closed.
    pub cut: Shutdown,
}

#[derive(Default)]
struct Inner {
    slots: Vec<Slot>,
    serving: Option<Serving>,
}

#[derive(Default)]
pub(super) struct Registry {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let addrs: Vec<_> = inner.slots.iter().map(|s| s.configured).collect();
        f.debug_struct("Registry")
            .field("listeners", &addrs)
            .finish()
    }
}

/// The listeners `config` asks for, plain first, then each `[[server.tls]]`
/// entry with its acceptor. An address listed twice is served once.
pub(super) fn wanted(config: &Config, acceptors: &[TlsAcceptor]) -> Vec<(SocketAddr, Mode)> {
    let plain = config.server.listen.iter().map(|a| (*a, Mode::Plain));
    let tls = config
        .server
        .tls
        .iter()
        .zip(acceptors)
        .flat_map(|(entry, acceptor)| {
            entry
                .listen
                .iter()
                .map(|a| (*a, Mode::Tls(acceptor.clone())))
        });
    let mut out: Vec<(SocketAddr, Mode)> = Vec::new();
    for (addr, mode) in plain.chain(tls) {
        if !out.iter().any(|(a, _)| *a == addr) {
            out.push((addr, mode));
        }
    }
    out
}

/// Binds `addr` now, as `TcpListener::bind` would (SO_REUSEADDR, backlog
/// 1024), naming the address on failure. Needs a tokio runtime. An IPv6
/// socket takes IPv4 clients too (`IPV6_V6ONLY` off) whatever the host's
/// `net.ipv6.bindv6only` says, as the config's checks take `[::]:P` to:
/// with the sysctl on, `[::]:P` served IPv6 alone, and the IPv4 wildcard
/// beside it was refused as overlapping (review40d M1).
pub(super) fn bind_now(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let attempt = || {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            dual_stack(TcpSocket::new_v6()?)?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(1024)
    };
    attempt().map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// `socket`, an IPv6 one, taking IPv4 clients too (see [`bind_now`]).
fn dual_stack(socket: TcpSocket) -> std::io::Result<TcpSocket> {
    socket2::SockRef::from(&socket).set_only_v6(false)?;
    Ok(socket)
}

impl Registry {
    /// Starts accepting on the initial listeners.
    pub(super) fn start(
        &self,
        shared: &Arc<Shared>,
        serving: Serving,
        initial: Vec<(SocketAddr, TcpListener, Mode)>,
    ) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        for (configured, listener, mode) in initial {
            inner
                .slots
                .push(spawn(shared, &serving, configured, listener, mode));
        }
        inner.serving = Some(serving);
    }

    /// Stops every accept loop and forgets the server (at shutdown).
    pub(super) fn close(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        for slot in inner.slots.drain(..) {
            slot.stop();
        }
        inner.serving = None;
    }

    /// Binds every address of `wanted` not listened on yet. Nothing is
    /// started: on error the sockets bound so far are closed again.
    pub(super) fn bind_added(
        &self,
        wanted: &[(SocketAddr, Mode)],
        admin: SocketAddr,
    ) -> std::io::Result<Vec<(SocketAddr, TcpListener)>> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.serving.is_none() {
            return Ok(Vec::new());
        }
        wanted
            .iter()
            .filter(|(addr, _)| !inner.slots.iter().any(|s| s.configured == *addr))
            .map(|(addr, _)| {
                bind_now(*addr).map(|l| (*addr, l)).map_err(|e| {
                    // Widened or narrowed on its port (`127.0.0.1:P` to
                    // `0.0.0.0:P`): portico's own listener holds it until
                    // the reload is done, which the kernel's message did
                    // not say (review34d L2).
                    let own = inner
                        .slots
                        .iter()
                        .find(|s| crate::config::overlap(s.configured, *addr));
                    match own {
                        Some(slot) if e.kind() == std::io::ErrorKind::AddrInUse => {
                            std::io::Error::new(
                                e.kind(),
                                format!(
                                    "{e}: portico's own listener {} holds the port until the reload is done (new addresses are bound before old ones close): restart portico, or move through another port",
                                    slot.configured
                                ),
                            )
                        }
                        // The admin API stays where the process started
                        // (review36a L4: the bare kernel message).
                        None if e.kind() == std::io::ErrorKind::AddrInUse
                            && (admin == *addr || crate::config::overlap(admin, *addr)) =>
                        {
                            std::io::Error::new(
                                e.kind(),
                                format!(
                                    "{e}: portico's admin API listens on {admin} (an [admin] listen change takes effect only at a restart)"
                                ),
                            )
                        }
                        _ => e,
                    }
                })
            })
            .collect()
    }

    /// Makes the running listeners match `wanted`, using the sockets
    /// [`Registry::bind_added`] returned for the new addresses.
    pub(super) fn apply(
        &self,
        shared: &Arc<Shared>,
        wanted: Vec<(SocketAddr, Mode)>,
        mut added: Vec<(SocketAddr, TcpListener)>,
    ) {
        let mut guard = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let inner = &mut *guard;
        let Some(serving) = inner.serving.clone() else {
            return;
        };
        inner.slots.retain(|slot| {
            let keep = wanted.iter().any(|(a, _)| *a == slot.configured);
            if !keep {
                tracing::info!(addr = %slot.configured, "listener removed by reload");
                slot.stop();
            }
            keep
        });
        for (addr, mode) in wanted {
            if let Some(slot) = inner.slots.iter_mut().find(|s| s.configured == addr) {
                let now = mode.describe();
                let old = slot.kind.load_full();
                let was = old.mode.describe();
                if was == now {
                    // New certificates for the connections that follow;
                    // those open go on.
                    slot.kind.store(Arc::new(Kind {
                        mode,
                        stopped: old.stopped.clone(),
                        cut: old.cut.clone(),
                        cut_off: old.cut_off.clone(),
                    }));
                    continue;
                }
                // Clients of the old kind now fail their handshake or get
                // a 400, and the connections open in it are drained (the
                // new kind is in place first); say so where the reload is
                // logged, as a warning, which `POST /reload` answers with
                // too (review37e M4).
                let (drain, kind) = Kind::new(shared, &serving.cut, mode);
                slot.kind.store(Arc::new(kind));
                std::mem::replace(&mut slot.drain, drain).fire();
                tracing::warn!(
                    addr = %slot.configured,
                    "listener switched by reload to {now} (was {was}); its connections of the old kind are drained, and cut after shutdown_grace"
                );
            } else if let Some(at) = added.iter().position(|(a, _)| *a == addr) {
                let (_, listener) = added.swap_remove(at);
                inner
                    .slots
                    .push(spawn(shared, &serving, addr, listener, mode));
            }
        }
    }
}

fn spawn(
    shared: &Arc<Shared>,
    serving: &Serving,
    configured: SocketAddr,
    listener: TcpListener,
    mode: Mode,
) -> Slot {
    match listener.local_addr() {
        Ok(addr) => tracing::info!(%addr, "listening ({})", mode.describe()),
        Err(error) => tracing::warn!(%configured, %error, "listening, address unknown"),
    }
    let (drain, kind) = Kind::new(shared, &serving.cut, mode);
    let kind = Arc::new(ArcSwap::from_pointee(kind));
    let (stop, stopped) = shutdown::channel();
    tokio::spawn(super::accept_loop(
        listener,
        kind.clone(),
        shared.clone(),
        serving.clone(),
        stopped,
    ));
    Slot {
        configured,
        kind,
        stop,
        drain,
    }
}

/// The cut of a listener's connections of one kind: the process's
/// (`cut`), or `shutdown_grace` (the reload's, read as the listener goes:
/// the old file's in 3 runs of 8 while it was read from the stored
/// configuration, review53 L1) after a reload removes the listener or
/// switches its kind (`removed`), so that
/// what it still serves is bounded as at shutdown. Only its tunnels were (review52 L1: a slow download on a
/// removed address went on for as long as it lasted). With it, the flag
/// set just before it fires, which the access lines of what it cuts read
/// (`end="shutdown"`, not `client_gone`: review53 M2).
fn cut_after_removal(
    shared: &Arc<Shared>,
    cut: &Shutdown,
    mut removed: Shutdown,
) -> (Shutdown, Arc<CutOff>) {
    let (trigger, listener_cut) = shutdown::channel();
    let cut_off = Arc::new(CutOff::new(shared.cut_off.clone()));
    let flag = cut_off.clone();
    let mut cut = cut.clone();
    // Not kept alive by this wait: a stopped server's state goes with it.
    let shared = Arc::downgrade(shared);
    tokio::spawn(async move {
        let after_removal = async {
            removed.recv().await;
            // At shutdown, which stops every listener, the process's cut
            // decides, and marks what it cuts (`end=shutdown`).
            let grace = shared
                .upgrade()
                .filter(|shared| !shared.draining())
                .map(|shared| shared.connections.load().shutdown_grace);
            match grace {
                Some(grace) => tokio::time::sleep(grace).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = cut.recv() => {}
            () = after_removal => {}
        }
        flag.listener_cut();
        trigger.fire();
    });
    (listener_cut, cut_off)
}

#[cfg(test)]
mod tests {
    /// An IPv6 wildcard listener takes IPv4 clients whatever the host's
    /// `net.ipv6.bindv6only` (review40d M1); skipped where IPv6 is off.
    #[tokio::test]
    async fn an_ipv6_wildcard_listener_takes_ipv4_clients() {
        // What a host with net.ipv6.bindv6only=1 gives.
        if let Ok(socket) = tokio::net::TcpSocket::new_v6() {
            socket2::SockRef::from(&socket).set_only_v6(true).unwrap();
            let socket = super::dual_stack(socket).unwrap();
            assert!(!socket2::SockRef::from(&socket).only_v6().unwrap());
        }
        let Ok(listener) = super::bind_now("[::]:0".parse().unwrap()) else {
            return;
        };
        assert!(!socket2::SockRef::from(&listener).only_v6().unwrap());
        let port = listener.local_addr().unwrap().port();
        let connected = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
        assert!(connected.is_ok(), "{connected:?}");
    }
}
