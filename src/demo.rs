//! `portico demo`: N sample order backends in-process over one shared store
//! (so a POST on one and a GET on another agree, as with a real database),
//! and the proxy in front of them, until Ctrl-C.

use std::net::SocketAddr;

use crate::cli::say;
use crate::config::Config;
use crate::sample::service::OrderService;
use crate::sample::{self, BackendOptions};
use crate::server;

/// What the demo is asked to run: how many backends and how each
/// answers, and where the proxy and the admin API listen.
#[derive(Debug, Clone)]
pub struct Demo {
    pub backends: usize,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    /// Added before every backend answer (`--delay`).
    pub delay: std::time::Duration,
    /// Requests each backend serves at once (`--concurrency`).
    pub concurrency: Option<usize>,
}

/// Starts the backends and the proxy; returns after Ctrl-C, SIGTERM or
/// SIGQUIT once everything has stopped. Lines on standard input stop and
/// start backends meanwhile (see [`Command`]).
pub async fn run(demo: Demo) -> std::io::Result<()> {
    run_until(demo, stdin_lines(), crate::signal::terminate_or_hangup()).await
}

/// Standard input's lines, read by a thread of their own: tokio's stdin
/// reads on a blocking thread the runtime would wait for at exit, until
/// the user pressed Enter. Nothing comes when stdin is closed or
/// `/dev/null`.
fn stdin_lines() -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (lines, received) = tokio::sync::mpsc::unbounded_channel();
    let spawned = std::thread::Builder::new()
        .name("demo-stdin".into())
        .spawn(move || read_lines(&lines));
    if let Err(error) = spawned {
        tracing::debug!(%error, "standard input not read");
    }
    received
}

/// Reads stdin's lines into `lines` until it ends. A terminal is read
/// only while the demo is its foreground job: a background job that reads
/// its terminal is stopped by SIGTTIN, proxy and all (`portico demo &`,
/// review36e M2), so that signal is ignored (the read then fails, and is
/// tried again later) and the thread waits until it is brought forward.
fn read_lines(lines: &tokio::sync::mpsc::UnboundedSender<String>) {
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdin());
    #[cfg(unix)]
    if terminal {
        // SAFETY: setting a signal's disposition to SIG_IGN installs no
        // handler; it is process-wide and only makes background reads of
        // the terminal fail (EIO) instead of stopping the process.
        unsafe {
            libc::signal(libc::SIGTTIN, libc::SIG_IGN);
        }
    }
    let wait = || std::thread::sleep(std::time::Duration::from_millis(500));
    let mut line = String::new();
    loop {
        if terminal && !foreground() {
            wait();
            continue;
        }
        line.clear();
        match std::io::stdin().read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if lines.send(line.trim_end().to_owned()).is_err() {
                    return;
                }
            }
            // Sent to the background between the look and the read.
            Err(_) if terminal => wait(),
            Err(_) => return,
        }
    }
}

/// Whether this process is its terminal's foreground job. A terminal
/// that is not the process's controlling one (`setsid portico demo`) has
/// no job to be in the foreground of: read, as before (review36f L5).
#[cfg(unix)]
fn foreground() -> bool {
    // SAFETY: both only read the process's and the terminal's group ids.
    let group = unsafe { libc::tcgetpgrp(0) };
    group == -1 || group == unsafe { libc::getpgrp() }
}

#[cfg(not(unix))]
fn foreground() -> bool {
    true
}

/// A line typed into a running demo.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    /// Stop backend N as a deploy takes an instance out: it stops
    /// accepting, finishes what it was answering and closes.
    Stop(usize),
    /// Start backend N again on its address.
    Start(usize),
    /// Say which backends run.
    Status,
    Help,
}

impl Command {
    /// `stop 2`, `start backend-2`, `status`; `None` for anything else.
    fn parse(line: &str) -> Option<Command> {
        let mut words = line.split_whitespace();
        let verb = words.next()?;
        let number = |word: Option<&str>| -> Option<usize> {
            let word = word?;
            word.strip_prefix("backend-").unwrap_or(word).parse().ok()
        };
        let command = match verb {
            "stop" => Command::Stop(number(words.next())?),
            "start" => Command::Start(number(words.next())?),
            "status" => Command::Status,
            "help" => Command::Help,
            _ => return None,
        };
        words.next().is_none().then_some(command)
    }
}

const COMMANDS_HELP: &str =
    "commands: stop N, start N, status (N from 1 to the number of backends)";

/// The demo's backends, each running or stopped, at fixed addresses.
struct Backends {
    addrs: Vec<SocketAddr>,
    running: Vec<Option<sample::RunningBackend>>,
    options: Vec<BackendOptions>,
    /// One store and one `order.confirmed` worker for all: a backend
    /// stopped with a backlog leaves it to the worker (review41c F2).
    orders: OrderService,
}

impl Backends {
    /// Carries out one typed line.
    async fn obey(&mut self, line: &str) {
        if line.trim().is_empty() {
            return;
        }
        let Some(command) = Command::parse(line) else {
            say(format_args!(
                "unknown command {:?}; {COMMANDS_HELP}",
                line.trim()
            ));
            return;
        };
        let index = match command {
            Command::Stop(n) | Command::Start(n) if n == 0 || n > self.addrs.len() => {
                say(format_args!(
                    "there is no backend-{n}: the backends are 1 to {}",
                    self.addrs.len()
                ));
                return;
            }
            Command::Stop(n) | Command::Start(n) => n - 1,
            Command::Status => {
                for (i, addr) in self.addrs.iter().enumerate() {
                    let state = if self.running[i].is_some() {
                        "running"
                    } else {
                        "stopped"
                    };
                    say(format_args!("  backend-{}  http://{addr}  {state}", i + 1));
                }
                return;
            }
            Command::Help => {
                say(COMMANDS_HELP);
                return;
            }
        };
        let name = &self.options[index].name;
        match command {
            Command::Stop(_) => match self.running[index].take() {
                Some(backend) => {
                    say(format_args!("{name} stopping (finishing its requests)"));
                    backend.stop().await;
                    let others = if self.running.iter().any(Option::is_some) {
                        "its requests go to the others"
                    } else {
                        "no backend runs now, so requests get 502 and then 503"
                    };
                    say(format_args!(
                        "{name} stopped: {others}; `start {}` brings it back",
                        index + 1
                    ));
                }
                None => say(format_args!("{name} is already stopped")),
            },
            _ if self.running[index].is_some() => say(format_args!("{name} is already running")),
            _ => {
                let started = sample::start_sharing(
                    self.addrs[index],
                    self.options[index].clone(),
                    self.orders.clone(),
                )
                .await;
                match started {
                    Ok(backend) => {
                        self.running[index] = Some(backend);
                        say(format_args!(
                            "{name} started on http://{}: back in rotation once its health checks pass",
                            self.addrs[index]
                        ));
                    }
                    Err(error) => say(format_args!(
                        "{name} could not start on {}: {error}",
                        self.addrs[index]
                    )),
                }
            }
        }
    }

    /// Stops every backend still running, together, then gives the
    /// worker a grace to confirm the orders still queued.
    async fn stop(self) {
        futures_util::future::join_all(self.running.into_iter().flatten().map(|b| b.stop())).await;
        let deadline = tokio::time::Instant::now() + sample::STOP_GRACE;
        self.orders.drain(deadline).await;
    }
}

/// Why `listen` and `admin` cannot both be had: one port for both (a
/// wildcard covering the other included), which would otherwise read as a
/// port some other process holds.
pub fn clash(listen: SocketAddr, admin: SocketAddr) -> Option<String> {
    (listen.port() != 0 && (listen == admin || crate::config::overlap(listen, admin))).then(|| {
        format!(
            "--listen {listen} and --admin {admin} take the same port: give the admin API its own"
        )
    })
}

/// [`run`] with the typed lines and the stop signal supplied by the
/// caller (tests).
pub async fn run_until(
    demo: Demo,
    mut lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let Demo {
        backends,
        listen,
        admin,
        delay,
        concurrency,
    } = demo;
    if let Some(clash) = clash(listen, admin) {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, clash));
    }
    let orders = OrderService::start(sample::new_repository());
    let mut running = Vec::with_capacity(backends);
    let mut options = Vec::with_capacity(backends);
    for i in 1..=backends {
        let mut opts = BackendOptions::new(format!("backend-{i}"));
        opts.delay = delay;
        opts.concurrency = concurrency;
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        running.push(Some(
            sample::start_sharing(loopback, opts.clone(), orders.clone()).await?,
        ));
        options.push(opts);
    }
    let addrs: Vec<SocketAddr> = running.iter().flatten().map(|b| b.addr()).collect();
    let mut backends = Backends {
        addrs: addrs.clone(),
        running,
        options,
        orders,
    };

    let mut config = Config::single_upstream(vec![listen], addrs.clone());
    config.upstreams[0].name = "orders".into();
    // `--delay` delays `/health` too: a check gets the delay on top of its
    // second, or every backend would be found down (as config/demo.toml
    // gives its checks room).
    let mut health = crate::config::HealthCheck::default();
    health.timeout += delay;
    health.interval += delay;
    config.upstreams[0].health = Some(health);
    config.routes[0].name = "orders".into();
    config.cache = Some(crate::config::Cache::default());
    config.routes[0].cache = true;
    // A demo stops on Ctrl-C within seconds even with a client stuck
    // mid-request; the default 30 s suits production drains.
    config.server.shutdown_grace = std::time::Duration::from_secs(5);
    // The demo's user wrote flags, not a file: a port in use names the flag
    // that moves it.
    let flag = |flag: &'static str| {
        move |e: std::io::Error| {
            std::io::Error::new(e.kind(), format!("{e} (choose another with {flag})"))
        }
    };
    let listeners = server::bind(&config.server.listen)
        .await
        .map_err(flag("--listen"))?;
    let proxy_addr = listeners[0].local_addr()?;
    let admin = server::bind(&[admin]).await.map_err(flag("--admin"))?;
    let admin = admin.into_iter().next().expect("one address, one listener");
    let admin_addr = admin.local_addr()?;
    // As `portico --config` logs it: one line per listener.
    tracing::info!(addr = %admin_addr, mutations = "disabled (no token_file)", "admin listening");
    sample::warn_if_public(proxy_addr);
    // As `portico --config` warns of it (review35d 6).
    crate::admin::warn_if_exposed(admin_addr, None);
    print_banner(proxy_addr, admin_addr, &addrs);

    let shared = server::Shared::new(&config);
    // Typed lines are obeyed by a task of their own: stopping a backend
    // takes as long as its requests do, and the proxy goes on meanwhile.
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    let commands = tokio::spawn(async move {
        tokio::pin!(finished);
        loop {
            tokio::select! {
                _ = &mut finished => break,
                line = lines.recv() => match line {
                    Some(line) => backends.obey(&line).await,
                    // Standard input closed: nothing more to obey.
                    None => {
                        let _ = (&mut finished).await;
                        break;
                    }
                },
            }
        }
        backends
    });
    server::run_with_admin(shared, listeners, Some((admin, None)), stop).await;
    let _ = done.send(());
    // A task that panicked dropped its backends, which stops them; the
    // exit says it failed (review36e L7), the panic's message is above.
    let failed = match commands.await {
        Ok(backends) => {
            backends.stop().await;
            None
        }
        Err(error) => Some(error),
    };
    say("demo stopped");
    match failed {
        None => Ok(()),
        Some(error) => Err(std::io::Error::other(format!(
            "the demo's typed-command task failed: {error}"
        ))),
    }
}

fn print_banner(proxy: SocketAddr, admin: SocketAddr, backends: &[SocketAddr]) {
    let (proxy, admin) = (reachable(proxy), reachable(admin));
    let base = format!("http://{proxy}");
    let plural = if backends.len() == 1 { "" } else { "s" };
    say(format_args!(
        "portico demo: {} order backend{plural} behind {base}",
        backends.len()
    ));
    for (i, addr) in backends.iter().enumerate() {
        say(format_args!("  backend-{}  http://{addr}", i + 1));
    }
    say("");
    say("Try (repeat them: /health rotates over the backends, the order list is cached):");
    say(format_args!("  curl -si {base}/health"));
    say(format_args!(
        "  curl -si {base}/users/1/orders      (Cache-Status: portico; hit on the second call)"
    ));
    say(format_args!(
        "  curl -si -X POST {base}/users/1/orders -H 'content-type: application/json' \\\n       -d '{{\"items\":[{{\"sku\":\"A-1\",\"qty\":2}}],\"amount_cents\":1999,\"email\":\"a@example.com\"}}'"
    ));
    say(format_args!("  curl -s {base}/orders/ORDER-002"));
    say(format_args!(
        "  curl -si --http2-prior-knowledge {base}/health"
    ));
    say(format_args!(
        "  curl -s http://{admin}/metrics | grep portico_   (admin: /metrics /status /readyz)"
    ));
    say("");
    // backend-2, as the README's tour has it, or the one backend of a
    // demo of one (review41b L4: it said `stop 2` there too).
    let n = backends.len().min(2);
    let then = if n == 1 {
        "requests then get 502 and 503"
    } else {
        "its requests go to the others"
    };
    say(format_args!("Type `stop {n}` to take backend-{n} down ({then}), `start {n}` to bring it back, `status` to list them."));
    say("Ctrl-C stops the proxy and the backends.");
}

/// An address to connect to for a listener on `addr`: a wildcard one
/// (`0.0.0.0`, `[::]`) is reached on loopback, which a browser takes.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        ip if !ip.is_unspecified() => addr,
        std::net::IpAddr::V4(_) => SocketAddr::from(([127, 0, 0, 1], addr.port())),
        std::net::IpAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port())),
    }
}

#[cfg(test)]
mod tests {
    use super::Command;

    #[test]
    fn typed_lines_are_read_as_commands() {
        for (line, want) in [
            ("stop 2", Some(Command::Stop(2))),
            ("  start   backend-3 ", Some(Command::Start(3))),
            ("status", Some(Command::Status)),
            ("help", Some(Command::Help)),
            ("stop", None),
            ("stop two", None),
            ("stop 2 3", None),
            ("kill 2", None),
            ("", None),
        ] {
            assert_eq!(Command::parse(line), want, "{line:?}");
        }
    }
}
